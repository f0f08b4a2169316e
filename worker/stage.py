"""What a stage gets and what it gives back.

The analysis library (profiler, scoring, evaluation) knows nothing of Celery or
the database: the pipeline (`worker.pipeline`) hands every stage a `StageInputs`
(the model, the data, a `JobContext` for progress and cancellation, the typed
values of the stages before it) and persists the `StageResult` of the
`StageOutput` it returns.

A stage (`Stage`, registered in `worker.stages`) declares its `name`, the stages it
`needs` (run before it when they run; their values are read through typed `Key`s,
never out of another stage's client-facing `summary`), its `options_model`, when an
analysis runs it (`options(spec)`) and `run`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel

from app.layervalues import LayerValue

if TYPE_CHECKING:
    from app.config import Settings
    from app.schemas import AnalysisSpec, DatasetSpec
    from worker.datasets import Example
    from worker.modelzoo import LoadedModel


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
    deadline: float | None = None  # time.monotonic() after which the job fails with a timeout
    # (analysis_id, artifact name) -> bytes, or None when the job's project has no such artifact
    read_artifact: Callable[[str, str], bytes | None] | None = None
    analysis_id: str | None = None  # the job's analysis (None when a stage runs alone); model cards name it

    def check_cancelled(self) -> None:
        """Call between batches: stops a cancelled job, fails one past its time limit."""
        if self.is_cancelled():
            raise JobCancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobFailed("timeout", "The job ran past its time limit (LAYERSCOPE_JOB_SOFT_TIME_LIMIT); "
                            "use fewer examples, a smaller model or a GPU worker.")


@dataclass
class LayerRow:
    """One layer's numbers from one scorer (stored keyed by stage, scorer, layer). Counts and
    ranks are ints, flags bools (`app.layervalues` lists them; the job store writes every row
    through it), the rest floats or None."""

    layer: int
    block_name: str
    scorer: str
    values: dict[str, LayerValue]


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


# ------------------------------------------------------------ the stage contract

T = TypeVar("T")
OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True)
class Key(Generic[T]):
    """The name of a typed value a stage hands to later ones (`values.get(AVSS_RANKING)`
    is a `Ranking`); defined next to the stage that provides it."""

    name: str


class Values:
    """The typed values the stages run so far provided, each under its `Key`."""

    def __init__(self) -> None:
        self._data: dict[Key[Any], tuple[str, Any]] = {}

    def put(self, key: Key[T], value: T, *, by: str = "") -> None:
        self._data[key] = (by, value)

    def get(self, key: Key[T]) -> T | None:
        """The value, or None when no stage of this analysis provided it."""
        entry = self._data.get(key)
        return cast(T, entry[1]) if entry is not None else None

    def require(self, key: Key[T]) -> T:
        value = self.get(key)
        if value is None:
            raise RuntimeError(f"no stage provided {key.name!r}; declare the stage that does in `needs`")
        return value

    def drop(self, stage: str) -> None:
        """Forget what `stage` provided (once no later stage needs it)."""
        self._data = {k: v for k, v in self._data.items() if v[0] != stage}


@dataclass
class StageInputs:
    """What a stage reads: the analysis, the model and data loaded once, the job's hooks,
    and the values of the stages before it."""

    spec: AnalysisSpec
    loaded: LoadedModel
    examples: list[Example]
    ctx: JobContext
    settings: Settings
    values: Values = field(default_factory=Values)

    def load_examples(self, dataset: DatasetSpec) -> list[Example]:
        """A further data set a stage's options name (e.g. prune's `qa_dataset`)."""
        from worker.datasets import load_examples

        return load_examples(dataset, self.settings)

    @property
    def dataset_name(self) -> str:
        d = self.spec.dataset
        return d.name or d.path or d.hub or "inline"


@dataclass
class StageOutput:
    """What `Stage.run` gives back: the stored result (None: nothing to store, e.g. a
    profiler pass only a later stage asked for) and typed values for later stages."""

    result: StageResult | None
    values: list[tuple[Key[Any], Any]] = field(default_factory=list)

    def provide(self, key: Key[T], value: T) -> StageOutput:
        self.values.append((key, value))
        return self


class Stage(Generic[OptionsT]):
    """One stage of an analysis, declared as a class (see the module doc)."""

    name: ClassVar[str]
    needs: ClassVar[Sequence[str]] = ()
    options_model: type[OptionsT]

    def options(self, spec: AnalysisSpec) -> OptionsT | None:
        """The options this analysis runs the stage with; None when it does not run it."""
        raise NotImplementedError

    def run(self, job: StageInputs, options: OptionsT) -> StageOutput:
        raise NotImplementedError
