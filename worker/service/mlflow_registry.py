"""The MLflow side of the registry outbox: log an analysis to a run, tag a version with a verdict.

Every call goes through one `MlflowClient` built from settings (tracking and registry URI);
credentials are MLflow's own environment variables (`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`,
`MLFLOW_TRACKING_TOKEN`), read by MLflow in the worker. MLflow's per-request retries are kept
short (`mlflow_http_retries`, `mlflow_timeout`): the outbox (`worker/service/registry.py`)
retries the whole update later, so a registry that is down never holds a worker for minutes.

Both updates are safe to repeat: the run of an analysis is found again by its
`layerscope.analysis_id` tag (and is only logged once it lacks `layerscope.logged`); tags and
aliases are set, not added.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.schemas import MlflowVersionRef

TAG = "layerscope"
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-/ ]")
_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch
_PLOT_TYPES = {"image/png": ".png", "image/svg+xml": ".svg"}


class RegistryUnavailable(RuntimeError):
    """MLflow is not installed on this worker, or no tracking URI is configured."""


def metric_key(stage: str, scope: str, name: str) -> str:
    """`prune.scorer_avss.perplexity`: a metric row's path with what MLflow keys may not hold replaced."""
    parts = [stage] + ([scope] if scope else []) + [name]
    return _KEY_CHARS.sub("_", ".".join(parts))[:250]


def metric_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's value and, as separate metrics, its interval and N (`<key>.ci_low`, `.ci_high`, `.n`)."""
    out: dict[str, float] = {}
    for r in rows:
        key = metric_key(r["stage"], r["scope"], r["name"])
        for suffix, value in (("", r["value"]), (".ci_low", r["ci_low"]), (".ci_high", r["ci_high"]), (".n", r["n"])):
            if value is not None and math.isfinite(float(value)):
                out[key + suffix] = float(value)
    return out


