"""`classification` -> `accuracy`.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
from worker.lm.batching import AutoBatch
from worker.lm.model import has_classification_head, is_causal_lm, model_device
from worker.lm.tokens import by_length, encode_texts, pad_batch, pad_id
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from app.schemas import PruneOptions


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


def _head_predictions(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int | None, batch_size: int,
    ctx: JobContext, progress_stage: str,
) -> np.ndarray:
    """The classification head's class per text."""
    device, pad = model_device(model), pad_id(tokenizer)
    pred = np.zeros(len(texts), dtype=np.int64)
    encoded = encode_texts(tokenizer, texts, max_tokens)
    order = by_length([len(e) for e in encoded])
    batcher = AutoBatch("classification", model, batch_size)  # OOM back-off
    ctx.progress(progress_stage, 0, len(order))
    with torch.inference_mode():

        def run_batch(batch: list[int]) -> None:  # writes its own rows: a retry rewrites them
            ctx.check_cancelled()
            ids, mask = pad_batch([encoded[i] for i in batch], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            pred[batch] = logits.argmax(-1).cpu().numpy()

        for _ in batcher.run(order, run_batch):
            ctx.progress(progress_stage, *batcher.progress)
    return pred


def _label_word_predictions(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], names: Sequence[str], prompt_template: str,
    length_norm: Literal["sum", "mean"], max_tokens: int | None, batch_size: int, ctx: JobContext,
    progress_stage: str,
) -> np.ndarray:
    """The label word of highest log-likelihood after each prompt."""
    n = len(texts)
    prompts = encode_texts(tokenizer, [prompt_template.format(text=t) for t in texts], max_tokens)
    conts = [tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"] for w in names]
    if any(len(c) == 0 for c in conts):
        raise JobFailed("task_invalid", f"a label word tokenizes to nothing: {list(names)}")
    pairs = [(i, k, prompts[i] + list(conts[k]), len(prompts[i])) for i in range(n) for k in range(len(names))]
    scores = np.full((n, len(names)), -np.inf)
    for batch, nll, _ in target_nll_batches(
        model, tokenizer, [(p[2], p[3]) for p in pairs], workload="classification", batch_size=batch_size, ctx=ctx,
        progress_stage=progress_stage,
    ):
        for row, j in enumerate(batch):
            i, k = pairs[j][0], pairs[j][1]
            total = -float(nll[row].sum())
            scores[i, k] = total / len(conts[k]) if length_norm == "mean" else total
    return np.asarray(scores.argmax(axis=1))


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
    ctx = job_context(ctx)
    if has_classification_head(model):
        num = int(getattr(model.config, "num_labels", 0) or 0)
        id2label = getattr(model.config, "id2label", None) or {}
        names = list(label_words) if label_words else [str(id2label.get(i, i)) for i in range(num)]
        label2id = None if label_words else getattr(model.config, "label2id", None)
        gold = np.array([_gold_index(lab, names, label2id) for lab in labels], dtype=np.int64)
        pred = _head_predictions(model, tokenizer, texts, max_tokens, batch_size, ctx, progress_stage)
        method = "classification_head"
    else:
        if not label_words:
            raise JobFailed(
                "task_unsupported",
                f"classification with {type(model).__name__}: a causal LM needs label_words to score, "
                "and an encoder needs a sequence-classification head (e.g. BertForSequenceClassification); "
                "a bare encoder such as BertModel has no head to classify with",
            )
        require_causal(model, "classification by label-word likelihood")
        names = list(label_words)
        gold = np.array([_gold_index(lab, names) for lab in labels], dtype=np.int64)
        pred = _label_word_predictions(
            model, tokenizer, texts, names, prompt_template, length_norm, max_tokens, batch_size, ctx,
            progress_stage,
        )
        method = "label_word_loglik"

    correct = (pred == gold).astype(np.float64)
    return TaskResult(
        task="classification",
        primary="accuracy",
        metrics={"accuracy": mean_metric("accuracy", correct, n_boot=n_boot, seed=seed)},
        per_example={"correct": correct.tolist()},
        statistics={"accuracy": mean_of("correct")},
        details={
            "method": method,
            "classes": names,
            "length_norm": length_norm if method != "classification_head" else None,
        },
    )


@dataclass
class Labeled:
    texts: list[str]
    labels: list[Any]


class Classification(Task[Labeled]):
    name = "classification"
    higher_is_better = True
    description = "accuracy: label-word log-likelihood (causal LM) or the classification head (encoder)"

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> Labeled | str:
        data = Labeled([], [])
        for ex in examples:
            text, label = example_field(ex, "text"), example_field(ex, "label")
            if label is not None and isinstance(text, str) and text.strip():
                data.texts.append(text)
                data.labels.append(label)
        limit = options.eval_examples
        data.texts, data.labels = data.texts[:limit], data.labels[:limit]
        if not data.labels:
            return "the dataset has no label field"
        if not has_classification_head(model) and not (is_causal_lm(model) and options.label_words):
            return "a causal LM needs label_words, an encoder a classification head"
        return data

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: Labeled, options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        return evaluate_classification(
            model, tokenizer, data.texts[: run.limit], data.labels[: run.limit],
            label_words=options.label_words, prompt_template=options.classification_prompt,
            max_tokens=run.max_tokens, batch_size=run.batch_size, ctx=run.ctx,
            progress_stage=run.progress_stage, n_boot=run.n_boot, seed=run.seed,
        )
