"""Request and response models of the public API.

Request models are strict (`extra="forbid"`): an unknown field or an impossible
value is a 422 problem+json that names the field. The worker reads the same
models back from the stored spec, so the API and the job agree on every default.
"""

from __future__ import annotations

import datetime as dt
import enum
import unicodedata
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import WithJsonSchema

from app import layervalues
from app.config import JUDGE_NAME

MAX_EXAMPLES = 100_000
PATCH_ARTIFACT = "mitigation.safetensors"  # the mitigate stage's patch; `model.patch` applies it
MAX_TOKENS = 8192

MitigationMethodName = Literal["contrastive", "dola", "steering"]  # the registry worker.mitigation.methods.METHODS


def patch_artifact_name(method: str | None = None) -> str:
    """The mitigate stage's patch artifact: `mitigation.safetensors` when the analysis ran one
    method, `mitigation-<method>.safetensors` per method when it compared several."""
    return PATCH_ARTIFACT if method is None else f"mitigation-{method}.safetensors"


def patch_artifact_method(name: str) -> str | None:
    """The method of a per-method patch artifact (`patch_artifact_name`'s inverse); None for others."""
    if name.startswith("mitigation-") and name.endswith(".safetensors"):
        return name.removeprefix("mitigation-").removesuffix(".safetensors")
    return None


class Strict(BaseModel):
    # A float must be finite: `"inf"`/`"nan"` as text as well (JSON's Infinity/NaN/1e400 are refused
    # before validation, app/api/guard.py); the stored spec would hold null instead.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------- model


DeviceMapName = Literal["auto", "balanced", "balanced_low_0", "sequential"]
DeviceMapKey = Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9_.]*$")]
DeviceMapTarget = Annotated[int, Field(ge=0, le=255)] | Annotated[str, Field(pattern=r"^(cpu|disk|cuda:\d{1,3})$")]
MaxMemoryKey = Annotated[str, Field(pattern=r"^(cpu|\d{1,3})$")]
MaxMemoryValue = Annotated[int, Field(gt=0)] | Annotated[
    str, Field(max_length=32, pattern=r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$")
]


DEFAULT_MODEL = "smollm2-135m"
REGISTERED_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}$"
ALIAS_NAME = r"^[A-Za-z][A-Za-z0-9_\-]{0,127}$"
MLFLOW_MODEL_URI = r"^models:/[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}(/[0-9]{1,9}|@[A-Za-z][A-Za-z0-9_\-]{0,127})$"


