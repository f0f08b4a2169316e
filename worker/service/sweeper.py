"""The sweeper: requeue jobs whose worker died, send jobs whose enqueue failed, deliver webhooks
and apply registry updates (both retried until done).

Runs in every worker (a thread) and in the embedded runner. Safe to run in many
places at once: every change is a conditional update, and a duplicate message
is harmless because only one worker can claim a QUEUED row.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import or_, select, update

from app.config import Settings
from app.db import rowcount, session_scope
from app.models import Analysis, utcnow
from app.queue import Enqueuer
from app.routing import queue_of
from app.schemas import JobState
from worker.service import registry, webhooks
from worker.service.jobstore import SessionFactory

log = logging.getLogger("layerscope.sweeper")


def reap(sf: SessionFactory, settings: Settings) -> dict[str, int]:
    """Jobs whose heartbeat stopped: requeue (attempt cap, then FAILED); a dead CANCELLING job ends CANCELLED."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=settings.heartbeat_timeout)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0}
    with session_scope(sf) as s:
        rows = s.execute(
            select(Analysis.id, Analysis.state, Analysis.attempt).where(
                Analysis.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value]),
                Analysis.heartbeat_at < stale,
            )
        ).all()
        for row in rows:
            still_stale = (
                (Analysis.id == row.id) & (Analysis.state == row.state) & (Analysis.heartbeat_at < stale)
            )
            if row.state == JobState.CANCELLING.value:
                values = {"state": JobState.CANCELLED.value, "finished_at": now, "claim_token": None}
                key = "cancelled"
            elif row.attempt >= settings.max_attempts:
                values = {
                    "state": JobState.FAILED.value,
                    "finished_at": now,
                    "claim_token": None,
                    "error_type": "worker_lost",
                    "error_detail": (
                        f"The worker running this job stopped responding on each of {row.attempt} attempts "
                        "(crash or out-of-memory kill?). Check the worker logs; resubmit with fewer examples "
                        "or a smaller model."
                    ),
                }
                key = "failed"
            else:
                values = {"state": JobState.QUEUED.value, "claim_token": None, "enqueued_at": None, "worker": None}
                key = "requeued"
            counts[key] += rowcount(s.execute(update(Analysis).where(still_stale).values(**values)))
    if any(counts.values()):
        log.warning("reaper: %s", counts)
    return counts


def enqueue_pending(sf: SessionFactory, settings: Settings, enqueuer: Enqueuer, limit: int = 100) -> int:
    """Send QUEUED jobs that were never sent, or whose message seems lost (broker restarted)."""
    now = utcnow()
    resend_before = now - dt.timedelta(seconds=settings.requeue_after)
    with session_scope(sf) as s:
        pending = list(
            s.execute(
                select(Analysis.id, Analysis.summary)
                .where(
                    Analysis.state == JobState.QUEUED.value,
                    or_(Analysis.enqueued_at.is_(None), Analysis.enqueued_at < resend_before),
                )
                .order_by(Analysis.created_at)
                .limit(limit)
            )
        )
    sent = 0
    for analysis_id, summary in pending:
        # Claim the send by marking the row first (the mark is what every sweeper and the submit
        # test), so two workers' sweepers never both send one job; unmark when the send fails.
        with session_scope(sf) as s:
            claimed = rowcount(s.execute(
                update(Analysis)
                .where(Analysis.id == analysis_id, Analysis.state == JobState.QUEUED.value,
                       or_(Analysis.enqueued_at.is_(None), Analysis.enqueued_at < resend_before))
                .values(enqueued_at=utcnow())
            ))
        if not claimed:
            continue  # another sweeper sent it, or it left QUEUED
        if not enqueuer.enqueue(analysis_id, queue_of(summary)):
            with session_scope(sf) as s:
                s.execute(update(Analysis).where(Analysis.id == analysis_id).values(enqueued_at=None))
            break  # broker still down; try again next sweep
        sent += 1
    if sent:
        log.info("sweeper: sent %d queued job(s)", sent)
    return sent


def sweep(sf: SessionFactory, settings: Settings, enqueuer: Enqueuer) -> None:
    reap(sf, settings)
    enqueue_pending(sf, settings, enqueuer)
    webhooks.process(sf, settings)  # missed job events, then due webhook deliveries
    registry.process(sf, settings)  # due model-registry updates (MLflow), retried with backoff


class SweeperThread(threading.Thread):
    def __init__(self, sf: SessionFactory, settings: Settings, enqueuer: Enqueuer):
        super().__init__(name="layerscope-sweeper", daemon=True)
        self.sf, self.settings, self.enqueuer = sf, settings, enqueuer
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sweep(self.sf, self.settings, self.enqueuer)
            except Exception as exc:  # database or broker down: keep sweeping
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)
            self.stop_event.wait(self.settings.sweep_interval)
