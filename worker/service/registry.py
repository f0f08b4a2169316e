"""Apply the registry outbox (`registry_updates`, written by `app/registry.py`): retried, in order, never lost.

Run right after a job's end (`apply_now`, so a healthy registry sees the run and the verdict at
once) and from every sweep (`process`). An analysis's updates are applied in the order they were
stored (its run before its verdicts): only the oldest pending one of an analysis is taken, by moving
its `next_attempt_at` past a lease (a conditional update, so one sender at a time, as webhook
deliveries are sent). A failed attempt is retried with the webhooks' backoff up to
`registry_max_attempts`; the first failure adds a warning to the analysis, which stays SUCCEEDED
(the verdict is stored either way: only its copy in the registry is late). Each applied update
emits `registry.updated`, one that gives up `registry.failed`, and `summary.registry` of the
analysis shows every update's state.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from typing import Any

from sqlalchemy import select, update

from app.config import Settings
from app.db import rowcount, session_scope
from app.events import enqueue_event
from app.models import Analysis, Artifact, GatePolicy, GateVerdict, LayerScore, Metric, RegistryUpdate, utcnow
from app.registry import FAILED_EVENT, RUN, UPDATED_EVENT, mlflow_target
from app.schemas import MlflowVersionRef
from app.verdicts import labels_for, verdict_out
from app.webhooks import backoff
from worker.service.jobstore import SessionFactory

log = logging.getLogger("layerscope.registry")

_PERMANENT_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED"}
_PLOTS = ("image/png", "image/svg+xml")


class _Permanent(Exception):
    """An update that no retry can apply (the version does not exist, the policy is gone)."""


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, _Permanent):
        return True
    return getattr(exc, "error_code", None) in _PERMANENT_CODES


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return re.sub(r"\s+", " ", text)[:1000]


# ---------------------------------------------------------------- claiming


def _head(sf: SessionFactory, analysis_id: str | None, now: dt.datetime, limit: int) -> list[str]:
    """The oldest pending update of each analysis (of one, with `analysis_id`), where that one is due."""
    with session_scope(sf) as s:
        query = select(RegistryUpdate.id, RegistryUpdate.analysis_id, RegistryUpdate.next_attempt_at).where(
            RegistryUpdate.state == "pending")
        if analysis_id is not None:
            query = query.where(RegistryUpdate.analysis_id == analysis_id)
        rows = s.execute(query.order_by(RegistryUpdate.created_at, RegistryUpdate.kind).limit(1000)).all()
    seen: set[str] = set()
    heads = []
    for row in rows:
        if row.analysis_id in seen:
            continue
        seen.add(row.analysis_id)
        if row.next_attempt_at is None or row.next_attempt_at <= now:
            heads.append(row.id)
    return heads[:limit]


def _claim(sf: SessionFactory, settings: Settings, update_id: str, now: dt.datetime) -> bool:
    lease = utcnow() + dt.timedelta(seconds=settings.mlflow_timeout * 4 + 60)
    with session_scope(sf) as s:
        return bool(rowcount(s.execute(
            update(RegistryUpdate)
            .where(RegistryUpdate.id == update_id, RegistryUpdate.state == "pending",
                   RegistryUpdate.next_attempt_at <= now)
            .values(next_attempt_at=lease)
        )))


# ---------------------------------------------------------------- applying


def _export(s: Any, row: Analysis) -> Any:
    from worker.service.mlflow_registry import AnalysisExport

    metrics = [
        {"stage": m.stage, "scope": m.scope, "name": m.name, "value": m.value, "ci_low": m.ci_low,
         "ci_high": m.ci_high, "n": m.n}
        for m in s.scalars(select(Metric).where(Metric.analysis_id == row.id))
    ]
    layers = [
        {"stage": r.stage, "scorer": r.scorer, "layer": r.layer, "block_name": r.block_name, "values": r.values}
        for r in s.scalars(select(LayerScore).where(LayerScore.analysis_id == row.id))
    ]
    plots = [
        (a.name, a.media_type, bytes(a.content))
        for a in s.scalars(select(Artifact).where(Artifact.analysis_id == row.id, Artifact.media_type.in_(_PLOTS)))
        if a.content is not None
    ]
    return AnalysisExport(
        analysis_id=row.id, project=row.project, model_name=row.model_name, spec=dict(row.spec or {}),
        summary=dict(row.summary or {}), warnings=list(row.warnings or []), metrics=metrics, layers=layers,
        plots=plots, link=None,
    )


def _loaded_version(summary: dict[str, Any], ref: MlflowVersionRef) -> str | None:
    """The version this job loaded when it loaded `ref`'s model by alias (`summary.runtime.models`)."""
    runtime = (summary or {}).get("runtime") or {}
    for m in [runtime, *(runtime.get("models") or [])]:
        source = str((m or {}).get("source") or "")
        prefix = f"mlflow:models:/{ref.model}/"
        if source.startswith(prefix) and source[len(prefix):].isdigit():
            return source[len(prefix):]
    return None


def _version(s: Any, reg: Any, item: RegistryUpdate, row: Analysis, ref: MlflowVersionRef) -> str:
    """The version this analysis reports to: a pinned one, or what its alias named when the job loaded
    the model or, failing that, when its run was logged (every later update uses the same one)."""
    if ref.version is not None:
        return ref.version
    stored = ((row.summary or {}).get("registry") or {}).get("mlflow", {}).get("version")
    if stored:
        return str(stored)
    return _loaded_version(dict(row.summary or {}), ref) or str(reg.resolve(ref))


