"""The evaluation tasks of the prune stage, one module each, registered here
(docs/method.md section 3, paper table 1).

Each entry is a `Task` (worker.evaluation.tasks.base): its name, whether its primary
metric is higher-is-better, `prepare` (its data from the examples, or a reason it is
skipped) and `evaluate` (a `TaskResult` with bootstrap intervals). The order here is
`app.schemas.TaskName`'s (tests/unit/test_registries.py checks).

Adding a task: a module with a `Task` subclass, one entry in `TASKS`, its name in
`TaskName` (and its options, if any, as fields of `app.schemas.PruneOptions`).
"""

from __future__ import annotations

from typing import Any

from worker.evaluation.tasks.base import (
    ExampleStatistic,
    MetricValue,
    Task,
    TaskResult,
    TaskRun,
    example_field,
    mean_of,
)
from worker.evaluation.tasks.classification import Classification, evaluate_classification
from worker.evaluation.tasks.lm_eval_task import LmEval, evaluate_lm_eval
from worker.evaluation.tasks.multiple_choice import MultipleChoice, evaluate_multiple_choice
from worker.evaluation.tasks.perplexity import Perplexity, evaluate_perplexity, lm_texts, sliding_windows
from worker.evaluation.tasks.qa import QA, evaluate_qa, generate_answers, qa_pairs

TASKS: dict[str, Task[Any]] = {t.name: t for t in (Perplexity(), QA(), Classification(), MultipleChoice(), LmEval())}

__all__ = [
    "TASKS",
    "ExampleStatistic",
    "MetricValue",
    "Task",
    "TaskResult",
    "TaskRun",
    "evaluate_classification",
    "evaluate_lm_eval",
    "evaluate_multiple_choice",
    "evaluate_perplexity",
    "evaluate_qa",
    "example_field",
    "generate_answers",
    "lm_texts",
    "mean_of",
    "qa_pairs",
    "sliding_windows",
]
