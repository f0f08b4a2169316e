"""`multiple_choice` -> `acc` (primary) and `acc_norm` (causal LMs), lm-evaluation-harness's
definitions (its `multiple_choice` output type, lm_eval/api/task.py `process_results`).

- Data: rows with a `question`, `choices` (a list of strings; in a CSV cell a JSON or Python
  list literal) and the gold choice: a `label` column holding its 0-based index, else the
  `answer` field holding the index or the text of one choice. An answer that is a digit
  string *and* the text of a choice is ambiguous and fails (`dataset_invalid`): give the
  index as `label` then. Read from `qa_dataset` when the prune options give one (the same
  rows can serve `qa`, whose gold is `answer`), else from the analysis dataset; rows
  without `choices` are left out.
- Scoring: the context is `qa_prompt.format(question=...)`, each continuation `" " + choice`
  (lm-eval's default `target_delimiter`). As lm-eval's HF model does, trailing spaces of the
  context move to the continuation, the pair is tokenized as one string (the tokenizer's
  default special tokens, e.g. a BOS token) and the continuation's tokens are those after
  the context's own tokenization; its log-likelihood is the summed log-probability of those
  tokens. Pairs longer than `max_tokens` keep their last `max_tokens` tokens.
- `acc`: the choice of highest log-likelihood is the gold one. `acc_norm`: the same after
  dividing each log-likelihood by the choice's length in characters (`len(choice)`, as
  lm-eval 0.4 computes `completion_len`; the byte-length variant is its `acc_bytes`).
  Ties go to the first choice (`numpy.argmax`). Per-example values (0/1) are kept under the
  metric names in `per_example`, with the log-likelihoods in `details`.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.evaluation.tasks.base import (
    Task,
    TaskResult,
    TaskRun,
    example_field,
    job_context,
    mean_metric,
    mean_of,
    require_causal,
    target_nll_batches,
)
from worker.lm.model import is_causal_lm
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from app.schemas import PruneOptions

TARGET_DELIMITER = " "


@dataclass
class MCItem:
    question: str
    choices: list[str]
    gold: int


@dataclass
class MCData:
    items: list[MCItem] = field(default_factory=list)


def parse_choices(value: Any) -> list[str] | None:
    """The choices of a row: a list of strings, or a JSON/Python list literal; None when absent."""
    if isinstance(value, str):
        text = value.strip()
        if not (text.startswith("[") and text.endswith("]")):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in value):
        return None
    return [str(c) for c in value]


def gold_index(label: Any, answer: Any, choices: Sequence[str], where: str) -> int:
    """The gold choice's index from `label` (an index) or `answer` (an index or a choice's text)."""
    n = len(choices)

    def checked(idx: int) -> int:
        if not 0 <= idx < n:
            raise JobFailed("dataset_invalid", f"{where}: answer index {idx} is out of range for {n} choices")
        return idx

    for value in (label, answer):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return checked(int(value))
    if label is not None:
        text = str(label).strip()
        if text.lstrip("-").isdigit():
            return checked(int(text))
        raise JobFailed("dataset_invalid", f"{where}: label {label!r} must be the 0-based index of the gold choice")
    if answer is None or not str(answer).strip():
        raise JobFailed("dataset_invalid", f"{where}: no gold choice (give `label` as an index or `answer`)")
    text = str(answer).strip()
    matches = [i for i, c in enumerate(choices) if c.strip() == text]
    digit = text.lstrip("-").isdigit()
    if matches and digit and 0 <= int(text) < n and int(text) != matches[0]:
        raise JobFailed(
            "dataset_invalid",
            f"{where}: answer {text!r} is both a choice and an index; give the index in a `label` column instead",
        )
    if matches:
        return matches[0]
    if digit:
        return checked(int(text))
    raise JobFailed("dataset_invalid", f"{where}: answer {text!r} is none of the choices {list(choices)}")


def mc_items(examples: Sequence[Any]) -> list[MCItem]:
    """The multiple-choice items of the examples that have a question and choices."""
    items: list[MCItem] = []
    for i, ex in enumerate(examples):
        question = example_field(ex, "question")
        choices = parse_choices(example_field(ex, "choices"))
        if not isinstance(question, str) or not question.strip() or choices is None:
            continue
        where = f"multiple-choice row {i}"
        if any(not c.strip() for c in choices):
            raise JobFailed("dataset_invalid", f"{where}: a choice is empty: {choices}")
        gold = gold_index(example_field(ex, "label"), example_field(ex, "answer"), choices, where)
        items.append(MCItem(question, choices, gold))
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-eval's split of a (context, continuation) pair: the pair's tokens and how many
    of them are the context's (trailing context spaces go to the continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer(context + continuation)["input_ids"])
    n_context = len(tokenizer(context)["input_ids"])
    return whole, n_context


def choice_logliks(
    model: torch.nn.Module, tokenizer: Any, contexts: Sequence[str], choices: Sequence[Sequence[str]], *,
    max_tokens: int | None, batch_size: int, ctx: JobContext, progress_stage: str,
) -> list[list[float]]:
    """Summed log-probability of `" " + choice` after each context, per context and choice."""
    pairs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, first continuation position)
    for i, (context, options) in enumerate(zip(contexts, choices, strict=True)):
        for k, choice in enumerate(options):
            ids, n_context = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
            if len(ids) <= n_context:
                raise JobFailed("dataset_invalid", f"choice {choice!r} tokenizes to nothing after its question")
            if max_tokens is not None and len(ids) > max_tokens:
                cut = len(ids) - max_tokens
                ids, n_context = ids[cut:], max(1, n_context - cut)
            pairs.append((i, k, ids, max(1, n_context)))
    lls = [[0.0] * len(c) for c in choices]
    for batch, nll, _ in target_nll_batches(
        model, tokenizer, [(p[2], p[3]) for p in pairs], workload="multiple_choice", batch_size=batch_size, ctx=ctx,
        progress_stage=progress_stage,
    ):
        for row, j in enumerate(batch):
            lls[pairs[j][0]][pairs[j][1]] = -float(nll[row].sum())
    return lls


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    prompt_template: str = "Question: {question}\nAnswer:",
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:multiple_choice",
    n_boot: int = 1000,
    seed: int = 0,
) -> TaskResult:
    """acc and acc_norm by choice log-likelihood (module doc)."""
    require_causal(model, "multiple-choice log-likelihood")
    ctx = job_context(ctx)
    contexts = [prompt_template.format(question=it.question) for it in items]
    lls = choice_logliks(
        model, tokenizer, contexts, [it.choices for it in items], max_tokens=max_tokens, batch_size=batch_size,
        ctx=ctx, progress_stage=progress_stage,
    )
    acc = np.zeros(len(items))
    acc_norm = np.zeros(len(items))
    for i, (it, ll) in enumerate(zip(items, lls, strict=True)):
        values = np.asarray(ll, dtype=np.float64)
        lengths = np.asarray([float(len(c)) for c in it.choices])
        acc[i] = float(int(np.argmax(values)) == it.gold)
        acc_norm[i] = float(int(np.argmax(values / lengths)) == it.gold)
    return TaskResult(
        task="multiple_choice",
        primary="acc",
        metrics={name: mean_metric(name, values, n_boot=n_boot, seed=seed)
                 for name, values in (("acc", acc), ("acc_norm", acc_norm))},
        per_example={"acc": acc.tolist(), "acc_norm": acc_norm.tolist()},
        statistics={"acc": mean_of("acc"), "acc_norm": mean_of("acc_norm")},
        details={
            "method": "choice_loglik",
            "target_delimiter": TARGET_DELIMITER,
            "acc_norm": "log-likelihood / len(choice) in characters (lm-eval 0.4)",
            "choices_per_item": sorted({len(it.choices) for it in items}),
            "loglikelihoods": lls,
            "gold": [it.gold for it in items],
        },
    )


class MultipleChoice(Task[MCData]):
    name = "multiple_choice"
    higher_is_better = True
    description = "acc and acc_norm: the choice of highest log-likelihood after the question (lm-eval's definitions)"

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> MCData | str:
        if not is_causal_lm(model):
            return f"{type(model).__name__} is not a causal LM"
        source = qa_examples if qa_examples is not None else examples
        items = mc_items(source)[: options.eval_examples]
        if not items:
            return "no example has a question and a list of choices"
        return MCData(items)

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: MCData, options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        return evaluate_multiple_choice(
            model, tokenizer, data.items[: run.limit], prompt_template=options.qa_prompt,
            max_tokens=run.max_tokens, batch_size=run.batch_size, ctx=run.ctx, progress_stage=run.progress_stage,
            n_boot=run.n_boot, seed=run.seed,
        )