class ModelSpec(Strict):
    """Which model to analyse."""

    name: str = Field(
        DEFAULT_MODEL,
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
        "auto",
        description="`auto` picks cuda, then mps, then cpu; a job routed to the `gpu` queue (see README, "
        "queue routing) never falls back to cpu: it fails `gpu_unavailable`.",
    )
    device_map: DeviceMapName | dict[DeviceMapKey, DeviceMapTarget] | None = Field(
        None,
        description=(
            "Spread the model over several devices with accelerate: `auto`, `balanced`, `balanced_low_0`, "
            "`sequential`, or an explicit map from module name (e.g. `model.layers.3`) to a GPU index, "
            "`cuda:N`, `cpu` or `disk` (offloaded to the worker's cache and streamed in per forward). "
            "Unset: the whole model on `device`."
        ),
    )
    max_memory: dict[MaxMemoryKey, MaxMemoryValue] | None = Field(
        None,
        description=(
            "With `device_map`: the most each device may hold, e.g. `{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}` "
            "(GPU index or `cpu`; bytes or a size with a unit). What does not fit goes to disk."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Refused unless the model is on the server's allow-list."
    )
    mlflow: str | None = Field(
        None, max_length=600, pattern=MLFLOW_MODEL_URI,
        description=(
            "Load the model from the MLflow Model Registry instead of `name`: `models:/<name>/<version>` or "
            "`models:/<name>@<alias>` (an alias is resolved when the job loads the model). The registered "
            "artifact must be a transformers model (`mlflow.transformers.log_model`). Needs the server's "
            "LAYERSCOPE_MLFLOW_TRACKING_URI."
        ),
    )
    patch: PatchSpec | None = Field(
        None,
        description=(
            "Tuned layer weights to apply after loading: the `mitigation.safetensors` artifact of a `mitigate` "
            "stage. The patch records the base weights it was made from and is refused on any other base."
        ),
    )

    @model_validator(mode="after")
    def _placement(self) -> ModelSpec:
        if self.mlflow is not None:
            if self.revision is not None or self.name not in (DEFAULT_MODEL, self.mlflow):
                raise ValueError("give either model.name (and revision) or model.mlflow, not both")
            self.name = self.mlflow  # what the analysis is listed under
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory applies to a device_map; set device_map (e.g. \"auto\") as well")
        if self.device in ("cpu", "mps") and isinstance(self.device_map, dict):
            gpus = sorted({str(v) for v in self.device_map.values() if str(v) not in ("cpu", "disk")})
            if gpus:
                raise ValueError(f"device {self.device!r} with a device_map that puts modules on {', '.join(gpus)}")
        if self.device in ("cpu", "mps") and self.max_memory and set(self.max_memory) - {"cpu"}:
            raise ValueError(f"device {self.device!r} with max_memory for GPUs")
        return self


class MlflowVersionRef(Strict):
    """A version of a model in the MLflow Model Registry: `version` or `alias`, exactly one."""

    model: str = Field(pattern=REGISTERED_NAME, description="The registered model's name.")
    version: str | None = Field(None, pattern=r"^[0-9]{1,9}$", description="The version number, e.g. `\"3\"`.")
    alias: str | None = Field(
        None, pattern=ALIAS_NAME, description="An alias (e.g. `candidate`), resolved to a version when the job starts."
    )

    @model_validator(mode="after")
    def _one_of(self) -> MlflowVersionRef:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of version and alias")
        return self

    def uri(self) -> str:
        return f"models:/{self.model}/{self.version}" if self.version else f"models:/{self.model}@{self.alias}"


class RegistrySpec(Strict):
    """Where the analysis reports to: the registered model version it is about."""

    mlflow: MlflowVersionRef = Field(
        description=(
            "On success the results are logged to an MLflow run linked to this version, and each gate verdict "
            "sets `layerscope.*` tags on it (and moves an alias when the policy says so)."
        ),
    )


class PatchSpec(Strict):
    """Where a mitigation patch comes from. Exactly one of `analysis_id` and `path`."""

    analysis_id: str | None = Field(
        None, pattern=r"^[0-9a-fA-F-]{36}$",
        description="A succeeded analysis of the same project whose `mitigate` stage wrote the patch.",
    )
    path: str | None = Field(
        None, max_length=1024, description="A `.safetensors` patch file under the configured model roots."
    )
    method: MitigationMethodName | None = Field(
        None,
        description="Which method's patch, for an `analysis_id` whose mitigate stage compared several methods "
        "(its `mitigation-<method>.safetensors`); with one method, null or that method. The patch's own recipe "
        "must name this method.",
    )

    def artifact_names(self) -> list[str]:
        """The artifacts of `analysis_id` that may hold this patch, in the order tried: the method's
        own file (an analysis that compared methods), then the one-method file."""
        return [patch_artifact_name(self.method), PATCH_ARTIFACT] if self.method else [PATCH_ARTIFACT]

    @model_validator(mode="after")
    def _one_source(self) -> PatchSpec:
        if (self.analysis_id is None) == (self.path is None):
            raise ValueError("give exactly one of patch.analysis_id and patch.path")
        return self


# ------------------------------------------------------------------- dataset


TEXT_FIELDS = ("text", "question", "answer")
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})  # controls, format (zero-width), spaces, marks


