"""The job row's life cycle, as the worker sees it.

Every write after the claim is conditioned on the claim token, so a worker that
lost its job (its heartbeat went stale and the reaper gave the job to another
worker) can never overwrite the new owner's state or results.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.artifact_store import INLINE_BYTES, StoreError, artifact_key, store_for
from app.config import Settings
from app.db import rowcount, session_scope, upsert
from app.layervalues import typed
from app.models import Analysis, Answer, Artifact, LayerScore, Metric, utcnow
from app.routing import queue_of
from app.schemas import JobState
from worker.stage import AnswerRecord, JobFailed, StageResult, finite_or_none

SessionFactory = sessionmaker[Session]
INLINE_ARTIFACT_BYTES = INLINE_BYTES
# Rows per INSERT of the answers table: 16 columns x 500 rows stays far below SQLite's 32,766 and
# Postgres' 65,535 bound parameters per statement, for any number of answers.
ANSWER_CHUNK = 500


class LostOwnership(Exception):
    """The job was reassigned to another worker; stop without writing anything."""


def claim(sf: SessionFactory, analysis_id: str, worker: str) -> str | None:
    """QUEUED -> RUNNING for exactly one worker; returns the claim token or None."""
    token = uuid.uuid4().hex
    now = utcnow()
    with session_scope(sf) as s:
        claimed = rowcount(s.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.state == JobState.QUEUED.value)
            .values(
                state=JobState.RUNNING.value,
                claim_token=token,
                worker=worker,
                attempt=Analysis.attempt + 1,
                heartbeat_at=now,
                error_type=None,
                error_detail=None,
            )
        ))
        if claimed:
            s.execute(
                update(Analysis)
                .where(Analysis.id == analysis_id, Analysis.started_at.is_(None))
                .values(started_at=now)
            )
    return token if claimed else None


def load_spec(sf: SessionFactory, analysis_id: str) -> dict[str, Any]:
    with session_scope(sf) as s:
        spec = s.scalar(select(Analysis.spec).where(Analysis.id == analysis_id))
    if spec is None:
        raise LostOwnership(analysis_id)
    return spec


def load_queue(sf: SessionFactory, analysis_id: str) -> str:
    """The queue the job was routed to at submit (`app/routing.py`)."""
    with session_scope(sf) as s:
        return queue_of(s.scalar(select(Analysis.summary).where(Analysis.id == analysis_id)))


def set_summary_entry(sf: SessionFactory, analysis_id: str, token: str, key: str, value: dict[str, Any]) -> None:
    """One top-level entry of the job's summary (e.g. `runtime`), next to the stages' entries."""
    with session_scope(sf) as s:
        job = s.scalar(select(Analysis).where(_owned(analysis_id, token)).with_for_update())
        if job is None:
            raise LostOwnership(analysis_id)
        job.summary = {**(job.summary or {}), key: _json_safe(value)}


def _owned(analysis_id: str, token: str) -> Any:
    return (Analysis.id == analysis_id) & (Analysis.claim_token == token)


def heartbeat(sf: SessionFactory, analysis_id: str, token: str) -> str:
    """Record that the worker is alive; returns the job's state (CANCELLING means stop)."""
    with session_scope(sf) as s:
        done = rowcount(s.execute(update(Analysis).where(_owned(analysis_id, token)).values(heartbeat_at=utcnow())))
        if not done:
            raise LostOwnership(analysis_id)
        return s.scalar(select(Analysis.state).where(Analysis.id == analysis_id)) or ""


def current_state(sf: SessionFactory, analysis_id: str, token: str) -> str:
    with session_scope(sf) as s:
        row = s.execute(select(Analysis.state, Analysis.claim_token).where(Analysis.id == analysis_id)).first()
    if row is None or row.claim_token != token:
        raise LostOwnership(analysis_id)
    return row.state


def set_progress(sf: SessionFactory, analysis_id: str, token: str, stage: str, done: int, total: int) -> None:
    with session_scope(sf) as s:
        s.execute(
            update(Analysis)
            .where(_owned(analysis_id, token))
            .values(progress_stage=stage, progress_done=done, progress_total=total, heartbeat_at=utcnow())
        )


def save_stage(sf: SessionFactory, settings: Settings, analysis_id: str, token: str, result: StageResult) -> None:
    """Write one stage's results with upserts; a rerun of the stage overwrites, never duplicates."""
    layer_rows = [
        {
            "analysis_id": analysis_id,
            "stage": result.stage,
            "scorer": r.scorer,
            "layer": r.layer,
            "block_name": r.block_name,
            "values": typed(r.values),
        }
        for r in result.layers
    ]
    metric_rows = [
        {
            "analysis_id": analysis_id,
            "stage": result.stage,
            "scope": m.scope,
            "name": m.name,
            "value": finite_or_none(m.value),
            "ci_low": finite_or_none(m.ci_low),
            "ci_high": finite_or_none(m.ci_high),
            "n": m.n,
        }
        for m in result.metrics
    ]
    answer_rows = _answer_rows(analysis_id, result.stage, result.answers)
    artifact_rows = []
    for art in result.artifacts:
        row: dict[str, Any] = {
            "analysis_id": analysis_id,
            "name": art.name,
            "stage": result.stage,
            "media_type": art.media_type,
            "size": len(art.data),
            "content": None,
            "path": None,
            "created_at": utcnow(),
        }
        if len(art.data) <= INLINE_ARTIFACT_BYTES:
            row["content"] = art.data
        else:  # to the store every worker and API replica reads (app/artifact_store.py)
            key = artifact_key(analysis_id, art.name)
            try:
                store_for(settings).put(key, art.data)
            except StoreError as exc:
                raise _store_failed(exc) from None
            row["path"] = key
        artifact_rows.append(row)

    with session_scope(sf) as s:
        job = s.scalar(select(Analysis).where(_owned(analysis_id, token)).with_for_update())
        if job is None:
            raise LostOwnership(analysis_id)
        upsert(s, LayerScore.__table__, layer_rows, ["analysis_id", "stage", "scorer", "layer"])
        upsert(s, Metric.__table__, metric_rows, ["analysis_id", "stage", "scope", "name"])
        upsert(s, Artifact.__table__, artifact_rows, ["analysis_id", "name"])
        for i in range(0, len(answer_rows), ANSWER_CHUNK):
            upsert(s, Answer.__table__, answer_rows[i : i + ANSWER_CHUNK],
                   ["analysis_id", "stage", "scope", "answer_id"])
        summary = dict(job.summary or {})
        summary[result.stage] = _json_safe(result.summary)
        warnings = [w for w in (job.warnings or []) if not w.startswith(f"[{result.stage}] ")]
        warnings += [f"[{result.stage}] {w}" for w in result.warnings]
        job.summary = summary
        job.warnings = warnings


