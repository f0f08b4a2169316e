"""What a stage gets and what it gives back.

The analysis library (profiler, scoring, evaluation) knows nothing of Celery or
the database: the pipeline hands every stage a `JobContext` for progress and
cancellation, and persists the `StageResult` it returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` when the client asked to cancel."""


class JobFailed(Exception):
    """A failure the user can act on. `error_type` is a short stable identifier
    (e.g. `model_not_found`, `dataset_invalid`, `out_of_memory`), the message
    says what to do."""

    def __init__(self, error_type: str, detail: str):
        super().__init__(detail)
        self.error_type = error_type
        self.detail = detail


ProgressFn = Callable[[str, int, int], None]


@dataclass
class JobContext:
    """Progress and cancellation hooks; the defaults make a stage runnable alone."""

    progress: ProgressFn = lambda stage, done, total: None
    is_cancelled: Callable[[], bool] = lambda: False
    artifacts_dir: Path | None = None
    deadline: float | None = None  # time.monotonic() after which the job fails with a timeout
    # (analysis_id, artifact name) -> bytes, or None when the job's project has no such artifact
    read_artifact: Callable[[str, str], bytes | None] | None = None

    def check_cancelled(self) -> None:
        """Call between batches: stops a cancelled job, fails one past its time limit."""
        if self.is_cancelled():
            raise JobCancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobFailed("timeout", "The job ran past its time limit (LAYERSCOPE_JOB_SOFT_TIME_LIMIT); "
                            "use fewer examples, a smaller model or a GPU worker.")


@dataclass
class LayerRow:
    """One layer's numbers from one scorer (stored keyed by stage, scorer, layer)."""

    layer: int
    block_name: str
    scorer: str
    values: dict[str, float | None]


@dataclass
class MetricRow:
    """One evaluation number; `scope` says what it is about (e.g. `task=perplexity,scorer=avss`)."""

    scope: str
    name: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


@dataclass
class ArtifactFile:
    name: str
    media_type: str
    data: bytes


@dataclass
class AnswerRecord:
    """One answered question (a row of the per-answer table, stored keyed by stage, scope, id).

    `scope` tells apart answers of one stage that belong to different things, e.g. the model
    variants of `mitigate` ("variant=base", "variant=eavss"); "" when there is one set."""

    id: int
    split: str  # "train" | "test"
    question: str
    gold: list[str]
    answer: str
    correct: bool
    rule: str | None  # the rule that decided it correct; None when incorrect
    n_tokens: int
    stop: str  # "newline" | "eos" | "max_tokens"
    confidence: dict[str, float | None]
    verbalized_reply: str | None = None
    samples: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confidence"] = {k: finite_or_none(v) for k, v in self.confidence.items()}
        return d


@dataclass
class StageResult:
    stage: str
    layers: list[LayerRow] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    artifacts: list[ArtifactFile] = field(default_factory=list)
    answers: list[AnswerRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def finite_or_none(value: Any) -> float | None:
    """A float a client can receive: NaN and inf become None (JSON null)."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None