def text_value_problem(value: Any, field: str) -> str | None:
    """Why a row's value for our `field` (text, question, answer) cannot be analysed as text, or None.
    Missing (None, NaN) and blank values are fine here (a row needs text or question; the loader
    says so). Text and question must be strings: a number or boolean used to be analysed as
    "5"/"true". A gold answer may be a number or a list of aliases (compared as text), not a
    boolean or an object. Text of only invisible characters (zero-width spaces) gave no token and
    null results."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if field == "answer":  # a gold answer may be a number ("8" legs) or a list of aliases
        aliases = value if isinstance(value, list) and value else [value]
        if all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in aliases):
            value = " ".join(str(a) for a in aliases)
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}.get(
            type(value), type(value).__name__)
        want = "text, a number or a list of them" if field == "answer" else "a string"
        return f"is {kind} ({json_preview(value)}), not text; give it as {want}"
    if value.strip() and all(unicodedata.category(ch) in _INVISIBLE for ch in value):
        shown = ", ".join(sorted({f"U+{ord(ch):04X}" for ch in value if not ch.isspace()}))[:60]
        return f"has no visible character (only {shown}), so the model would see no token"
    return None


def json_preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
DEFAULT_SITES: tuple[Site, ...] = ("block_output",)


class ProfileOptions(Strict):
    """Hook-based activation profiler (docs/method.md section 1)."""

    sites: list[Site] = Field(
        default_factory=lambda: list(DEFAULT_SITES), min_length=1, description="Capture sites hooked in every block."
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
    """AVSS layer scores, docs/method.md section 2 (equations 1-8)."""

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
    exact_sparsity: bool = Field(
        False,
        description="Count a relative threshold's sparsity exactly with a second pass over the data (about twice "
        "the profiling time). Otherwise it is read off a fine |a| histogram around the threshold, and every "
        "sparsity carries the bound on its error (`sparsity_bound`).",
    )
    delta: float = Field(1e-6, gt=0, lt=1, description="Guard on the normalized-sparsity denominator.")
    prune_fraction: float = Field(0.25, ge=0, lt=1, description="Share of lowest-ranked layers proposed for pruning.")
    plots: bool = Field(True, description="Render per-layer plots (PNG and SVG) as artifacts.")


ScorerName = Literal["avss", "gbis", "lrp", "cim", "block_influence", "angular_distance"]
TaskName = Literal["perplexity", "qa", "classification", "multiple_choice", "lm_eval"]
DEFAULT_TASKS: tuple[TaskName, ...] = ("perplexity", "qa")
ALL_SCORERS: tuple[ScorerName, ...] = get_args(ScorerName)  # the order of the scorer registry (a test checks)


class LmEvalOptions(Strict):
    """One lm-evaluation-harness task run on the in-memory model (the `lm_eval` task, README "Evaluation tasks")."""

    task: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="An lm-eval task or group name (e.g. `sciq`, `hellaswag`: their data come from the Hugging Face "
        "hub or its cache), a task shipped with layerscope (`layerscope_sciq_mc`, `layerscope_truthfulqa_mc`: "
        "multiple choice built from a local LitCab-format file given as data_files), or the path of your own task "
        "YAML (ending .yaml/.yml) under the data roots.",
    )
    data_files: str | None = Field(
        None,
        max_length=1024,
        description="A local file under the data roots that replaces the task's `dataset_kwargs.data_files` for the "
        "split it evaluates (for YAMLs with `dataset_path: json`, `csv` or `text`); the shipped tasks need it.",
    )
    limit: int | None = Field(
        None, ge=1, le=100_000, description="First documents evaluated (default: eval_examples, else all)."
    )
    num_fewshot: int | None = Field(None, ge=0, le=64, description="Few-shot examples (default: the task's).")
    batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Fixed batch size; default automatic: the prune batch_size, halved and retried on out-of-memory "
        "(the size that fitted is remembered per model).",
    )
    metric: str | None = Field(
        None,
        max_length=64,
        description="Primary metric (default `acc` when the task has it, else its first metric).",
    )

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not value.strip() or any(ch in value for ch in "\n\r\x00"):
            raise ValueError("task must be an lm-eval task name or a YAML path on one line")
        return value.strip()


class HubPush(Strict):
    """Upload an exported model folder (weights and model card) to the Hugging Face Hub."""

    repo_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$",
        description="`owner/name` of the model repository (created when missing).",
    )
    private: bool = Field(True, description="Create the repository private.")


PUSH_TO_HUB_DESCRIPTION = (
    "Also upload the exported folder (weights and model card, the card as written at export: verdicts pending) "
    "to the Hugging Face Hub; off by default. Needs `export`, a token in the worker's HF_TOKEN and network; "
    "without them, or when the hub refuses, the analysis still succeeds and says why in its warnings."
)


class HealOptions(Strict):
    """LoRA healing of every pruned model after pruning (docs/method.md section 3.5): a fixed budget
    of `steps` optimizer steps on a general text corpus disjoint from the evaluated texts, then every
    task is evaluated again."""

    steps: int = Field(100, ge=1, le=100_000, description="Optimizer steps (the fixed budget).")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="AdamW learning rate of the adapters (constant).")
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: int | None = Field(
        None, ge=1, le=100_000, description="LoRA alpha (the update is scaled by alpha / rank); default 2 x rank."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    targets: Literal["all", "attention", "mlp"] = Field(
        "all",
        description="Which linear layers of every kept block get adapters: the attention projections, the MLP's, "
        "or both (per architecture, `worker.modelzoo.adapters`; a generic model only has `all`).",
    )
    batch_size: int = Field(4, ge=1, le=256, description="Sequences per step.")
    max_tokens: int = Field(
        128, ge=8, le=MAX_TOKENS, description="Sequence length: the corpus is tokenized, joined and cut into "
        "sequences of this many tokens."
    )
    dataset: DatasetSpec | None = Field(
        None,
        description="The healing corpus; default the built-in `chatterbot-conversations` (every line). Any text "
        "that is also an evaluated text (or contains one, or is contained in one) is left out.",
    )
    random_seeds: int | None = Field(
        None, ge=0, le=100, description="How many of the random baseline's seeds are healed (the first ones); "
        "default all."
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Seed of the adapters' initialization and the batch order; default "
        "the prune stage's seed."
    )
    export: bool = Field(
        False, description="Attach the healed model of `export_scorer`, LoRA merged into the weights "
        "(save_pretrained, .tar.gz, with its model card), as the artifact `healed-model-<scorer>.tar.gz`, and "
        "its model card as `healed-model-<scorer>.card.md` (the copy the gate verdicts are written into)."
    )
    export_dtype: Literal["float32", "model"] = Field(
        "float32", description="dtype of the merged export: `float32` (exact; a bfloat16 model's merged weights "
        "rounded back to bfloat16 lose small updates) or the model's own dtype."
    )
    push_to_hub: HubPush | None = Field(None, description=PUSH_TO_HUB_DESCRIPTION)

    @model_validator(mode="after")
    def _push_needs_export(self) -> HealOptions:
        if self.push_to_hub is not None and not self.export:
            raise ValueError("push_to_hub uploads the export: set export to true")
        return self


class PruneOptions(Strict):
    """Layer pruning with retained performance against baseline scorers (docs/method.md section 3)."""

    scorers: list[ScorerName] = Field(
        default_factory=lambda: list(ALL_SCORERS),
        min_length=1,
        description="Rankings to prune by: `avss` (from the avss stage) and baselines computed here.",
    )
    strategy: Literal["fraction", "cumulative", "iterative"] = Field(
        "fraction",
        description="`fraction`: drop floor(fraction x L) lowest-ranked; `cumulative`: drop while C_l <= tau; "
        "`iterative`: appendix H (remove, re-evaluate, restore if the drop exceeds the tolerance).",
    )
    fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of layers dropped (`fraction`); the default layer budget of `iterative`.",
    )
    tau: float = Field(0.25, gt=0, lt=1, description="Cumulative normalized-score threshold (`cumulative`).")
    delta: float | None = Field(
        None,
        ge=0,
        description="`iterative`: absolute tolerated degradation per step, "
        "in metric units; unset = lam x initial metric.",
    )
    lam: float = Field(
        0.05, ge=0, le=10, description="`iterative`: tolerance as a share of the initial metric (eq. 58)."
    )
    budget: int | None = Field(
        None, ge=1, le=10_000, description="`iterative`: most layers removed; default floor(fraction x L)."
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="`iterative`: stop when the relative change between "
        "iterations is below epsilon (eq. 59); off by default.",
    )
    tasks: list[TaskName] = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        min_length=1,
        description="Tasks measured; one the data cannot support (qa without question/answer fields, "
        "classification without labels, multiple_choice without question and choices) is skipped with a "
        "warning. `multiple_choice`: acc and acc_norm (lm-eval's definitions) of the choice of highest "
        "log-likelihood, from rows with `question`, `choices` (a list) and the gold `label` (0-based index) or "
        "`answer` (index or choice text). `lm_eval`: the lm-evaluation-harness task the `lm_eval` options name "
        "(needs them).",
    )
    lm_eval: LmEvalOptions | None = Field(
        None,
        description="The `lm_eval` task: which lm-evaluation-harness task to run, its data file, limit and few-shot "
        "count. Its metrics carry lm-eval's stderr in the result's details and a bootstrap interval over documents.",
    )
    perplexity_dataset: DatasetSpec | None = Field(
        None,
        description="Held-out text for the perplexity task (e.g. rows or a file other than the analysis dataset), "
        "loaded by the pipeline; the scorers and AVSS still rank on the analysis dataset. Default: the "
        "analysis dataset's texts (then the first scoring_examples of them are also what the baselines scored).",
    )
    qa_dataset: DatasetSpec | None = Field(
        None,
        description='Question/answer set for the qa and multiple_choice tasks (e.g. {"name": '
        '"chatterbot-trivia"}), loaded by the pipeline; default: the examples of the analysis dataset that have '
        "question and answer fields (multiple_choice: question and choices).",
    )
    random_seeds: int = Field(
        5, ge=0, le=100,
        description="Seeds of the random-layer baseline: its metric is the median over seeds, with the per-seed "
        "range, and each scorer's `beats_random_share` is the share of seeds it beats.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="First random seed; also the bootstrap seed.")
    scoring_examples: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Texts the baseline scorers run on "
        "(the first ones of the dataset; gbis/lrp need a backward pass, cim L+1 passes).",
    )
    eval_examples: int | None = Field(
        None, ge=1, le=100_000, description="Examples evaluated per task (default all)."
    )
    batch_size: int = Field(8, ge=1, le=256)
    ppl_window: int | None = Field(
        None,
        ge=2,
        le=MAX_TOKENS,
        description="Perplexity window in tokens (default: the model's max positions, at most 1024).",
    )
    ppl_stride: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Window stride (default window // 2)."
    )
    qa_prompt: str = Field(
        "Question: {question}\nAnswer:",
        max_length=2000,
        description="Prompt of the qa task and the context of the multiple_choice task (each choice is "
        'scored as the continuation " " + choice).',
    )
    qa_max_new_tokens: int = Field(24, ge=1, le=512)
    qa_chat_template: bool = Field(
        False, description="Wrap QA prompts in the tokenizer's chat template (instruct models)."
    )
    classification_prompt: str = Field("{text}\nSentiment:", max_length=2000)
    label_words: list[str] | None = Field(
        None,
        min_length=2,
        max_length=100,
        description="Class words a causal LM scores by log-likelihood (class i = word i).",
    )
    angular_positions: Literal["last", "all"] = Field(
        "last",
        description="Tokens angular_distance compares: the "
        "last real token (Gromov et al.) or every real token.",
    )
    lrp_epsilon: float = Field(1e-2, gt=0, le=10, description="Stabilizer of the LRP epsilon rule.")
    timing_runs: int = Field(
        15,
        ge=0,
        le=100,
        description="Timed forward passes per model for the speed-up: the median ratio with a 95% bootstrap "
        "interval over the runs (3 or more), flagged when it includes 1.0; 0 = do not measure.",
    )
    timing_batch_size: int = Field(4, ge=1, le=256)
    curve_blocks: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        default_factory=list,
        max_length=32,
        description="Pruning trade-off curve: retained performance after removing each of these numbers of "
        "blocks (e.g. [1, 2, 4, 8]), per scorer (the first k of its ranking: one ranking reused) and for the "
        "random control (the first k of each seed's random order, median over seeds), on every task, with "
        "paired intervals; plotted as prune_tradeoff.png/.svg. Counts not below the layer count are skipped "
        "with a warning; [] = no curve.",
    )
    n_boot: int = Field(
        1000, ge=0, le=100_000,
        description="Bootstrap resamples of each 95% interval (retained performance: paired over the examples).",
    )
    export: bool = Field(
        False, description="Attach the pruned model (save_pretrained, .tar.gz, with its model card) as the "
        "artifact `pruned-model-<scorer>.tar.gz`, and its model card as `pruned-model-<scorer>.card.md` (the "
        "copy the gate verdicts are written into)."
    )
    export_scorer: ScorerName = Field("avss", description="Whose pruned model is exported.")
    export_max_bytes: int = Field(
        2 * 1024**3, ge=1, description="Skip the export (with a warning) above this estimated size."
    )
    push_to_hub: HubPush | None = Field(None, description=PUSH_TO_HUB_DESCRIPTION)
    heal: HealOptions | None = Field(
        None, description="LoRA healing of each pruned model and of the random control, then every task again; "
        "off by default."
    )

    @field_validator("scorers", "tasks")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat")
        return value

    @field_validator("curve_blocks")
    @classmethod
    def _curve_counts(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> PruneOptions:
        if "{question}" not in self.qa_prompt:
            raise ValueError("qa_prompt must contain {question}")
        if "{text}" not in self.classification_prompt:
            raise ValueError("classification_prompt must contain {text}")
        if self.ppl_window is not None and self.ppl_stride is not None and self.ppl_stride > self.ppl_window:
            raise ValueError("ppl_stride must not exceed ppl_window")
        if ("lm_eval" in self.tasks) != (self.lm_eval is not None):
            raise ValueError(
                "the lm_eval task needs lm_eval options (e.g. {\"task\": \"sciq\"}), and lm_eval options need "
                "\"lm_eval\" in tasks"
            )
        if (self.export or (self.heal is not None and self.heal.export)) and self.export_scorer not in self.scorers:
            raise ValueError("export_scorer must be one of scorers")
        if self.push_to_hub is not None and not self.export:
            raise ValueError("push_to_hub uploads the export: set export to true")
        return self


Detector = Literal[
    "sequence_likelihood", "max_sequence_probability", "max_sequence_probability_no_end", "perplexity",
    "mean_token_entropy", "p_ik", "verbalized", "self_consistency", "semantic_consistency", "length", "eavss_probe",
    "best_layer_probe", "all_layers_probe",
]
CorrectnessRule = Literal["exact", "contains", "token_f1", "rouge_l", "judge"]
DEFAULT_RULES: tuple[CorrectnessRule, ...] = ("exact", "contains", "token_f1")
DEFAULT_EVAL_DETECTORS: tuple[Detector, ...] = ("sequence_likelihood", "p_ik", "verbalized")

ALL_DETECTORS: list[Detector] = [
    "sequence_likelihood", "max_sequence_probability", "max_sequence_probability_no_end", "perplexity",
    "mean_token_entropy", "p_ik", "verbalized", "self_consistency", "semantic_consistency", "length", "eavss_probe",
    "best_layer_probe", "all_layers_probe",
]


LEGACY_JUDGE = "free-url-judge-removed"  # what a stored spec from before named judges reads as
_LEGACY_JUDGE_FIELDS = ("base_url", "model", "api_key_env", "timeout_s", "retries")


class JudgeOptions(Strict):
    """A correctness judge configured on the server, by name.

    Which endpoints exist, with which model and which secret, is the operator's configuration
    (`LAYERSCOPE_JUDGES`); a spec cannot give a URL or an environment variable."""

    name: str = Field(
        ..., pattern=JUDGE_NAME,
        description="A judge this server's operator configured in `LAYERSCOPE_JUDGES` (an unknown name is a "
        "422 listing the configured ones). Its endpoint, model and API key are server configuration.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_endpoint(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in _LEGACY_JUDGE_FIELDS):
            return data
        if (info.context or {}).get("stored"):
            # A job stored before judges were named: it keeps its shape but can only fail
            # (`judge_not_configured`); the URL and variable it named are never used.
            return {"name": LEGACY_JUDGE}
        given = sorted(k for k in data if k in _LEGACY_JUDGE_FIELDS)
        raise ValueError(
            f"judge endpoints are server configuration: give judge.name, one of the judges the operator "
            f"configured (LAYERSCOPE_JUDGES), not {', '.join(given)}"
        )


class HallucinationOptions(Strict):
    """Hallucination analysis, docs/method.md sections 4-6 (equations 9-12, paper table 2, appendix A)."""

    # data split and prompt
    test_fraction: float = Field(
        0.5, gt=0, lt=1,
        description="Share of the dataset's distinct questions held out for scoring detectors; "
        "the rest (training split) gives the few-shot prompt and trains the probes.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Split, shots, sampling, CV folds and bootstrap.")
    n_shots: int = Field(15, ge=0, le=64, description="Few-shot examples from the training split (LitCab: 15).")
    instruction: str = Field(
        "Answer each question with a short answer.", max_length=1000,
        description="First line of the prompt (empty: none).",
    )
    use_chat_template: bool = Field(
        False, description="Format the shots as chat turns when the tokenizer has a chat template."
    )
    max_new_tokens: int = Field(32, ge=1, le=256, description="Answer cap; answers also stop at a newline.")
    batch_size: int = Field(8, ge=1, le=256, description="Generation batch (rows).")
    # correctness (docs/method.md section 6)
    correctness_rules: list[CorrectnessRule] = Field(
        default_factory=lambda: list(DEFAULT_RULES), min_length=1,
        description="Tried in order; an answer is correct when one of them says so.",
    )
    contains_max_tokens: int = Field(5, ge=1, le=64)
    f1_threshold: float = Field(0.5, gt=0, le=1)
    rouge_threshold: float = Field(0.3, ge=0, lt=1)
    judge: JudgeOptions | None = Field(
        None, description="A judge configured on the server, by name (`{\"name\": \"...\"}`); off unless given; "
        "adds the `judge` rule.",
    )
    # detectors (docs/method.md section 5)
    detectors: list[Detector] = Field(default_factory=lambda: list(ALL_DETECTORS), min_length=1)
    self_consistency_k: int = Field(5, ge=2, le=32)
    self_consistency_temperature: float = Field(1.0, gt=0, le=5)
    verbalized_max_new_tokens: int = Field(8, ge=1, le=32)
    probe_l2: float | None = Field(
        None, gt=0, le=1e6, description="L2 strength of every probe; null: chosen by 3-fold CV on the training split."
    )
    # layer scores (docs/method.md section 4)
    site: Site = Field("block_output", description="Capture site of the layer scores and the layer probes.")
    token_scope: Literal["answer", "all"] = Field(
        "answer", description="Profile the answer tokens only, or every token of prompt + answer."
    )
    profile_context: Literal["prompt", "question"] = Field(
        "prompt",
        description="What precedes the answer when profiling: the full generation prompt (the context the "
        "model answered in; one forward pass over the few-shot prompt per answer) or only "
        "`Question: q\\nAnswer:` (about n_shots times cheaper, answer tokens read out of their context).",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="HCS = alpha nHSAV + (1 - alpha) nHSS (eq. 11).")
    beta: float = Field(0.5, ge=0, le=1, description="Weight of nAVSS when combine = weighted_sum.")
    combine: Literal["product", "weighted_sum"] = "product"
    zero_sum: Literal["uniform", "zeros"] = "uniform"
    min_group: int = Field(20, ge=1, le=100_000, description="Warn when a group has fewer answers.")
    top_k_layers: int = Field(3, ge=1, le=256, description="Layers (by EAVSS) behind the eavss_probe.")
    probe_window: int = Field(
        1, ge=1, le=16,
        description="best_layer_probe also considers every run of this many consecutive layers (concatenated); "
        "1: single layers only. Chosen by cross-validation on the training split.",
    )
    layer_probes: bool = Field(True, description="The per-layer probe table (appendix A).")
    # metrics (docs/method.md section 5)
    p_values: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=10)
    q_values: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=10)
    n_boot: int = Field(1000, ge=0, le=10_000)

    @field_validator("correctness_rules", "detectors")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat")
        return value

    @field_validator("p_values")
    @classmethod
    def _p_range(cls, value: list[float]) -> list[float]:
        if any(not (0.0 <= p <= 1.0) for p in value):
            raise ValueError("every p must be in [0, 1]")
        return value

    @field_validator("q_values")
    @classmethod
    def _q_range(cls, value: list[float]) -> list[float]:
        if any(not (0.0 < q <= 1.0) for q in value):
            raise ValueError("every q must be in (0, 1]")
        return value

    @model_validator(mode="after")
    def _judge_rule(self) -> HallucinationOptions:
        if "judge" in self.correctness_rules and self.judge is None:
            raise ValueError("correctness rule 'judge' needs a judge: judge.name, one configured on the server")
        if self.judge is not None and "judge" not in self.correctness_rules:
            self.correctness_rules = [*self.correctness_rules, "judge"]
        return self



class MitigateOptions(Strict):
    """Mitigation of the most hallucination-prone layers, docs/method.md section 7: `method` at the
    top-k EAVSS layers, and the same method at as many random other layers as a control.

    Data: the hallucination stage's split (same `test_fraction` and `seed`). The training
    split's distinct questions are divided into a tuning part (`tune_fraction`, of which
    `validation_fraction` decides early stopping) and a probe part that trains the detectors
    of the before/after evaluation; the test split is never trained on."""

    method: MitigationMethodName | list[MitigationMethodName] = Field(
        "contrastive",
        description="The mitigation method: `contrastive` (tune the chosen blocks with InfoNCE + LM loss), "
        "`dola` (layer-contrast decoding with the chosen blocks as premature layers; no weight changes) or "
        "`steering` (add a direction to the chosen blocks' outputs; no weight changes, strength chosen on the "
        "validation questions). A list compares several side by side in one analysis: one base evaluation, the "
        "same layers, control layers, tuning data and test questions for each; the variants are then named "
        "`<method>_eavss` and `<method>_random` (one method: `eavss` and `random`) and each method writes its own "
        "patch, `mitigation-<method>.safetensors` (one method: `mitigation.safetensors`).",
    )
    layers: list[Annotated[int, Field(ge=0, le=4095)]] | None = Field(
        None, min_length=1, max_length=256,
        description="Block indices the method works at (tuned, steered, or DoLa's premature layers); null: the "
        "top `top_k` layers by EAVSS.",
    )
    top_k: int = Field(2, ge=1, le=256, description="Layers to choose by EAVSS when `layers` is null.")
    temperature: float = Field(0.1, gt=0, le=10, description="InfoNCE temperature tau.")
    pooling: Literal["unflagged_mean", "last_token", "mean"] = Field(
        "unflagged_mean",
        description="How a span of hidden states becomes one vector (the contrastive anchor and candidates, the "
        "steering direction): `unflagged_mean` averages the positions that are not massive activations (largest "
        "|h| over 100 x the batch's median |h|, the profiler's rule); `last_token` takes the span's last token; "
        "`mean` averages every position (before the repair: SmolLM2's first-token activation swamps it).",
    )
    lm_weight: float = Field(
        1.0, ge=0, le=100, description="Weight beta of the language-modeling loss on the gold answer."
    )
    dola_alpha: float = Field(
        0.1, ge=0, le=1,
        description="`dola`: the adaptive plausibility constraint: only tokens with at least dola_alpha x the final "
        "layer's top probability can be chosen (0: every token).",
    )
    dola_repetition_penalty: float = Field(
        1.0, ge=1, le=10,
        description="`dola`: theta of the repetition penalty on the contrast scores of tokens already in the prompt "
        "or answer (DoLa uses 1.2 for open-ended text; 1: off).",
    )
    steering_strengths: list[Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0], min_length=1, max_length=32,
        description="`steering`: strengths alpha tried, in standard deviations of the tuning answers' projections "
        "on the direction; the one with the best validation multiple-choice accuracy is kept (ties: the "
        "smaller; 0, the base model, is always tried).",
    )
    steering_max_logprob_drop: float = Field(
        1.0, ge=0, le=1000,
        description="`steering`: a strength is only eligible when the validation gold answers' mean log-probability "
        "per token stays within this many nats of the unsteered model's (a fluency guard; a strength that scores "
        "better but breaks it is reported in the warnings).",
    )
    learning_rate: float = Field(5e-5, gt=0, le=1.0)
    epochs: int = Field(3, ge=1, le=100, description="At most this many passes over the tuning questions.")
    patience: int = Field(
        1, ge=1, le=100, description="Stop after this many epochs without a lower validation loss."
    )
    batch_size: int = Field(8, ge=1, le=256, description="Questions per optimizer step.")
    negatives: int = Field(
        3, ge=1, le=32,
        description="Wrong answers sampled from other questions per question, besides the model's own "
        "hallucinated answer when it gave one.",
    )
    tune_fraction: float = Field(0.5, gt=0, lt=1, description="Share of the training questions used for tuning.")
    validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of the tuning questions held out for early stopping."
    )
    max_tokens: int = Field(128, ge=8, le=MAX_TOKENS, description="Cap on a training sequence (question + answer).")
    control: bool = Field(
        True, description="Also apply each method at the same number of randomly chosen other layers, with the same "
        "data and budget (the random-layer control)."
    )
    eval_detectors: list[Detector] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_DETECTORS), min_length=1,
        description="Detectors scored before and after tuning (the hallucination stage's definitions).",
    )
    perplexity_dataset: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(name="chatterbot-conversations", limit=64),
        description="General text whose perplexity shows damage done by tuning.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Data order, sampled negatives, control layers, bootstrap.")
    n_boot: int = Field(1000, ge=0, le=10_000)

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("must not repeat")
        return value

    @field_validator("eval_detectors")
    @classmethod
    def _unique_detectors(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat")
        return value

    @field_validator("method")
    @classmethod
    def _methods_listed_once(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one method")
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("must not repeat")
        return value

    @property
    def methods(self) -> list[str]:
        """The methods to run, in the order given."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @property
    def compares_methods(self) -> bool:
        """Several methods in one analysis (variant and artifact names carry the method)."""
        return isinstance(self.method, list) and len(self.method) > 1