def _answer_rows(analysis_id: str, stage: str, answers: list[AnswerRecord]) -> list[dict[str, Any]]:
    """The answers table's rows, JSON-safe (non-finite confidences are null, no NUL characters).
    One row per (scope, id), the last record winning: a single upsert statement may not
    touch the same row twice (Postgres refuses)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for a in answers:
        scope = _json_safe(a.scope)
        rows[(scope, int(a.id))] = {
            "analysis_id": analysis_id,
            "stage": stage,
            "scope": scope,
            "answer_id": int(a.id),
            "split": _json_safe(a.split),
            "question": _json_safe(a.question),
            "gold": _json_safe(list(a.gold)),
            "answer": _json_safe(a.answer),
            "correct": bool(a.correct),
            "rule": _json_safe(a.rule),
            "n_tokens": int(a.n_tokens),
            "stop": _json_safe(a.stop),
            "confidence": {str(k): finite_or_none(v) for k, v in a.confidence.items()},
            "verbalized_reply": _json_safe(a.verbalized_reply),
            "samples": _json_safe(list(a.samples)) if a.samples is not None else None,
            "meta": _json_safe(dict(a.meta or {})),
        }
    return list(rows.values())


def finish(
    sf: SessionFactory,
    analysis_id: str,
    token: str,
    state: JobState,
    error_type: str | None = None,
    detail: str | None = None,
) -> bool:
    with session_scope(sf) as s:
        return bool(
            rowcount(s.execute(
                update(Analysis)
                .where(_owned(analysis_id, token))
                .where(Analysis.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value]))
                .values(
                    state=state.value,
                    finished_at=utcnow(),
                    error_type=error_type,
                    error_detail=detail[:4000] if detail else None,
                )
            ))
        )


def give_back(
    sf: SessionFactory, analysis_id: str, token: str, max_attempts: int, error_type: str, detail: str
) -> JobState | None:
    """The worker, not the job, failed (its device is unusable): requeue the job for another
    worker (QUEUED, sent again by the sweeper), or FAILED with `error_type` once it has used
    `max_attempts` claims; a CANCELLING job ends CANCELLED. None when the job is no longer ours."""
    with session_scope(sf) as s:
        row = s.execute(
            select(Analysis.state, Analysis.attempt).where(_owned(analysis_id, token)).with_for_update()
        ).first()
        if row is None or row.state not in (JobState.RUNNING.value, JobState.CANCELLING.value):
            return None
        values: dict[str, Any]
        if row.state == JobState.CANCELLING.value:
            state = JobState.CANCELLED
            values = {"finished_at": utcnow()}
        elif row.attempt >= max_attempts:
            state = JobState.FAILED
            values = {"finished_at": utcnow(), "error_type": error_type, "error_detail": detail[:4000]}
        else:
            state = JobState.QUEUED
            values = {"enqueued_at": None, "worker": None}
        s.execute(update(Analysis).where(_owned(analysis_id, token)).values(state=state.value, claim_token=None, **values))
    return state


def read_artifact(sf: SessionFactory, settings: Settings, job_id: str, analysis_id: str, name: str) -> bytes | None:
    """Artifact `name` of `analysis_id`, for the running job `job_id`: only a succeeded analysis
    of the job's own project is readable (None otherwise, as for a missing one)."""
    with session_scope(sf) as s:
        job = s.get(Analysis, job_id)
        source = s.get(Analysis, analysis_id)
        if job is None or source is None or source.project != job.project:
            return None
        if source.state != JobState.SUCCEEDED.value:
            return None
        art = s.get(Artifact, (analysis_id, name))
        if art is None:
            return None
        if art.content is not None:
            return bytes(art.content)
        path = art.path
    if path is None:
        return None
    try:
        return store_for(settings).get(path)
    except StoreError as exc:
        raise _store_failed(exc) from None


def _store_failed(exc: StoreError) -> JobFailed:
    return JobFailed(
        "artifact_store_unavailable",
        f"{exc}. Check LAYERSCOPE_ARTIFACT_STORE / LAYERSCOPE_ARTIFACT_S3_ENDPOINT_URL and the store's "
        "credentials on this worker; resubmit once it is reachable.",
    )


def _json_safe(value: Any) -> Any:
    """Summaries go to JSON columns and clients: no NaN/inf, no numpy scalars, and no NUL
    characters (Postgres text and JSONB refuse them; they become U+FFFD)."""
    if isinstance(value, dict):
        return {_json_safe(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and not isinstance(value, dt.datetime):
        value = value.item()
        if isinstance(value, int):
            return value
    if isinstance(value, float):
        return finite_or_none(value)
    return str(value)
