"""Task evaluators for pruning (docs/method.md section 3, paper table 1).

Each evaluator runs the model batched under `torch.inference_mode`, reports
progress with `ctx.progress(stage, done, total)` and checks for cancellation
between batches, and returns a `TaskResult`: every metric with its value, a
bootstrap 95% percentile interval over *examples* (`worker.evaluation.bootstrap`)
and the number of examples it is over.

Examples: an example is a `str` (its text), a mapping, or an object with
attributes (e.g. `worker.datasets.Example`); the fields read are `text`,
`question`, `answer` and `label`, the latter also from `meta["columns"]`
(`example_field`).

Language modeling, `evaluate_perplexity` (causal LMs only)
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

Classification, `evaluate_classification` -> `accuracy`
- Causal LM: each label word is scored by the log-likelihood of the
  continuation `" " + word` (tokenized without special tokens) after the
  prompt `prompt_template.format(text=...)`; the prediction is the label with
  the highest summed log-probability (`length_norm="mean"` divides by the
  continuation's token count instead). Gold labels are indices into
  `label_words` or the words themselves (case-insensitive).
- Encoder with a sequence-classification head (`...ForSequenceClassification`):
  its head predicts; gold labels are class indices, names in
  `config.label2id` (case-insensitive), or words of `label_words` (word i is
  class i). An encoder without a head (e.g. a bare `BertModel`) cannot
  classify: `JobFailed("task_unsupported")`.

Question answering, `evaluate_qa` -> `f1` (primary) and `exact_match` (causal LMs)
- Generative: greedy decoding (no sampling, one beam) after
  `prompt_template.format(question=...)` (optionally wrapped as a user message in
  the tokenizer's chat template, `chat_template=True`, for instruct models),
  prompts left-padded, the model's KV cache in use, at most `max_new_tokens`
  tokens; the answer is the generated text, leading whitespace skipped, up to its
  first newline (an immediate end-of-sequence gives an empty answer, scored 0). Scored with SQuAD token F1 and exact match
  after SQuAD normalization (`worker.evaluation.correctness`), the maximum
  over the gold aliases (split on "; ").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from worker.evaluation.bootstrap import bootstrap_ci
from worker.evaluation.correctness import exact_match, split_aliases, token_f1
from worker.lm.batching import AutoBatch
from worker.lm.loss import token_nll
from worker.lm.model import has_classification_head, is_causal_lm, model_device
from worker.lm.tokens import by_length, encode_texts, pad_batch, pad_id
from worker.stage import JobContext, JobFailed, finite_or_none

__all__ = [
    "MetricValue",
    "TaskResult",
    "evaluate_classification",
    "evaluate_perplexity",
    "evaluate_qa",
    "example_field",
    "generate_answers",
    "sliding_windows",
]


# ------------------------------------------------------------------ results


@dataclass
class MetricValue:
    """One metric: value, bootstrap 95% interval over examples, number of examples."""

    name: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    higher_is_better: bool


@dataclass
class TaskResult:
    """What an evaluator measured. `metrics` keeps the primary metric first."""

    task: str  # "perplexity" | "classification" | "qa"
    primary: str
    metrics: dict[str, MetricValue]
    per_example: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return self.metrics[self.primary].value

    @property
    def higher_is_better(self) -> bool:
        return self.metrics[self.primary].higher_is_better


def _metric(name: str, value: float | None, ci: Any, n: int, higher_is_better: bool) -> MetricValue:
    return MetricValue(
        name=name,
        value=finite_or_none(value),
        ci_low=finite_or_none(ci.low) if ci is not None else None,
        ci_high=finite_or_none(ci.high) if ci is not None else None,
        n=n,
        higher_is_better=higher_is_better,
    )


# ------------------------------------------------------------------ helpers


def example_field(example: Any, name: str) -> Any:
    """The field `name` of an example (str = its text; mapping; or attribute), or None.
    A field missing there is looked up in `meta["columns"]`, where
    `worker.datasets.Example` keeps unmapped source columns (e.g. a `label`)."""
    if isinstance(example, str):
        return example if name == "text" else None
    if isinstance(example, Mapping):
        value = example.get(name)
        meta = example.get("meta")
    else:
        value = getattr(example, name, None)
        meta = getattr(example, "meta", None)
    if value is None and isinstance(meta, Mapping):
        columns = meta.get("columns")
        if isinstance(columns, Mapping):
            value = columns.get(name)
    return value


def _ctx(ctx: JobContext | None) -> JobContext:
    return ctx if ctx is not None else JobContext()


def _require_causal(model: torch.nn.Module, task: str) -> None:
    if not is_causal_lm(model):
        raise JobFailed(
            "task_unsupported",
            f"{task} needs a causal language model with an LM head; {type(model).__name__} is not one "
            "(an encoder such as BERT cannot compute it)",
        )


# -------------------------------------------------------------- perplexity


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
    _require_causal(model, "perplexity")
    ctx = _ctx(ctx)
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
    device = model_device(model)
    pad = pad_id(tokenizer)
    order = by_length([len(p[1]) for p in pieces])
    batcher = AutoBatch("perplexity", model, batch_size)  # OOM back-off, see worker/lm/batching.py
    ctx.progress(progress_stage, 0, batcher.total_for(order))
    with torch.inference_mode():

        def run_batch(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            ctx.check_cancelled()
            ids, mask = pad_batch([pieces[k][1] for k in batch], pad)
            target = mask.bool().clone()
            for row, k in enumerate(batch):
                target[row, : pieces[k][2]] = False
            nll = token_nll(model, ids.to(device), mask.to(device), target.to(device)).double().cpu()
            return nll, target[:, 1:]

        for batch, (nll, tmask) in batcher.run(order, run_batch):  # summed only once a batch completed
            for row, k in enumerate(batch):
                ex = pieces[k][0]
                nll_sum[ex] += float(nll[row][tmask[row]].sum())
                counts[ex] += float(tmask[row].sum())
            ctx.progress(progress_stage, batcher.done, batcher.total)

    total = counts.sum()
    value = math.exp(nll_sum.sum() / total) if total > 0 else None
    valid = counts > 0

    def ppl(nll_b: np.ndarray, cnt_b: np.ndarray) -> np.ndarray:
        c = cnt_b.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where(c > 0, np.exp(nll_b.sum(axis=1) / np.maximum(c, 1)), np.nan)

    ci = bootstrap_ci(ppl, nll_sum[valid], counts[valid], n_boot=n_boot, seed=seed, batched=True)
    return TaskResult(
        task="perplexity",
        primary="perplexity",
        metrics={"perplexity": _metric("perplexity", value, ci, int(valid.sum()), False)},
        per_example={"nll_sum": nll_sum.tolist(), "tokens": counts.tolist()},
        details={
            "tokens_scored": int(total),
            "mean_nll": finite_or_none(nll_sum.sum() / total) if total > 0 else None,
            "window": window,
            "stride": stride,
            "max_tokens": max_tokens,
            "examples_without_targets": int((~valid).sum()),
        },
    )


# ----------------------------------------------------------- classification


def _gold_index(label: Any, names: Sequence[str], label2id: Mapping[str, int] | None = None) -> int:
    if isinstance(label, (bool, np.bool_)):
        label = int(label)
    if isinstance(label, (int, np.integer)):
        idx = int(label)
        if not 0 <= idx < len(names):
            raise JobFailed("dataset_invalid", f"label {idx} is out of range for {len(names)} classes")
        return idx
    if isinstance(label, str):
        key = label.strip().lower()
        if label2id:
            for name, idx in label2id.items():
                if name.strip().lower() == key:
                    return int(idx)
        for idx, name in enumerate(names):
            if name.strip().lower() == key:
                return idx
        if key.lstrip("-").isdigit():
            return _gold_index(int(key), names, None)
        raise JobFailed("dataset_invalid", f"label {label!r} is none of the classes {list(names)}")
    raise JobFailed("dataset_invalid", f"label {label!r} must be a class index or a class name")


def evaluate_classification(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    label_words: Sequence[str] | None = None,
    prompt_template: str = "{text}\nSentiment:",
    length_norm: Literal["sum", "mean"] = "sum",
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:classification",
    n_boot: int = 1000,
    seed: int = 0,
) -> TaskResult:
    """Accuracy: label-word log-likelihood for a causal LM, the head for an encoder (module doc)."""
    if len(texts) != len(labels):
        raise ValueError("texts and labels must have the same length")
    ctx = _ctx(ctx)
    device = model_device(model)
    pad = pad_id(tokenizer)
    n = len(texts)
    pred = np.zeros(n, dtype=np.int64)

    if has_classification_head(model):
        num = int(getattr(model.config, "num_labels", 0) or 0)
        id2label = getattr(model.config, "id2label", None) or {}
        names = list(label_words) if label_words else [str(id2label.get(i, i)) for i in range(num)]
        label2id = None if label_words else getattr(model.config, "label2id", None)
        gold = np.array([_gold_index(lab, names, label2id) for lab in labels], dtype=np.int64)
        encoded = encode_texts(tokenizer, texts, max_tokens)
        order = by_length([len(e) for e in encoded])
        batcher = AutoBatch("classification", model, batch_size)  # OOM back-off
        ctx.progress(progress_stage, 0, batcher.total_for(order))
        with torch.inference_mode():

            def run_batch(batch: list[int]) -> None:  # writes its own rows: a retry rewrites them
                ctx.check_cancelled()
                ids, mask = pad_batch([encoded[i] for i in batch], pad)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                pred[batch] = logits.argmax(-1).cpu().numpy()

            for _ in batcher.run(order, run_batch):
                ctx.progress(progress_stage, batcher.done, batcher.total)
        method = "classification_head"
    else:
        if not label_words:
            raise JobFailed(
                "task_unsupported",
                f"classification with {type(model).__name__}: a causal LM needs label_words to score, "
                "and an encoder needs a sequence-classification head (e.g. BertForSequenceClassification); "
                "a bare encoder such as BertModel has no head to classify with",
            )
        _require_causal(model, "classification by label-word likelihood")
        names = list(label_words)
        gold = np.array([_gold_index(lab, names) for lab in labels], dtype=np.int64)
        prompts = encode_texts(tokenizer, [prompt_template.format(text=t) for t in texts], max_tokens)
        conts = [tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"] for w in names]
        if any(len(c) == 0 for c in conts):
            raise JobFailed("task_invalid", f"a label word tokenizes to nothing: {names}")
        pairs = [
            (i, k, prompts[i] + list(conts[k]), len(prompts[i])) for i in range(n) for k in range(len(names))
        ]
        scores = np.full((n, len(names)), -np.inf)
        order = by_length([len(p[2]) for p in pairs])
        batcher = AutoBatch("classification", model, batch_size)  # OOM back-off
        ctx.progress(progress_stage, 0, batcher.total_for(order))
        with torch.inference_mode():

            def run_batch(batch: list[int]) -> None:  # writes its own rows: a retry rewrites them
                ctx.check_cancelled()
                ids, mask = pad_batch([pairs[j][2] for j in batch], pad)
                target = mask.bool().clone()
                for row, j in enumerate(batch):
                    target[row, : pairs[j][3]] = False
                nll = token_nll(model, ids.to(device), mask.to(device), target.to(device)).double().cpu()
                for row, j in enumerate(batch):
                    i, k = pairs[j][0], pairs[j][1]
                    total = -float(nll[row].sum())
                    scores[i, k] = total / len(conts[k]) if length_norm == "mean" else total

            for _ in batcher.run(order, run_batch):
                ctx.progress(progress_stage, batcher.done, batcher.total)
        pred = scores.argmax(axis=1)
        method = "label_word_loglik"

    correct = (pred == gold).astype(np.float64)
    ci = bootstrap_ci(lambda c: c.mean(axis=1), correct, n_boot=n_boot, seed=seed, batched=True)
    return TaskResult(
        task="classification",
        primary="accuracy",
        metrics={"accuracy": _metric("accuracy", float(correct.mean()) if n else None, ci, n, True)},
        per_example={"correct": correct.tolist()},
        details={
            "method": method,
            "classes": names,
            "length_norm": length_norm if method != "classification_head" else None,
        },
    )


# --------------------------------------------------------------------- QA


def _first_line(text: str) -> str:
    """The answer: the generated text up to its first newline, leading whitespace skipped."""
    return text.lstrip().split("\n", 1)[0].strip()


class _NewlineStop:
    """Stopping criterion: a row is done once its generated text, leading whitespace
    skipped, holds a newline."""

    def __init__(self, tokenizer: Any, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :].tolist()
        done = ["\n" in self.tokenizer.decode(row, skip_special_tokens=True).lstrip() for row in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 24,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:qa",
    chat_template: bool = False,
) -> list[str]:
    """Greedy answers (up to the first newline), prompts left-padded, KV cache on.
    `chat_template=True` wraps each prompt as a user message in the tokenizer's chat
    template (with the generation prompt); `JobFailed` when the tokenizer has none."""
    import transformers

    ctx = _ctx(ctx)
    device = model_device(model)
    pad = pad_id(tokenizer)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise JobFailed(
                "task_invalid", "qa_chat_template was asked for but the tokenizer has no chat template"
            )
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        encoded = encode_texts(tokenizer, texts, max_tokens, add_special_tokens=False)
    else:
        encoded = encode_texts(tokenizer, prompts, max_tokens)
    answers = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    gen_config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    order = by_length([len(e) for e in encoded])
    batcher = AutoBatch("generate", model, batch_size)  # OOM back-off, see worker/lm/batching.py
    ctx.progress(progress_stage, 0, batcher.total_for(order))
    with torch.inference_mode():

        def run_batch(batch: list[int]) -> None:  # writes its own rows: a retry rewrites them
            ctx.check_cancelled()
            ids, mask = pad_batch([encoded[i] for i in batch], pad, side="left")
            stop = transformers.StoppingCriteriaList([_NewlineStop(tokenizer, ids.shape[1])])
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_config,
                stopping_criteria=stop,
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(out[row, ids.shape[1] :].tolist(), skip_special_tokens=True)
                answers[i] = _first_line(text)

        for _ in batcher.run(order, run_batch):
            ctx.progress(progress_stage, batcher.done, batcher.total)
    return answers


def evaluate_qa(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    *,
    prompt_template: str = "Question: {question}\nAnswer:",
    max_new_tokens: int = 24,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:qa",
    n_boot: int = 1000,
    seed: int = 0,
    keep_predictions: int = 5,
    chat_template: bool = False,
) -> TaskResult:
    """Generative QA: SQuAD token F1 (primary) and exact match, max over gold aliases."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers must have the same length")
    _require_causal(model, "generative question answering")
    golds = [split_aliases(a) for a in answers]
    prompts = [prompt_template.format(question=q) for q in questions]
    preds = generate_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        max_tokens=max_tokens,
        batch_size=batch_size,
        ctx=ctx,
        progress_stage=progress_stage,
        chat_template=chat_template,
    )
    f1 = np.array(
        [max((token_f1(p, g) for g in gs), default=0.0) for p, gs in zip(preds, golds, strict=True)],
        dtype=np.float64,
    )
    em = np.array(
        [float(any(exact_match(p, g) for g in gs)) for p, gs in zip(preds, golds, strict=True)],
        dtype=np.float64,
    )
    n = len(preds)
    mean = lambda a: a.mean(axis=1)  # noqa: E731
    ci_f1 = bootstrap_ci(mean, f1, n_boot=n_boot, seed=seed, batched=True)
    ci_em = bootstrap_ci(mean, em, n_boot=n_boot, seed=seed, batched=True)
    return TaskResult(
        task="qa",
        primary="f1",
        metrics={
            "f1": _metric("f1", float(f1.mean()) if n else None, ci_f1, n, True),
            "exact_match": _metric("exact_match", float(em.mean()) if n else None, ci_em, n, True),
        },
        per_example={"f1": f1.tolist(), "exact_match": em.tolist()},
        details={
            "prompt_template": prompt_template,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy, stop at newline",
            "chat_template": chat_template,
            "examples": [
                {"question": q, "prediction": p, "gold": "; ".join(g)}
                for q, p, g in list(zip(questions, preds, golds, strict=True))[:keep_predictions]
            ],
        },
    )