class StagesSpec(Strict):
    """Which analyses to run; a stage pulls in the stages it needs (avss runs the profiler)."""

    profile: ProfileOptions | None = None
    avss: AvssOptions | None = None
    prune: PruneOptions | None = None
    hallucination: HallucinationOptions | None = None
    mitigate: MitigateOptions | None = None

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
            "A gate policy (`name` or `name@version`) evaluated when the job succeeds; the verdict is stored, "
            "sent to webhooks and written into the analysis's standalone model-card artifacts "
            "(`mitigation_card*.md`, `<export>.card.md`). An unknown policy gives a failing verdict that says so."
        ),
    )

    registry: RegistrySpec | None = Field(
        None,
        description=(
            "A registered model version this analysis is about (`{\"mlflow\": {\"model\": \"m\", \"version\": \"3\"}}`). "
            "Without `model`, the model is loaded from that version. Needs the server's "
            "LAYERSCOPE_MLFLOW_TRACKING_URI."
        ),
    )

    @model_validator(mode="after")
    def _registry_subject(self) -> AnalysisSpec:
        if self.registry is not None and "model" not in self.model_fields_set:
            self.model = ModelSpec(mlflow=self.registry.mlflow.uri())
        return self

    @classmethod
    def from_stored(cls, data: Any) -> AnalysisSpec:
        """A spec read back from the database, also one stored by an earlier version (a judge
        given by URL then reads as an unconfigured judge name: the job fails, the URL is unused)."""
        return cls.model_validate(data, context={"stored": True})


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
    spec_rows_cut: bool = Field(
        False, description="In a list answer (`view=brief`): the spec's inline dataset rows were cut to the first "
        "few; the single-analysis route gives them whole.",
    )
    labels: dict[str, str]
    progress: Progress
    attempt: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    error: JobError | None
    warnings: list[str]
    summary: dict[str, Any] = Field(
        description="One entry per finished stage, plus `routing` (the worker queue chosen at submit and why) "
        "and `runtime` (where the job ran: worker, queue, device, dtype, GPU name, CUDA_VISIBLE_DEVICES, "
        "torch/CUDA/transformers/accelerate versions, the device_map placement)."
    )
    links: dict[str, str]


