"""`lm_eval`: one lm-evaluation-harness task run on the in-memory model (causal LMs).

- Which task (`PruneOptions.lm_eval.task`): an lm-eval task or group name, a task shipped in
  `worker/evaluation/lm_eval_tasks/` (on every include path: `layerscope_sciq_mc`,
  `layerscope_truthfulqa_mc`), or the path of a task YAML under the data roots. An unknown
  name fails the job with `task_not_found` (closest names and how to fix in the message).
- Data: `lm_eval.data_files`, a file under the data roots, replaces the task's
  `dataset_kwargs.data_files` for the split it evaluates (its test split, else validation),
  so a YAML with `dataset_path: json`/`csv`/`text` runs offline on local files; standard
  tasks need the Hugging Face hub or its cache (`dataset_not_found` otherwise). The prune
  stage resolves both paths under the data roots (`resolve_paths`) before anything runs.
- Model: lm-eval's `HFLM` wraps the model object itself (`pretrained=<model>`, a copy of the
  tokenizer, since HFLM may set its pad token), so the original and each pruned model are
  what is evaluated, in place. Each forward pass checks for cancellation and reports
  progress. lm-eval leaves Python/NumPy/torch's global seeds alone here (`*_random_seed=None`);
  few-shot sampling uses the prune seed.
- Batch size: `lm_eval.batch_size`, else automatic: the prune `batch_size`, or the smaller
  size remembered for this model (`worker.lm.batching`), halved and the run repeated on
  out-of-memory (lm-eval's own "auto" probes at the model's maximum length, which on a CPU is
  a forward pass of thousands of tokens per row).
- Results: lm-eval's metrics and stderr (its `results`, `n-shot`, `versions`) go in
  `details["lm_eval"]`. Per document (`log_samples=True`, ordered by `doc_id`, subtasks of a
  group one after another), every metric whose per-document values are numbers and average
  to lm-eval's value becomes a metric of ours with a bootstrap interval over documents and a
  `mean_of` statistic (the paired retained interval reads it); other metrics (corpus-level
  F1, perplexities) keep lm-eval's value without an interval. Metric names are lm-eval's
  (`acc`, `acc_norm`, ...), with `/<filter>` appended for filters other than `none`. For a
  group the value is the mean over all its documents. Primary: `lm_eval.metric`, else `acc`
  when present, else the first metric.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.evaluation.tasks.base import (
    Task,
    TaskResult,
    TaskRun,
    job_context,
    mean_metric,
    mean_of,
    metric,
    require_causal,
)
from worker.lm.batching import AutoBatch, is_out_of_memory, release_memory
from worker.lm.model import is_causal_lm
from worker.stage import JobCancelled, JobContext, JobFailed, finite_or_none

if TYPE_CHECKING:
    from app.config import Settings
    from app.schemas import LmEvalOptions, PruneOptions

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
DATA_PLACEHOLDER = "DATA_FILE"
YAML_SUFFIXES = (".yaml", ".yml")
LOCAL_BUILDERS = ("json", "csv", "text", "parquet")  # Hugging Face datasets' packaged builders of local files
FIX_HINT = (
    "give an lm-eval task name (`lm_eval --tasks list` prints them), a shipped one (layerscope_sciq_mc, "
    "layerscope_truthfulqa_mc) or the path of a task YAML under the data roots"
)


def is_yaml_path(task: str) -> bool:
    return task.lower().endswith(YAML_SUFFIXES)


# ----------------------------------------------------------------- which task


def resolve_paths(options: PruneOptions, settings: Settings) -> PruneOptions:
    """`options` with `lm_eval.task` (when a YAML path) and `lm_eval.data_files` resolved
    under the data roots (`path_not_allowed`, `task_not_found`, `dataset_not_found`)."""
    from worker.datasets.sources import _resolve_data_path

    lm = options.lm_eval
    if lm is None:
        return options
    task = lm.task
    if is_yaml_path(task):
        try:
            task = str(_resolve_data_path(task, settings))
        except JobFailed as exc:
            code = "task_not_found" if exc.error_type == "dataset_not_found" else exc.error_type
            raise JobFailed(code, f"lm_eval.task: {exc.detail}") from exc
    data_files = str(_resolve_data_path(lm.data_files, settings)) if lm.data_files else None
    return options.model_copy(update={"lm_eval": lm.model_copy(update={"task": task, "data_files": data_files})})


@functools.lru_cache(maxsize=2)
def task_manager(defaults: bool = True) -> Any:
    """lm-eval's task index, built once per process: the shipped tasks, with lm-eval's own
    (`defaults`; indexing its thousands of YAMLs takes seconds to a minute) or without."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(SHIPPED_DIR), include_defaults=defaults)


