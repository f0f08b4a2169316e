"""What every evaluation task is and shares: the `Task` declaration, the `TaskResult`
it returns, and reading fields of examples.

Each evaluator runs the model batched under `torch.inference_mode`, reports
progress with `ctx.progress(stage, done, total)` and checks for cancellation
between batches (`target_nll_batches` does all three for a log-likelihood pass),
and returns a `TaskResult`: every metric with its value, a bootstrap 95%
percentile interval over *examples* (`worker.evaluation.bootstrap`; `mean_metric`
for a mean) and the number of examples it is over.

Per-example contract (what paired comparisons read, e.g. retained performance of a
pruned model against the original on the same examples, `worker.pruning`):
`per_example[key]` holds one value per example, in the order of the data the task
was given (every key the same length, examples without targets included), and
`statistics[metric]` says how the metric is recomputed from those values on any
resample of the examples: `transform(sum(numerator) / sum(denominator))`, the
denominator 1 per example when unset (a mean; e.g. accuracy = mean of `correct`),
`transform="exp"` for a perplexity (exp of summed NLL over summed tokens). Two
results of the same task on the same data are then paired example by example.
A metric without a statistic gets no paired interval (the prune stage says so).

Examples: an example is a `str` (its text), a mapping, or an object with
attributes (e.g. `worker.datasets.Example`); the fields read are `text`,
`question`, `answer` and `label`, the latter also from `meta["columns"]`
(`example_field`).

A `Task` (one module each, registered in `worker.evaluation.tasks`) declares its
`name`, whether its primary metric is `higher_is_better`, a `prepare` step that
collects its data from the examples or says why it cannot run (a skip reason the
prune stage turns into a warning), and `evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import torch

from worker.evaluation.bootstrap import bootstrap_ci
from worker.lm.batching import AutoBatch
from worker.lm.loss import token_nll
from worker.lm.model import is_causal_lm, model_device
from worker.lm.tokens import by_length, pad_batch, pad_id
from worker.stage import JobContext, JobFailed, finite_or_none

if TYPE_CHECKING:
    from app.schemas import PruneOptions

D = TypeVar("D")


@dataclass
class MetricValue:
    """One metric: value, bootstrap 95% interval over examples, number of examples."""

    name: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    higher_is_better: bool


@dataclass(frozen=True)
class ExampleStatistic:
    """A metric recomputed from per-example values (module doc):
    `transform(sum(per_example[numerator]) / sum(per_example[denominator]))`, the
    denominator counting 1 per example when None (the mean of `numerator`)."""

    numerator: str
    denominator: str | None = None
    transform: Literal["identity", "exp"] = "identity"

    def keys(self) -> tuple[str, ...]:
        return (self.numerator,) if self.denominator is None else (self.numerator, self.denominator)

    def __call__(self, *blocks: np.ndarray) -> np.ndarray:
        """The metric per row of (B, N) blocks of the `keys()` values (NaN where the
        denominator sums to 0); a 1-d block is one row."""
        num = np.atleast_2d(np.asarray(blocks[0], dtype=np.float64))
        den = (
            np.full(num.shape, 1.0) if self.denominator is None
            else np.atleast_2d(np.asarray(blocks[1], dtype=np.float64))
        )
        total = den.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.where(total > 0, num.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)
            return np.exp(ratio) if self.transform == "exp" else ratio


def mean_of(key: str) -> ExampleStatistic:
    """The mean of `per_example[key]` (accuracy, F1, exact match, ...)."""
    return ExampleStatistic(key)


@dataclass
class TaskResult:
    """What an evaluator measured. `metrics` keeps the primary metric first; `per_example`
    and `statistics` follow the per-example contract (module doc)."""

    task: str  # a `TASKS` name
    primary: str
    metrics: dict[str, MetricValue]
    per_example: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, ExampleStatistic] = field(default_factory=dict)

    def example_values(self, metric: str) -> list[np.ndarray] | None:
        """The per-example arrays `statistics[metric]` reads (in its `keys()` order), or None
        when the metric has no statistic or its values are missing or of unequal lengths."""
        stat = self.statistics.get(metric)
        if stat is None or any(k not in self.per_example for k in stat.keys()):
            return None
        arrays = [np.asarray(self.per_example[k], dtype=np.float64) for k in stat.keys()]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            return None
        return arrays

    @property
    def value(self) -> float | None:
        return self.metrics[self.primary].value

    @property
    def higher_is_better(self) -> bool:
        return self.metrics[self.primary].higher_is_better


def metric(name: str, value: float | None, ci: Any, n: int, higher_is_better: bool) -> MetricValue:
    return MetricValue(
        name=name,
        value=finite_or_none(value),
        ci_low=finite_or_none(ci.low) if ci is not None else None,
        ci_high=finite_or_none(ci.high) if ci is not None else None,
        n=n,
        higher_is_better=higher_is_better,
    )


def mean_metric(name: str, values: np.ndarray, *, n_boot: int, seed: int, higher_is_better: bool = True) -> MetricValue:
    """The mean of the per-example `values` (None without examples) with its bootstrap interval."""
    ci = bootstrap_ci(lambda v: v.mean(axis=1), values, n_boot=n_boot, seed=seed, batched=True)
    return metric(name, float(values.mean()) if len(values) else None, ci, len(values), higher_is_better)


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


def job_context(ctx: JobContext | None) -> JobContext:
    return ctx if ctx is not None else JobContext()


def require_causal(model: torch.nn.Module, task: str) -> None:
    if not is_causal_lm(model):
        raise JobFailed(
            "task_unsupported",
            f"{task} needs a causal language model with an LM head; {type(model).__name__} is not one "
            "(an encoder such as BERT cannot compute it)",
        )


def target_nll_batches(
    model: torch.nn.Module, tokenizer: Any, sequences: Sequence[tuple[Sequence[int], int]], *, workload: str,
    batch_size: int, ctx: JobContext, progress_stage: str,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Next-token NLL of each sequence (its token ids, the position of its first target token),
    under `torch.inference_mode`, longest first in `AutoBatch(workload)` batches (OOM back-off),
    cancellation checked and progress reported per batch. Yields every completed batch: the
    indices of its sequences, the NLL [rows, len-1] (float64 on the CPU, 0 off the targets) and
    the target mask [rows, len-1]."""
    device, pad = model_device(model), pad_id(tokenizer)
    order = by_length([len(ids) for ids, _ in sequences])
    batcher = AutoBatch(workload, model, batch_size)

    def run_batch(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.check_cancelled()
        ids, mask = pad_batch([sequences[k][0] for k in batch], pad)
        target = mask.bool().clone()
        for row, k in enumerate(batch):
            target[row, : sequences[k][1]] = False
        nll = token_nll(model, ids.to(device), mask.to(device), target.to(device)).double().cpu()
        return nll, target[:, 1:]

    ctx.progress(progress_stage, 0, len(order))
    with torch.inference_mode():
        for batch, (nll, tmask) in batcher.run(order, run_batch):
            yield batch, nll, tmask
            ctx.progress(progress_stage, *batcher.progress)


@dataclass
class TaskRun:
    """How the prune stage runs a task: batching, progress, bootstrap, and at most `limit` examples."""

    max_tokens: int
    batch_size: int
    ctx: JobContext
    progress_stage: str
    n_boot: int
    seed: int
    limit: int | None = None


class Task(Generic[D]):
    """An evaluation task, declared as a class (as the architecture adapters are)."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]  # of its primary metric
    description: ClassVar[str]

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> D | str:
        """The task's data (at most `options.eval_examples` examples), or why it cannot run here."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: D, options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        raise NotImplementedError