class AnalysisPage(BaseModel):
    items: list[AnalysisOut]
    next_page_token: str | None


class LayerRowOut(BaseModel):
    stage: str
    scorer: str
    layer: int
    block_name: str
    values: Annotated[dict[str, layervalues.LayerValue], WithJsonSchema(layervalues.json_schema())]


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


class Estimate(BaseModel):
    """A value with its bootstrap 95% interval and the number of answers behind it."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


Verdict = Literal["better", "worse", "not_distinguishable", "no_interval", "undefined"]


class LeaderboardComparison(BaseModel):
    reference: str = Field(description="The reference detector (the length baseline or the best toolkit estimator).")
    auroc_difference: Estimate = Field(
        description="AUROC(this detector) - AUROC(reference) on the test answers, with a paired bootstrap interval."
    )
    verdict: Verdict = Field(
        description="`better` / `worse`: the interval of the difference excludes 0; `not_distinguishable`: it holds 0; "
        "`no_interval`: n_boot = 0; `undefined`: AUROC is undefined (one class)."
    )


class LeaderboardRow(BaseModel):
    rank: int = Field(description="1 = highest test AUROC; detectors with an undefined AUROC come last.")
    detector: str
    toolkit: bool = Field(description="A standard white-box estimator (lm-polygraph's MSP, Perplexity, MeanTokenEntropy).")
    reference: list[Literal["length", "toolkit"]] = Field(description="Which reference row this detector is, if any.")
    metrics: dict[str, Estimate | None] = Field(description="auroc, ece, brier, acc@<q>, cov@<p> (test split).")
    vs_length: LeaderboardComparison | None = Field(description="Against the length-only baseline (None for itself).")
    vs_toolkit: LeaderboardComparison | None = Field(
        description="Against the best toolkit estimator (None for itself or without one)."
    )


class Leaderboard(BaseModel):
    """Every hallucination detector of one analysis, sorted by test AUROC, with two reference rows."""

    analysis_id: str
    split: str = Field(description="Where the detectors are scored: the test split (probes train on the other).")
    n: int = Field(description="Test answers behind every value.")
    sorted_by: str
    metrics: list[str]
    length_baseline: str | None = Field(description="The length-only baseline detector, when it ran.")
    best_toolkit: str | None = Field(
        description="The toolkit estimator with the highest test AUROC (the strongest off-the-shelf rival)."
    )
    toolkit_estimators: list[str]
    comparison: str
    rows: list[LeaderboardRow]


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
