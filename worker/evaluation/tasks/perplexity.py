"""`perplexity`: language modeling (causal LMs only).

- Each text is tokenized as the tokenizer does by default (special tokens
  included, e.g. a BOS token), truncated to `max_tokens`.
- Sliding window: a text longer than `window` tokens is read in windows of
  `window` tokens that start every `stride` tokens; each window only scores the
  tokens the previous window did not, so each token (except the text's first,
  which has no context) is scored exactly once, with up to `window - stride`
  tokens of extra context (the Hugging Face perplexity recipe). `stride ==
  window` gives disjoint windows (the first token of each window then goes
  unscored). Padding is masked out: only real tokens are inputs' keys and
  targets.
- Perplexity = exp(sum of token NLL / number of scored tokens) over the whole
  set, i.e. exp(mean NLL) with every token weighted equally. The bootstrap
  resamples examples (texts) and recomputes that token-weighted value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.evaluation.bootstrap import bootstrap_ci
from worker.evaluation.tasks.base import (
    ExampleStatistic,
    Task,
    TaskResult,
    TaskRun,
    example_field,
    job_context,
    metric,
    require_causal,
    target_nll_batches,
)
from worker.lm.model import is_causal_lm
from worker.lm.tokens import encode_texts
from worker.stage import JobContext, finite_or_none

if TYPE_CHECKING:
    from app.schemas import PruneOptions


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_target) over a text of `n_tokens` tokens.

    Inside window `ids[begin:end]`, positions `first_target .. end-begin-1` are the
    scored targets (each predicted from the positions before it in the window);
    over all windows every token but the first is scored exactly once when
    `stride < window` (see module doc)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    out: list[tuple[int, int, int]] = []
    if n_tokens < 2:
        return out
    begin, prev_end = 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(1, prev_end - begin)
        if first < end - begin:
            out.append((begin, end, first))
        prev_end = end
        if end >= n_tokens:
            break
        begin += stride
    return out


def _token_weighted_ppl(nll_b: np.ndarray, cnt_b: np.ndarray) -> np.ndarray:
    """exp(sum of NLL / scored tokens) per bootstrap resample (rows)."""
    c = cnt_b.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(c > 0, np.exp(nll_b.sum(axis=1) / np.maximum(c, 1)), np.nan)


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int | None = 256,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:perplexity",
    n_boot: int = 1000,
    seed: int = 0,
) -> TaskResult:
    """Perplexity with a sliding window over real tokens (see module doc).

    `window` defaults to the model's maximum positions (capped at 1024), `stride`
    to `window // 2`."""
    require_causal(model, "perplexity")
    ctx = job_context(ctx)
    if window is None:
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        window = int(min(limit or 1024, 1024))
    if stride is None:
        stride = max(1, window // 2)
    encoded = encode_texts(tokenizer, texts, max_tokens)

    pieces: list[tuple[int, list[int], int]] = []  # (example, window ids, first target)
    for i, ids in enumerate(encoded):
        for begin, end, first in sliding_windows(len(ids), window, stride):
            pieces.append((i, ids[begin:end], first))

    n = len(encoded)
    nll_sum = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for batch, nll, tmask in target_nll_batches(
        model, tokenizer, [(p[1], p[2]) for p in pieces], workload="perplexity", batch_size=batch_size, ctx=ctx,
        progress_stage=progress_stage,
    ):
        for row, k in enumerate(batch):
            ex = pieces[k][0]
            nll_sum[ex] += float(nll[row][tmask[row]].sum())
            counts[ex] += float(tmask[row].sum())

    total = counts.sum()
    value = math.exp(nll_sum.sum() / total) if total > 0 else None
    valid = counts > 0
    ci = bootstrap_ci(_token_weighted_ppl, nll_sum[valid], counts[valid], n_boot=n_boot, seed=seed, batched=True)
    return TaskResult(
        task="perplexity",
        primary="perplexity",
        metrics={"perplexity": metric("perplexity", value, ci, int(valid.sum()), False)},
        per_example={"nll_sum": nll_sum.tolist(), "tokens": counts.tolist()},
        statistics={"perplexity": ExampleStatistic("nll_sum", "tokens", "exp")},
        details={
            "tokens_scored": int(total),
            "mean_nll": finite_or_none(nll_sum.sum() / total) if total > 0 else None,
            "window": window,
            "stride": stride,
            "max_tokens": max_tokens,
            "examples_without_targets": int((~valid).sum()),
        },
    )


def lm_texts(examples: Sequence[Any], options: PruneOptions) -> list[str]:
    """The texts of the examples (a question/answer pair as `qa_prompt` + answer), at most
    `eval_examples`: what perplexity is measured on and the baseline scorers score on."""
    texts: list[str] = []
    for ex in examples:
        text, q, a = (example_field(ex, k) for k in ("text", "question", "answer"))
        if isinstance(text, str) and text.strip():
            texts.append(text)
        elif isinstance(q, str) and isinstance(a, str) and q.strip():
            texts.append(options.qa_prompt.format(question=q) + " " + a)
    return texts[: options.eval_examples]


class Perplexity(Task[list[str]]):
    name = "perplexity"
    higher_is_better = False
    description = "sliding-window perplexity over the texts (token-weighted)"

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> list[str] | str:
        if not is_causal_lm(model):
            return f"{type(model).__name__} is not a causal LM"
        texts = lm_texts(examples, options)
        return texts if texts else "the dataset has no text"

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: list[str], options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        window = options.ppl_window or None
        if window is not None:
            window = min(window, run.max_tokens) if run.max_tokens else window
        stride = options.ppl_stride
        if window is not None and stride is not None:
            stride = min(stride, window)
        return evaluate_perplexity(
            model, tokenizer, data[: run.limit], window=window, stride=stride, max_tokens=run.max_tokens,
            batch_size=run.batch_size, ctx=run.ctx, progress_stage=run.progress_stage, n_boot=run.n_boot,
            seed=run.seed,
        )