def manager_for(task: str) -> Any:
    """The smallest index that knows `task`: the shipped one for a shipped name or a YAML path."""
    shipped = task_manager(False)
    return shipped if is_yaml_path(task) or task in shipped.task_index else task_manager(True)


def _load_yaml(path: Path, resolve_func: bool = True) -> dict[str, Any]:
    """A task YAML with its includes; `resolve_func` imports its `!function` helpers."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=resolve_func)
    except Exception as exc:  # yaml errors, a missing include or !function module
        raise JobFailed("task_invalid", f"lm_eval task YAML {path.name} could not be read: {exc}") from exc
    return dict(cfg)


def task_spec(lm: LmEvalOptions) -> tuple[str, str | dict[str, Any]]:
    """(task name, what `simple_evaluate` is given: a name, a YAML path or a config dict)."""
    tm = manager_for(lm.task)
    yaml_path: Path | None
    if is_yaml_path(lm.task):
        yaml_path = Path(lm.task)
        if not yaml_path.is_file():
            raise JobFailed("task_not_found", f"lm_eval.task: no file {lm.task!r}; {FIX_HINT}")
        cfg = _load_yaml(yaml_path, resolve_func=lm.data_files is not None)
        name = cfg.get("task") or cfg.get("group")
        if not isinstance(name, str):
            raise JobFailed("task_invalid", f"lm_eval task YAML {yaml_path.name} names no `task` (or `group`)")
    else:
        name = lm.task
        entry = tm.task_index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.6)
            raise JobFailed(
                "task_not_found",
                f"no lm-eval task {name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                + f"; {FIX_HINT}",
            )
        yaml_path = Path(entry.yaml_path) if entry.yaml_path else None
        is_task = yaml_path is not None and "task" in _peek(yaml_path)
        cfg = _load_yaml(yaml_path, resolve_func=lm.data_files is not None) if yaml_path and is_task else {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if lm.data_files is None:
        if DATA_PLACEHOLDER in str(files):
            raise JobFailed(
                "task_invalid",
                f"lm-eval task {name!r} reads a local file: set lm_eval.data_files to it (under the data roots), "
                "e.g. sciq/validation.txt",
            )
        return name, (str(yaml_path) if is_yaml_path(lm.task) else name)
    if not cfg or "task" not in cfg:
        raise JobFailed(
            "task_invalid", f"lm_eval.data_files replaces one task's data files; {name!r} is a group or has no YAML"
        )
    if cfg.get("dataset_path") not in LOCAL_BUILDERS:
        raise JobFailed(
            "task_invalid",
            f"lm_eval.data_files replaces the local files of a task whose dataset_path is one of "
            f"{', '.join(LOCAL_BUILDERS)}; {name!r} reads {cfg.get('dataset_path')!r}: copy its YAML with "
            "dataset_path: json and give that YAML as lm_eval.task",
        )
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise JobFailed("task_invalid", f"lm-eval task {name!r} has neither a test nor a validation split")
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": {split: lm.data_files}}
    cfg.pop("dataset_name", None)  # a packaged builder's config name would be a hub set's subset
    return name, cfg


def _peek(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return dict(load_yaml(path, resolve_func=False, recursive=False))
    except Exception:
        return {}


# ----------------------------------------------------------------- running


def _job_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int, ctx: JobContext, stage: str) -> Any:
    """lm-eval's HFLM on the model object, checking for cancellation and reporting progress
    on every forward pass (rows scored out of requests seen so far)."""
    from lm_eval.models.huggingface import HFLM

    class JobLM(HFLM):
        rows = 0
        requests = 0

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.requests += len(requests)
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.requests += len(requests)
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self.requests += len(requests)
            return super().generate_until(requests, disable_tqdm=True)

        def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            ctx.check_cancelled()
            out = super()._model_call(inps, *args, **kwargs)
            self.rows += int(inps.shape[0])
            ctx.progress(stage, min(self.rows, self.requests), max(self.requests, 1))
            return out

        def _model_generate(self, context: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            ctx.check_cancelled()
            out = super()._model_generate(context, *args, **kwargs)
            self.rows += int(context.shape[0])
            ctx.progress(stage, min(self.rows, self.requests), max(self.requests, 1))
            return out

    return JobLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _simple_evaluate(
    model: torch.nn.Module, tokenizer: Any, name: str, spec: str | dict[str, Any], *, manager: Any, limit: int | None,
    num_fewshot: int | None, batch_size: int, auto_batch: bool, ctx: JobContext, stage: str, n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], int]:
    """lm-eval's output and the batch size it ran at (`auto_batch`: halved and rerun on out-of-memory)."""
    import lm_eval

    batcher = AutoBatch("lm_eval", model, batch_size)
    size = batcher.size if auto_batch else batch_size
    while True:
        reason = ""
        try:
            out = lm_eval.simple_evaluate(
                model=_job_lm(model, tokenizer, size, ctx, stage), tasks=[spec], task_manager=manager,
                num_fewshot=num_fewshot, limit=limit, log_samples=True, bootstrap_iters=n_boot,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=seed,
            )
            break
        except (JobFailed, JobCancelled):
            raise
        except Exception as exc:
            if is_out_of_memory(exc) and size > 1 and auto_batch:
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                raise _failure(name, exc) from exc
        batcher._shrink(size, reason)  # remembered for this model, as every AutoBatch workload
        size = batcher.size
        release_memory()
    if not isinstance(out, Mapping) or not out.get("samples"):
        raise JobFailed("task_invalid", f"lm-eval task {name!r} gave no results (no documents?)")
    return dict(out), size


