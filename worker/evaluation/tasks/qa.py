"""`qa` -> `f1` (primary) and `exact_match` (causal LMs).

- Generative: greedy decoding after `prompt_template.format(question=...)`
  (optionally wrapped as a user message in the tokenizer's chat template,
  `chat_template=True`, for instruct models), prompts truncated to `max_tokens`,
  at most `max_new_tokens` tokens, by the generator the hallucination stage uses
  (`worker.lm.generate`): the answer is the generated text before its first
  newline, stripped (an answer that starts with a newline or an end-of-sequence
  is empty, scored 0). Scored with SQuAD token F1 and exact match after SQuAD
  normalization (`worker.evaluation.correctness`), the maximum over the gold
  aliases (split on "; ").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.evaluation.correctness import exact_match, split_aliases, token_f1
from worker.evaluation.tasks.base import (
    Task,
    TaskResult,
    TaskRun,
    example_field,
    job_context,
    mean_metric,
    mean_of,
    require_causal,
)
from worker.lm.generate import generate
from worker.lm.model import is_causal_lm
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from app.schemas import PruneOptions


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
    """Greedy answers by the one generator (`worker.lm.generate`: the first line, stripped),
    prompts truncated to `max_tokens`. `chat_template=True` wraps each prompt as a user
    message in the tokenizer's chat template (with the generation prompt); `JobFailed` when
    the tokenizer has none."""
    ctx = job_context(ctx)
    texts = list(prompts)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise JobFailed(
                "task_invalid", "qa_chat_template was asked for but the tokenizer has no chat template"
            )
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    ctx.progress(progress_stage, 0, len(texts))  # rows, as the generator counts them
    run = generate(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        add_special_tokens=not chat_template, max_prompt_tokens=max_tokens, ctx=ctx,
        on_batch=lambda done, total: ctx.progress(progress_stage, done, total),
    )
    return [g.text for g in run.generations]


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
    require_causal(model, "generative question answering")
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
    return TaskResult(
        task="qa",
        primary="f1",
        metrics={
            "f1": mean_metric("f1", f1, n_boot=n_boot, seed=seed),
            "exact_match": mean_metric("exact_match", em, n_boot=n_boot, seed=seed),
        },
        per_example={"f1": f1.tolist(), "exact_match": em.tolist()},
        statistics={"f1": mean_of("f1"), "exact_match": mean_of("exact_match")},
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


@dataclass
class QAPairs:
    questions: list[str]
    answers: list[str]


def qa_pairs(examples: Sequence[Any], qa_examples: Sequence[Any] | None, options: PruneOptions) -> QAPairs:
    """Question/answer pairs of `qa_examples` (default: the examples), at most `eval_examples`;
    several gold answers joined by "; "."""
    data = QAPairs([], [])
    for ex in qa_examples if qa_examples is not None else examples:
        q, a = example_field(ex, "question"), example_field(ex, "answer")
        if isinstance(q, str) and q.strip() and a is not None and str(a).strip():
            data.questions.append(q)
            data.answers.append(a if isinstance(a, str) else "; ".join(map(str, a)))
    limit = options.eval_examples
    return QAPairs(data.questions[:limit], data.answers[:limit])


class QA(Task[QAPairs]):
    name = "qa"
    higher_is_better = True
    description = "generative QA, greedy up to the first newline: SQuAD token F1 and exact match"

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> QAPairs | str:
        if not is_causal_lm(model):
            return f"generative QA needs a causal LM, {type(model).__name__} is not one"
        data = qa_pairs(examples, qa_examples, options)
        return data if data.questions else "no examples with question and answer fields were given"

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: QAPairs, options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        return evaluate_qa(
            model, tokenizer, data.questions[: run.limit], data.answers[: run.limit],
            prompt_template=options.qa_prompt, max_new_tokens=options.qa_max_new_tokens,
            chat_template=options.qa_chat_template, max_tokens=run.max_tokens, batch_size=run.batch_size,
            ctx=run.ctx, progress_stage=run.progress_stage, n_boot=run.n_boot, seed=run.seed,
        )