def _apply(sf: SessionFactory, reg: Any, update_id: str) -> tuple[dict[str, Any], str]:
    """Do one update; returns (result, version). Reads everything first, calls MLflow outside a transaction."""
    with session_scope(sf) as s:
        item = s.get(RegistryUpdate, update_id)
        row = s.get(Analysis, item.analysis_id) if item is not None else None
        if item is None or row is None:
            raise _Permanent("the analysis was deleted")
        ref = mlflow_target(row.spec)
        if ref is None:
            raise _Permanent("the analysis names no registry")
        version = _version(s, reg, item, row, ref)
        if item.kind == RUN:
            export = _export(s, row)
            verdict = actions = None
        else:
            found = s.get(GateVerdict, item.verdict_id) if item.verdict_id else None
            if found is None:
                raise _Permanent("the verdict was deleted")
            verdict = verdict_out(found, labels_for(s, [row.id])[row.id]).model_dump(mode="json")
            policy = s.scalar(select(GatePolicy).where(
                GatePolicy.project == found.project, GatePolicy.name == found.policy_name,
                GatePolicy.version == found.policy_version))
            actions = policy.registry_actions if policy is not None else None
            export = None
    if export is not None:
        return reg.log_run(ref, version, export), version
    assert verdict is not None
    return reg.apply_verdict(ref, version, verdict, actions), version


def _record(
    sf: SessionFactory, settings: Settings, update_id: str, *, result: dict[str, Any] | None = None,
    version: str | None = None, error: str | None = None, permanent: bool = False,
) -> str:
    """Store an attempt's outcome, the analysis's `summary.registry`, its warning and event. Returns the state."""
    with session_scope(sf) as s:
        item = s.get(RegistryUpdate, update_id)
        if item is None:
            return "gone"
        row = s.get(Analysis, item.analysis_id)
        attempt = item.attempts + 1
        ref = mlflow_target(row.spec) if row is not None else None
        if error is None:
            state, next_at = "done", None
        elif permanent or attempt >= settings.registry_max_attempts:
            state, next_at = "failed", None
        else:
            state = "pending"
            delay = backoff(attempt, settings.registry_backoff_base, settings.registry_backoff_max)
            next_at = utcnow() + dt.timedelta(seconds=delay)
        s.execute(update(RegistryUpdate).where(RegistryUpdate.id == update_id).values(
            state=state, attempts=attempt, next_attempt_at=next_at, last_error=error,
            result=result or item.result or {}, done_at=utcnow() if state == "done" else None,
        ))
        if row is None or ref is None:
            return state
        summary = dict(row.summary or {})
        block = dict((summary.get("registry") or {}).get("mlflow") or {})
        block.update({"model": ref.model, "alias": ref.alias})
        if version:
            block["version"] = version
        if result and result.get("run_id"):
            block["run_id"] = result["run_id"]
        updates = dict(block.get("updates") or {})
        updates[update_id] = {"kind": item.kind, "verdict_id": item.verdict_id, "state": state, "attempts": attempt,
                              "last_error": error}
        block["updates"] = updates
        summary["registry"] = {"mlflow": block}
        values: dict[str, Any] = {"summary": summary}
        what = f"MLflow {item.kind} update of {ref.uri()}" + (f" (version {version})" if version else "")
        if error is not None and (attempt == 1 or state == "failed"):
            tail = ("it is retried with backoff (the sweeper)" if state == "pending"
                    else f"given up after {attempt} attempt(s)")
            values["warnings"] = [*(row.warnings or []), f"registry: {what} failed (attempt {attempt}: {error}); {tail}"]
        s.execute(update(Analysis).where(Analysis.id == row.id).values(**values))
        if state in ("done", "failed"):
            data = {"analysis_id": row.id, "registry": "mlflow", "update_id": update_id, "kind": item.kind,
                    "verdict_id": item.verdict_id, "model": ref.model, "version": version, "attempts": attempt,
                    "result": result or {}, "error": error,
                    "links": {"analysis": f"/v1/analyses/{row.id}"}}
            enqueue_event(s, row.project, UPDATED_EVENT if state == "done" else FAILED_EVENT, data,
                          analysis_id=row.id)
    return state


def process(
    sf: SessionFactory, settings: Settings, analysis_id: str | None = None, limit: int = 20, budget_s: float = 30.0,
) -> int:
    """Apply due registry updates (of one analysis, with `analysis_id`); returns how many were applied. Never raises."""
    applied = 0
    try:
        if not settings.mlflow_tracking_uri:
            return 0
        deadline = time.monotonic() + budget_s
        reg: Any = None
        while applied < limit and time.monotonic() < deadline:
            now = utcnow()
            heads = [h for h in _head(sf, analysis_id, now, limit) if _claim(sf, settings, h, now)]
            if not heads:
                break
            progressed = False
            for update_id in heads:
                try:
                    if reg is None:
                        from worker.service.mlflow_registry import MlflowRegistry

                        reg = MlflowRegistry(settings)
                    result, version = _apply(sf, reg, update_id)
                except Exception as exc:
                    permanent = _is_permanent(exc)
                    log.warning("registry update %s failed (%s): %s", update_id,
                                "permanent" if permanent else "will retry", _describe(exc))
                    _record(sf, settings, update_id, error=_describe(exc), permanent=permanent)
                    continue
                _record(sf, settings, update_id, result=result, version=version)
                applied += 1
                progressed = True
            if not progressed:
                break
    except Exception as exc:  # database down: the next sweep tries again
        log.warning("registry sweep failed: %s", _describe(exc))
    return applied


def apply_now(sf: SessionFactory, settings: Settings, analysis_id: str) -> int:
    """Right after a job's end: apply its updates now rather than at the next sweep."""
    return process(sf, settings, analysis_id=analysis_id)