def _failure(name: str, exc: Exception) -> JobFailed:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    kind = type(exc).__name__
    data_like = isinstance(exc, (FileNotFoundError, ConnectionError, OSError)) or any(
        k in kind for k in ("DatasetNotFound", "DatasetGenerationError", "HfHub", "Connection", "Offline")
    )
    if data_like:
        return JobFailed(
            "dataset_not_found",
            f"lm-eval task {name!r} could not load its data ({kind}: {text}); without network to the Hugging Face "
            "hub use a task whose data are local files (lm_eval.data_files, or a YAML with dataset_path: json/csv "
            "and data_files under the data roots) or fill the hub cache on the worker",
        )
    return JobFailed("task_invalid", f"lm-eval task {name!r} failed: {kind}: {text}")


# ----------------------------------------------------------------- results


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite_or_none(float(value))
    return value if value is None or isinstance(value, str) else str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, bool, np.integer, np.floating, np.bool_))


def lm_eval_result(out: Mapping[str, Any], name: str, primary: str | None, n_boot: int, seed: int,
                   batch_size: int) -> TaskResult:
    """Our `TaskResult` from lm-eval's output (module doc)."""
    samples: Mapping[str, list[dict[str, Any]]] = out["samples"]
    results: Mapping[str, Mapping[str, Any]] = out.get("results", {})
    hib_all: Mapping[str, Mapping[str, bool]] = out.get("higher_is_better", {})
    leaves = list(samples)
    # per (metric, filter): the per-document values of every leaf task, in doc_id order
    values: dict[tuple[str, str], list[Any]] = {}
    for leaf in leaves:
        metrics_here = list(hib_all.get(leaf, {}))
        for s in sorted(samples[leaf], key=lambda s: (str(s.get("filter", "none")), int(s.get("doc_id", 0)))):
            filt = str(s.get("filter", "none"))
            for m in metrics_here or list(s.get("metrics", [])):
                if m in s:
                    values.setdefault((m, filt), []).append(s[m])
    metrics: dict[str, Any] = {}
    per_example: dict[str, list[float]] = {}
    statistics: dict[str, Any] = {}
    higher: dict[str, bool] = {}
    for leaf in leaves:
        higher.update({m: bool(v) for m, v in hib_all.get(leaf, {}).items()})
    reported = results.get(name) or (results.get(leaves[0]) if len(leaves) == 1 else {}) or {}
    for (m, filt), vals in values.items():
        ours = m if filt == "none" else f"{m}/{filt}"
        hib = higher.get(m, True)
        lm_value = reported.get(f"{m},{filt}")
        lm_value = float(lm_value) if isinstance(lm_value, (int, float)) else None
        if vals and all(_is_number(v) for v in vals):
            arr = np.asarray(vals, dtype=np.float64)
            mean = float(arr.mean())
            if lm_value is None or len(leaves) > 1 or math.isclose(mean, lm_value, rel_tol=1e-9, abs_tol=1e-12):
                metrics[ours] = mean_metric(ours, arr, n_boot=n_boot, seed=seed, higher_is_better=hib)
                per_example[ours] = arr.tolist()
                statistics[ours] = mean_of(ours)
                continue
        metrics[ours] = metric(ours, lm_value, None, len(vals), hib)
    if not metrics:
        raise JobFailed("task_invalid", f"lm-eval task {name!r} reported no metrics")
    if primary is None:
        primary = "acc" if "acc" in metrics else next(iter(metrics))
    elif primary not in metrics:
        raise JobFailed(
            "task_invalid", f"lm_eval.metric {primary!r} is not a metric of {name!r}; its metrics: {sorted(metrics)}"
        )
    ordered = {primary: metrics[primary], **{k: v for k, v in metrics.items() if k != primary}}
    return TaskResult(
        task="lm_eval",
        primary=primary,
        metrics=ordered,
        per_example=per_example,
        statistics=statistics,
        details={
            "lm_eval_task": name,
            "subtasks": leaves,
            "batch_size": batch_size,
            "lm_eval": _json_safe({
                "results": results,
                "groups": out.get("groups", {}),
                "n-shot": out.get("n-shot", {}),
                "n-samples": out.get("n-samples", {}),
                "versions": out.get("versions", {}),
                "lm_eval_version": out.get("lm_eval_version"),
            }),
        },
    )


