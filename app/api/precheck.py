"""Checks at submit that are cheap and certain, so a spec that can only fail is a 422 now.

The worker checks the same again (its settings may differ from the API's); these only refuse
what no worker of this server would run, each a 422 naming the field:

- `stages.hallucination.judge.name`: a judge the operator configured (`LAYERSCOPE_JUDGES`);
- `model.name`: a `tiny-random-*` name that is no built-in, or (without model roots) a name that is
  neither a built-in, a path nor a hub id, or a bare name (no `org/`) within a typo of a built-in
  (`smollm-135m`: did you mean `smollm2-135m`?) (the message lists the built-ins); a local path outside the model roots
  however it is resolved (`app.modelpaths.certainly_outside`; a path that only a symlink inside a
  root leads out of is the worker's to refuse); `model.revision` on a built-in or a local path;
- `model.patch.path`, `dataset.path` (and the qa / perplexity datasets'), `stages.prune.lm_eval.task`
  (a YAML path) and `.data_files`: outside the roots (an unknown lm-eval task name is the worker's
  to refuse, `task_not_found`: the API does not import lm-eval, whose task index takes seconds);
- `model.mlflow`, `registry.mlflow`: only with an MLflow tracking server configured;
- `dataset.name`: a built-in dataset (the message lists them);
- inline `dataset.rows`: a text, question or answer that is not text (`5`, `true`) or has no
  visible character (`app.schemas.text_value_problem`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path

from app.catalog import BUILTIN_DATASETS, BUILTIN_MODELS
from app.config import Settings, unknown_judge
from app.modelpaths import HUB_ID, certainly_outside, local_candidate, looks_like_path
from app.problems import Problem
from app.schemas import TEXT_FIELDS, AnalysisSpec, DatasetSpec, text_value_problem

_MAX_REPORTED = 5


def _did_you_mean(name: str, names: list[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _outside(kind: str, roots: list[Path], env: str) -> str:
    if not roots:
        return f"is a local path, and local {kind} files are disabled on this server (no {env} set)"
    return f"is outside the {kind} roots ({', '.join(str(r) for r in roots)})"


_NO_MLFLOW = ("this server has no MLflow tracking server configured (an operator sets "
              "LAYERSCOPE_MLFLOW_TRACKING_URI and installs layerscope[mlflow])")


def _model_errors(spec: AnalysisSpec, settings: Settings) -> Iterator[tuple[str, str, str]]:
    model = spec.model
    if model.mlflow is not None:
        if not settings.mlflow_tracking_uri:
            yield "model.mlflow", "registry_not_configured", _NO_MLFLOW
        return
    name = model.name.strip()
    builtins = ", ".join(BUILTIN_MODELS)
    if name in BUILTIN_MODELS:
        if model.revision:
            yield "model.revision", "revision_not_supported", (
                f"{name!r} is a built-in model with one version; model.revision applies to hub ids only")
        return
    if name.startswith("tiny-random-"):
        yield "model.name", "model_not_found", (
            f"no built-in model {name!r}{_did_you_mean(name, list(BUILTIN_MODELS))}; built-ins: {builtins}")
        return
    local = local_candidate(name, settings)
    if local is not None:
        if model.revision:
            yield "model.revision", "revision_not_supported", "a local model has one version; model.revision applies to hub ids only"
        if certainly_outside(name, settings.model_roots):
            yield "model.name", "path_not_allowed", f"{name!r} " + _outside(
                "model", settings.model_roots, "LAYERSCOPE_MODEL_ROOTS")
        return
    # Neither a hub id nor a path: certain only without model roots (with roots it may be a folder
    # under one on the worker's disk, which the API cannot see).
    if not settings.model_roots and not HUB_ID.match(name) and not looks_like_path(name):
        yield "model.name", "model_not_found", (
            f"{name!r} is neither a built-in model{_did_you_mean(name, list(BUILTIN_MODELS))}, a path under the "
            f"model roots nor a hub id (org/name); built-ins: {builtins}")
    # A bare hub name (no organisation) that is a near miss of a built-in is a typo far more often
    # than a hub model (whose names are org/name): refused at once, instead of the worker trying the
    # hub for half a minute. A hub model of that name is still reachable as org/name.
    elif not settings.model_roots and "/" not in name and (close := _did_you_mean(name, list(BUILTIN_MODELS), 0.8)):
        yield "model.name", "model_not_found", (
            f"no built-in model {name!r}{close}; built-ins: {builtins} (a hub model: give it as org/name)")


def _datasets(spec: AnalysisSpec) -> Iterator[tuple[str, DatasetSpec]]:
    yield "dataset", spec.dataset
    if spec.stages.prune is not None and spec.stages.prune.qa_dataset is not None:
        yield "stages.prune.qa_dataset", spec.stages.prune.qa_dataset
    if spec.stages.prune is not None and spec.stages.prune.perplexity_dataset is not None:
        yield "stages.prune.perplexity_dataset", spec.stages.prune.perplexity_dataset
    if spec.stages.mitigate is not None:
        yield "stages.mitigate.perplexity_dataset", spec.stages.mitigate.perplexity_dataset


def _dataset_errors(where: str, dataset: DatasetSpec, settings: Settings) -> Iterator[tuple[str, str, str]]:
    if dataset.name is not None and dataset.name not in BUILTIN_DATASETS:
        yield f"{where}.name", "dataset_not_found", (
            f"no built-in dataset {dataset.name!r}{_did_you_mean(dataset.name, list(BUILTIN_DATASETS))}; "
            f"built-ins: {', '.join(BUILTIN_DATASETS)} (your own data: path, rows or hub)")
    if dataset.path is not None and certainly_outside(dataset.path, settings.data_roots):
        yield f"{where}.path", "path_not_allowed", f"{dataset.path!r} " + _outside(
            "data", settings.data_roots, "LAYERSCOPE_DATA_ROOTS")
    for i, row in enumerate(dataset.rows or []):
        for ours in TEXT_FIELDS:
            column = dataset.fields.get(ours, ours)
            if column in row and (problem := text_value_problem(row[column], ours)) is not None:
                yield f"{where}.rows.{i}.{column}", "text_invalid", f"({ours}) {problem}"


def check_submit(spec: AnalysisSpec, settings: Settings) -> None:
    """Raise a 422 Problem naming the fields (up to five, in spec order) that no worker here could run."""
    found: list[tuple[str, str, str]] = list(_model_errors(spec, settings))
    patch = spec.model.patch
    if patch is not None and patch.path is not None and certainly_outside(patch.path, settings.model_roots):
        found.append(("model.patch.path", "path_not_allowed", f"{patch.path!r} " + _outside(
            "model", settings.model_roots, "LAYERSCOPE_MODEL_ROOTS")))
    for where, dataset in _datasets(spec):
        for error in _dataset_errors(where, dataset, settings):
            found.append(error)
            if len(found) >= _MAX_REPORTED:
                break
    lm_eval = spec.stages.prune.lm_eval if spec.stages.prune is not None else None
    if lm_eval is not None:
        paths = [("task", lm_eval.task)] if lm_eval.task.lower().endswith((".yaml", ".yml")) else []
        paths += [("data_files", lm_eval.data_files)] if lm_eval.data_files is not None else []
        for key, path in paths:
            if certainly_outside(path, settings.data_roots):
                found.append((f"stages.prune.lm_eval.{key}", "path_not_allowed", f"{path!r} " + _outside(
                    "data", settings.data_roots, "LAYERSCOPE_DATA_ROOTS")))
    if spec.registry is not None and not settings.mlflow_tracking_uri and spec.model.mlflow is None:
        found.append(("registry.mlflow", "registry_not_configured", _NO_MLFLOW))
    hallucination = spec.stages.hallucination
    if hallucination is not None and hallucination.judge is not None:
        name = hallucination.judge.name
        if name not in settings.judges:
            found.append(("stages.hallucination.judge.name", "judge_not_configured", unknown_judge(name, settings.judges)))
    if found:
        errors = [{"field": f, "message": m, "type": t} for f, t, m in found[:_MAX_REPORTED]]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, f"Invalid request: {detail}", errors=errors)
