"""Request and response models of the public API.

Request models are strict (`extra="forbid"`): an unknown field or an impossible
value is a 422 problem+json that names the field. The worker reads the same
models back from the stored spec, so the API and the job agree on every default.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_EXAMPLES = 100_000
MAX_TOKENS = 8192


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------- model


class ModelSpec(Strict):
    """Which model to analyse."""

    name: str = Field(
        "smollm2-135m",
        min_length=1,
        max_length=512,
        description=(
            "A built-in name (`smollm2-135m`, `gemma3-270m`, `minilm-l6`, or a tiny random "
            "test model `tiny-random-<arch>`), a Hugging Face hub id (`org/name`, needs network), "
            "or a local directory or `.gguf` file under the configured model roots."
        ),
    )
    revision: str | None = Field(None, max_length=128, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; `auto` is float32 on CPU and bfloat16/float16 on an accelerator."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="`auto` picks cuda, then mps, then cpu."
    )
    trust_remote_code: bool = Field(
        False, description="Refused unless the model is on the server's allow-list."
    )


# ------------------------------------------------------------------- dataset


class DatasetSpec(Strict):
    """Which text to run the model on. Exactly one source: `name`, `path`, `rows` or `hub`."""

    name: str | None = Field(
        None,
        max_length=128,
        description="Built-in set: `chatterbot-trivia` (Q/A pairs), `chatterbot-conversations` (text).",
    )
    path: str | None = Field(
        None, max_length=1024, description="Local .jsonl/.csv/.parquet/.txt file under the data roots."
    )
    rows: list[dict[str, Any]] | None = Field(
        None, max_length=10_000, description="Inline rows, e.g. `[{\"text\": \"...\"}]`."
    )
    hub: str | None = Field(None, max_length=256, description="Hugging Face datasets id (needs network).")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Map from our field names (`text`, `question`, `answer`) to the source's columns, "
            "e.g. `{\"text\": \"content\"}`."
        ),
    )
    split: str = Field("train", max_length=64)
    limit: int = Field(64, ge=1, le=MAX_EXAMPLES, description="Examples to use after shuffling.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Shuffle seed.")
    max_tokens: int = Field(256, ge=8, le=MAX_TOKENS, description="Examples are truncated to this many tokens.")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - {"text", "question", "answer"}
        if unknown:
            raise ValueError(f"unknown field names {sorted(unknown)}; allowed: text, question, answer")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [k for k in ("name", "path", "rows", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one dataset source: name, path, rows or hub"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.rows is not None and not self.rows:
            raise ValueError("rows is empty")
        return self


# -------------------------------------------------------------------- stages

Site = Literal["block_output", "mlp_activation", "attention_output"]


class ProfileOptions(Strict):
    """Hook-based activation profiler (METHOD.md section 1)."""

    sites: list[Site] = Field(
        default_factory=lambda: ["block_output"], min_length=1, description="Capture sites hooked in every block."
    )
    batch_size: int = Field(8, ge=1, le=256)
    histogram_bins: int = Field(
        64,
        ge=8,
        le=1024,
        description="Minimum number of log-spaced |a| histogram bins over 2^-27..2^16; rounded up to a power "
        "of two per octave (64 gives 86 bins).",
    )
    skip_positions: int = Field(
        0, ge=0, le=64, description="Leading token positions excluded from every statistic."
    )

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("sites must not repeat")
        return value


class AvssOptions(Strict):
    """AVSS layer scores, METHOD.md section 2 (equations 1-8)."""

    site: Site = Field("block_output", description="Capture site the score is computed on.")
    variance_mode: Literal["elements", "pooled"] = "elements"
    sparsity_threshold: Literal["relative", "absolute"] = Field(
        "relative", description="`absolute`: |a| < sparsity_eps; `relative`: |a| < sparsity_rel_eps x reference."
    )
    sparsity_eps: float = Field(1e-5, gt=0, lt=1e6)
    sparsity_rel_eps: float = Field(0.01, gt=0, lt=1e3)
    sparsity_reference: Literal["rms", "median"] = Field(
        "rms", description="What a relative threshold is relative to: the layer's RMS or median |a|."
    )
    delta: float = Field(1e-6, gt=0, lt=1, description="Guard on the normalized-sparsity denominator.")
    prune_fraction: float = Field(0.25, ge=0, lt=1, description="Share of lowest-ranked layers proposed for pruning.")
    plots: bool = Field(True, description="Render per-layer plots (PNG and SVG) as artifacts.")


class StagesSpec(Strict):
    """Which analyses to run; a stage pulls in the stages it needs (avss runs the profiler)."""

    profile: ProfileOptions | None = None
    avss: AvssOptions | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> StagesSpec:
        if not self.requested():
            raise ValueError("ask for at least one stage, e.g. {\"avss\": {}}")
        return self

    def requested(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


LabelKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-/]{1,63}$")]


class AnalysisSpec(Strict):
    """A layer-analysis job: model, data, stages and free labels."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec
    stages: StagesSpec
    labels: dict[LabelKey, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=32, description="Free key/values for dashboards and registries."
    )
    gate_policy: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}(@[0-9]{1,9})?$",
        description=(
            "A gate policy (`name` or `name@version`) evaluated when the job succeeds; the verdict is stored "
            "and sent to webhooks. An unknown policy gives a failing verdict that says so."
        ),
    )


# ----------------------------------------------------------------- responses


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Progress(BaseModel):
    stage: str | None = None
    done: int = 0
    total: int = 0


class JobError(BaseModel):
    type: str
    detail: str


class AnalysisOut(BaseModel):
    id: str
    state: JobState
    spec: AnalysisSpec
    labels: dict[str, str]
    progress: Progress
    attempt: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    error: JobError | None
    warnings: list[str]
    summary: dict[str, Any]
    links: dict[str, str]


class AnalysisPage(BaseModel):
    items: list[AnalysisOut]
    next_page_token: str | None


class LayerRowOut(BaseModel):
    stage: str
    scorer: str
    layer: int
    block_name: str
    values: dict[str, float | None]


class LayerTable(BaseModel):
    analysis_id: str
    items: list[LayerRowOut]


class MetricOut(BaseModel):
    stage: str
    scope: str
    name: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int | None


class MetricTable(BaseModel):
    analysis_id: str
    items: list[MetricOut]


class ArtifactOut(BaseModel):
    name: str
    stage: str
    media_type: str
    size: int
    created_at: dt.datetime
    download_url: str


class ArtifactList(BaseModel):
    analysis_id: str
    items: list[ArtifactOut]