def evaluate_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    lm: LmEvalOptions,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    auto_batch: bool = True,
    ctx: JobContext | None = None,
    progress_stage: str = "evaluate:lm_eval",
    n_boot: int = 1000,
    seed: int = 0,
) -> TaskResult:
    """Run the lm-eval task `lm` names on the model object (module doc). Paths in `lm` are
    used as given (the prune stage resolves them under the data roots first). `auto_batch`:
    start at `batch_size` (or the smaller size remembered for this model) and halve on OOM."""
    require_causal(model, "an lm-eval task")
    ctx = job_context(ctx)
    name, spec = task_spec(lm)
    out, size = _simple_evaluate(
        model, tokenizer, name, spec, manager=manager_for(lm.task), limit=limit, num_fewshot=lm.num_fewshot,
        batch_size=batch_size,
        auto_batch=auto_batch, ctx=ctx, stage=progress_stage, n_boot=n_boot, seed=seed,
    )
    return lm_eval_result(out, name, lm.metric, n_boot, seed, size)


@dataclass
class LmEvalData:
    lm: LmEvalOptions
    name: str
    limit: int | None


class LmEval(Task[LmEvalData]):
    name = "lm_eval"
    higher_is_better = True  # of acc and most lm-eval metrics; a result says per metric
    description = "an lm-evaluation-harness task (name or YAML) on the in-memory model, lm-eval's metrics and stderr"

    def prepare(
        self, model: torch.nn.Module, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
        options: PruneOptions,
    ) -> LmEvalData | str:
        if options.lm_eval is None:
            return 'no lm_eval options (e.g. {"task": "sciq"})'
        if not is_causal_lm(model):
            return f"lm-eval's HF wrapper runs causal LMs here; {type(model).__name__} is not one"
        name, _spec = task_spec(options.lm_eval)  # fails now on an unknown task, before any model runs
        limit = options.lm_eval.limit if options.lm_eval.limit is not None else options.eval_examples
        return LmEvalData(options.lm_eval, name, limit)

    def evaluate(
        self, model: torch.nn.Module, tokenizer: Any, data: LmEvalData, options: PruneOptions, run: TaskRun
    ) -> TaskResult:
        limits = [x for x in (data.limit, run.limit) if x is not None]
        return evaluate_lm_eval(
            model, tokenizer, data.lm, limit=min(limits) if limits else None,
            batch_size=data.lm.batch_size or run.batch_size, auto_batch=data.lm.batch_size is None, ctx=run.ctx, progress_stage=run.progress_stage, n_boot=run.n_boot, seed=run.seed,
        )