def layer_tables(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Per (stage, scorer): a column table (layer, block, every value), as MLflow's `log_table` takes it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["stage"], r["scorer"], r["layer"])):
        groups.setdefault(f"{r['stage']}-{r['scorer']}", []).append(r)
    tables = {}
    for name, group in groups.items():
        columns = sorted({k for r in group for k in (r["values"] or {})})
        table: dict[str, list[Any]] = {"layer": [r["layer"] for r in group], "block": [r["block_name"] for r in group]}
        for c in columns:
            table[c] = [(r["values"] or {}).get(c) for r in group]
        tables[_KEY_CHARS.sub("_", name)] = table
    return tables


def _csv(table: dict[str, list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(table))
    writer.writerows(zip(*table.values(), strict=True))
    return buf.getvalue()


@dataclass
class AnalysisExport:
    """What a `run` update logs, read from the database by the outbox."""

    analysis_id: str
    project: str
    model_name: str
    spec: dict[str, Any]
    summary: dict[str, Any]
    warnings: list[str]
    metrics: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    plots: list[tuple[str, str, bytes]]  # (name, media type, content)
    link: str | None  # the analysis in the service, when its base URL is known


class MlflowRegistry:
    def __init__(self, settings: Settings):
        if not settings.mlflow_tracking_uri:
            raise RegistryUnavailable("no MLflow tracking server configured (LAYERSCOPE_MLFLOW_TRACKING_URI)")
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise RegistryUnavailable(
                "mlflow is not installed on this worker (pip install 'layerscope[mlflow]')"
            ) from exc
        # MLflow reads these per request; an operator's own values win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.mlflow_http_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(settings.mlflow_timeout))))
        self.settings = settings
        self.client = MlflowClient(
            tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri or None
        )

    # ------------------------------------------------------------------ versions

    def resolve(self, ref: MlflowVersionRef) -> str:
        """The version number `ref` names now (an alias read from the registry)."""
        if ref.version is not None:
            return str(self.client.get_model_version(ref.model, ref.version).version)
        return str(self.client.get_model_version_by_alias(ref.model, str(ref.alias)).version)

    # ------------------------------------------------------------------ run

    def _experiment_id(self) -> str:
        name = self.settings.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name, tags={f"{TAG}.created_by": "layerscope"}))
        except Exception:  # created concurrently by another worker
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def _find_run(self, experiment_id: str, analysis_id: str) -> Any | None:
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG}.analysis_id` = '{analysis_id}'", max_results=1
        )
        return runs[0] if runs else None

    def log_run(self, ref: MlflowVersionRef, version: str, export: AnalysisExport) -> dict[str, Any]:
        """Log `export` to the analysis's run (made once, found again on a retry) and link it to the version."""
        from mlflow.entities import RunTag

        mv = self.client.get_model_version(ref.model, version)
        experiment_id = self._experiment_id()
        run = self._find_run(experiment_id, export.analysis_id)
        if run is not None and run.data.tags.get(f"{TAG}.logged") == "true":
            run_id = run.info.run_id
        else:
            tags = {
                f"{TAG}.analysis_id": export.analysis_id, f"{TAG}.project": export.project,
                f"{TAG}.registered_model": ref.model, f"{TAG}.model_version": version,
                "mlflow.note.content": (
                    f"layerscope analysis {export.analysis_id} of registered model {ref.model!r} version {version}"
                    + (f" ({export.link})" if export.link else "")
                ),
            }
            if run is None:
                run = self.client.create_run(experiment_id, tags=tags, run_name=f"layerscope-{export.analysis_id[:8]}")
            run_id = run.info.run_id
            self._log_contents(run_id, export)
            if model_id := getattr(mv, "model_id", None):  # MLflow 3: the version's logged model is an input
                from mlflow.entities import LoggedModelInput

                self.client.log_inputs(run_id, models=[LoggedModelInput(model_id=model_id)])
            self.client.log_batch(run_id, tags=[RunTag(f"{TAG}.logged", "true")])
            self.client.set_terminated(run_id, "FINISHED")
        self.client.set_model_version_tag(ref.model, version, f"{TAG}.run_id", run_id)
        self.client.set_model_version_tag(ref.model, version, f"{TAG}.analysis_id", export.analysis_id)
        return {"run_id": run_id, "experiment_id": experiment_id, "version": version}

    def _log_contents(self, run_id: str, export: AnalysisExport) -> None:
        from mlflow.entities import Metric, Param

        spec = export.spec
        params = {
            "analysis_id": export.analysis_id,
            "model": export.model_name,
            "stages": ",".join(sorted((spec.get("stages") or {}).keys())),
            "dataset": json.dumps(spec.get("dataset") or {}, sort_keys=True)[:500],
            "gate_policy": str(spec.get("gate_policy") or ""),
            "warnings": str(len(export.warnings)),
        }
        for stage, options in sorted((spec.get("stages") or {}).items()):
            for key, value in sorted((options or {}).items()):
                if isinstance(value, (str, int, float, bool)) or value is None:
                    params[f"{stage}.{key}"] = str(value)
        items = list(params.items())
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=[Param(k[:250], v[:6000]) for k, v in items[i:i + 100]])
        metrics = list(metric_values(export.metrics).items())
        stamp = _now_ms()
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics[i:i + _BATCH]])
        for name, table in layer_tables(export.layers).items():
            self.client.log_table(run_id, data=table, artifact_file=f"layers/{name}.json")
            self.client.log_text(run_id, _csv(table), f"layers/{name}.csv")
        self.client.log_text(run_id, json.dumps(spec, indent=2, sort_keys=True), "spec.json")
        self.client.log_text(run_id, json.dumps(export.summary, indent=2, sort_keys=True, default=str), "summary.json")
        if export.warnings:
            self.client.log_text(run_id, "\n".join(export.warnings) + "\n", "warnings.txt")
        if export.plots:
            with tempfile.TemporaryDirectory(prefix="layerscope-plots-") as tmp:
                for name, media_type, content in export.plots:
                    safe = _KEY_CHARS.sub("_", Path(name).name) or "plot"
                    if not safe.endswith(_PLOT_TYPES[media_type]):
                        safe += _PLOT_TYPES[media_type]
                    (Path(tmp) / safe).write_bytes(content)
                self.client.log_artifacts(run_id, tmp, "plots")

    # ------------------------------------------------------------------ verdicts

    def apply_verdict(
        self, ref: MlflowVersionRef, version: str, verdict: dict[str, Any], actions: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The verdict's tags on the version, and the alias the policy moves on this outcome (if any)."""
        passed = bool(verdict["passed"])
        policy = str(verdict["policy"])
        failing = [r["rule"] for r in verdict.get("rules", []) if not r.get("passed")]
        if verdict.get("error"):
            failing.append(f"error: {verdict['error']}")
        outcome = "pass" if passed else "fail"
        policy_ref = f"{policy}@{verdict['policy_version']}" if verdict.get("policy_version") else policy
        tags = {
            f"{TAG}.gate.verdict": outcome,
            f"{TAG}.gate.policy": policy_ref,
            f"{TAG}.gate.analysis_id": str(verdict["analysis_id"]),
            f"{TAG}.gate.verdict_id": str(verdict["id"]),
            f"{TAG}.gate.failing_rules": "; ".join(failing)[:5000] or "none",
            f"{TAG}.gate.{_KEY_CHARS.sub('_', policy)}": outcome,
        }
        for key, value in tags.items():
            self.client.set_model_version_tag(ref.model, version, key, value)
        alias = (actions or {}).get("alias_on_pass" if passed else "alias_on_fail")
        if alias:
            self.client.set_registered_model_alias(ref.model, alias, version)
        return {"version": version, "tags": tags, "alias": alias, "alias_moved": bool(alias)}


def _now_ms() -> int:
    return int(time.time() * 1000)
