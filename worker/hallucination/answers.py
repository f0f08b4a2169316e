"""The questions a hallucination analysis answers and its labelled answers, as typed values
(docs/method.md sections 4 and 6).

- `qa_item` / `split_examples`: read a QA example, split a data set by distinct
  normalized question (a question repeated in the data never lands on both sides).
- `QASet`: the answered questions (training rows first, then the test rows), the
  few-shot prompt's shots and every answer prompt (`prepare_questions`).
- `Answers`: the greedy answers with their correctness labels as arrays
  (`label_answers`), what the detectors and the layer scores read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import numpy as np

from app.config import JudgeEndpoint, unknown_judge
from app.schemas import HallucinationOptions
from worker.evaluation.correctness import (
    JudgeError,
    OpenAIJudge,
    label_answer,
    normalize_answer,
    split_aliases,
)
from worker.hallucination.generation import Generation, GenerationRun, build_prompt, first_alias, pick_shots
from worker.modelzoo import LoadedModel
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from worker.datasets import Example

# A QA example: a loaded `Example` or a mapping with `question`, `answer` (and `meta`).
QAExample: TypeAlias = "Example | Mapping[str, Any]"

__all__ = [
    "Answers",
    "Judge",
    "QAExample",
    "QAItem",
    "QASet",
    "label_answers",
    "prepare_questions",
    "qa_item",
    "question_key",
    "split_examples",
]


ExampleT = TypeVar("ExampleT", bound="Example | Mapping[str, Any]")


class Judge(Protocol):
    """Decides whether an answer means the same as a gold answer (`OpenAIJudge`, or a test double)."""

    def equivalent(self, question: str, answer: str, gold: str | Sequence[str]) -> bool: ...


@dataclass
class QAItem:
    question: str
    gold: str  # aliases joined by '; '
    aliases: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _field(example: QAExample, name: str) -> Any:
    if isinstance(example, Mapping):
        return example.get(name)
    return getattr(example, name, None)


def qa_item(example: QAExample, where: str) -> QAItem:
    """A question with its gold aliases from a mapping or an object with `question`/`answer`."""
    question = _field(example, "question")
    gold = _field(example, "answer")
    if not isinstance(question, str) or not question.strip():
        raise JobFailed(
            "dataset_invalid",
            f"{where} has no question: the hallucination stage needs question and answer fields "
            "(map them with dataset.fields, e.g. {\"question\": \"q\", \"answer\": \"a\"})",
        )
    if isinstance(gold, (list, tuple)):
        aliases = split_aliases([str(g) for g in gold])
    elif isinstance(gold, str):
        aliases = split_aliases(gold)
    else:
        aliases = []
    if not aliases:
        raise JobFailed("dataset_invalid", f"{where} (question {question[:80]!r}) has no gold answer")
    meta = _field(example, "meta")
    return QAItem(question.strip(), "; ".join(aliases), aliases, dict(meta) if isinstance(meta, dict) else {})


def question_key(question: str) -> str:
    return normalize_answer(question) or question.strip().lower()


def split_examples(
    examples: Sequence[ExampleT], test_fraction: float, seed: int
) -> tuple[list[ExampleT], list[ExampleT]]:
    """(train, test): distinct normalized questions shuffled with `seed`, round(test_fraction x
    questions) of them (at least 1, and at least 1 left for training) go to the test split,
    with every example carrying one of them. Order inside each split follows the input."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    keys: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        q = _field(ex, "question")
        keys.setdefault(question_key(q) if isinstance(q, str) else f"\x00{i}", []).append(i)
    groups = sorted(keys)
    if len(groups) < 2:
        raise JobFailed("dataset_too_small", "the hallucination stage needs at least 2 distinct questions")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_test = min(max(1, int(round(test_fraction * len(groups)))), len(groups) - 1)
    test_idx = {i for g in order[:n_test] for i in keys[groups[int(g)]]}
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


# ------------------------------------------------------------------ the answered questions


@dataclass
class QASet:
    """The answered questions: `items[:n_train]` from the training split (minus the shots),
    then the test split's."""

    items: list[QAItem]
    n_train: int
    shots: list[tuple[str, str]]
    prompts: list[str]  # the answer prompt of every item
    prompt_format: str  # "plain" | "chat_template"
    train_examples: int  # training examples before the shots were taken out

    @property
    def n_test(self) -> int:
        return len(self.items) - self.n_train

    @property
    def test_rows(self) -> np.ndarray:
        return np.arange(self.n_train, len(self.items))

    @property
    def split(self) -> list[str]:
        return ["train"] * self.n_train + ["test"] * self.n_test


def _drop_overlap(train: list[QAItem], test_all: list[QAItem], warnings: list[str]) -> list[QAItem]:
    train_keys = {question_key(x.question) for x in train}
    test = [x for x in test_all if question_key(x.question) not in train_keys]
    if len(test) < len(test_all):
        warnings.append(
            f"{len(test_all) - len(test)} test questions also occur in the training split and were dropped "
            "(probes are never scored on questions they were trained on)"
        )
    return test


def _pick_shot_rows(train: list[QAItem], n_shots: int, seed: int) -> list[int]:
    """Shots are drawn from the training questions in a canonical order, so the same split
    gives the same prompt whatever order the examples came in."""
    canon = sorted(range(len(train)), key=lambda i: (question_key(train[i].question), i))
    picked = pick_shots(len(canon), n_shots, seed, eligible=[bool(first_alias(train[i].gold)) for i in canon])
    return [canon[k] for k in picked]


def prepare_questions(
    loaded: LoadedModel,
    train_examples: Sequence[QAExample],
    test_examples: Sequence[QAExample],
    options: HallucinationOptions,
    warnings: list[str],
) -> QASet:
    """Read both splits, drop test questions seen in training, take the shots, build the prompts."""
    train = [qa_item(e, f"training example {i}") for i, e in enumerate(train_examples)]
    test = _drop_overlap(train, [qa_item(e, f"test example {i}") for i, e in enumerate(test_examples)], warnings)
    shot_idx = _pick_shot_rows(train, options.n_shots, options.seed)
    shots = [(train[i].question, first_alias(train[i].gold)) for i in shot_idx]
    pool = [x for i, x in enumerate(train) if i not in set(shot_idx)]
    if len(pool) < 2:
        raise JobFailed(
            "dataset_too_small",
            f"the training split has {len(train)} examples; after {len(shots)} few-shot examples fewer than 2 "
            "are left to train the probes. Use more examples, fewer shots or a smaller test_fraction.",
        )
    if not test:
        raise JobFailed("dataset_too_small", "the test split is empty; use more examples or a larger test_fraction")
    if len(shots) < options.n_shots:
        warnings.append(f"only {len(shots)} few-shot examples available (n_shots={options.n_shots})")
    chat_ok = bool(getattr(loaded.tokenizer, "chat_template", None))
    use_chat = options.use_chat_template
    if use_chat and not chat_ok:
        warnings.append("use_chat_template was asked for but the tokenizer has no chat template; plain prompts used")
    items = pool + test
    prompts = [
        build_prompt(x.question, shots, instruction=options.instruction, tokenizer=loaded.tokenizer,
                     use_chat_template=use_chat)
        for x in items
    ]
    return QASet(items=items, n_train=len(pool), shots=shots, prompts=prompts,
                 prompt_format="chat_template" if use_chat and chat_ok else "plain", train_examples=len(train))


# ------------------------------------------------------------------ the labelled answers


@dataclass
class Answers:
    """The greedy answer to every question of a `QASet`, labelled."""

    qa: QASet
    run: GenerationRun  # the greedy generation (prompt lengths, last hidden states)
    correct: np.ndarray  # [answers] 1.0 correct, 0.0 hallucinated
    rules: list[str | None]  # per answer: the rule that decided it correct; None when incorrect

    @property
    def generations(self) -> list[Generation]:
        return self.run.generations

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.run.generations]

    @property
    def y_train(self) -> np.ndarray:
        return self.correct[: self.qa.n_train]

    @property
    def y_test(self) -> np.ndarray:
        return self.correct[self.qa.n_train :]

    def labels(self, rows: Sequence[int] | np.ndarray) -> list[tuple[bool, str | None]]:
        return [(bool(self.correct[i]), self.rules[i]) for i in rows]

    def full(self, test_values: np.ndarray) -> np.ndarray:
        """A per-answer array from values of the test answers (NaN on the training rows)."""
        out = np.full(len(self.qa.items), np.nan)
        out[self.qa.n_train :] = test_values
        return out


def open_judge(options: HallucinationOptions, judges: Mapping[str, JudgeEndpoint] | None) -> OpenAIJudge:
    """The judge `options.judge.name` names among the operator's `judges` (`Settings.judges`).
    A spec never supplies an endpoint or a secret; an unknown name is `judge_not_configured`."""
    name = options.judge.name if options.judge is not None else None
    if not name:
        raise JobFailed("judge_not_configured", "correctness rule 'judge' needs judge.name, a judge configured on the server")
    endpoint = (judges or {}).get(name)
    if endpoint is None:
        raise JobFailed("judge_not_configured", unknown_judge(name, dict(judges or {})))
    try:
        return OpenAIJudge.from_endpoint(name, endpoint)
    except JudgeError as exc:
        raise JobFailed("judge_failed", f"cannot set up the correctness judge: {exc}") from exc


def label_answers(
    qa: QASet, run: GenerationRun, options: HallucinationOptions, ctx: JobContext, judge: Judge | None = None,
    judges: Mapping[str, JudgeEndpoint] | None = None,
) -> Answers:
    """Label every answer by the correctness rules (the first rule that says correct is kept;
    the judge only when no earlier rule did: `judge`, else the one `options.judge` names
    among the operator's `judges`)."""
    rules = list(options.correctness_rules)
    own_judge = open_judge(options, judges) if "judge" in rules and judge is None else None
    judge = own_judge or judge
    labels: list[tuple[bool, str | None]] = []
    try:
        for i, (x, g) in enumerate(zip(qa.items, run.generations, strict=True)):
            if i % 32 == 0:
                ctx.check_cancelled()
            try:
                labels.append(label_answer(
                    x.question, g.text, x.aliases, rules, judge,  # type: ignore[arg-type]
                    contains_max_tokens=options.contains_max_tokens, f1_threshold=options.f1_threshold,
                    rouge_threshold=options.rouge_threshold,
                ))
            except JudgeError as exc:
                raise JobFailed("judge_failed", f"the correctness judge gave no verdict: {exc}") from exc
    finally:
        if own_judge is not None:
            own_judge.close()
    correct = np.asarray([1.0 if c else 0.0 for c, _ in labels])
    return Answers(qa=qa, run=run, correct=correct, rules=[r for _, r in labels])
