"""The embedded worker: a thread in the API process that runs queued jobs from the table.

Used when no broker is configured (`layerscope serve` with no REDIS_URL): the
database row is the queue, and the same `run_job` runs the same pipeline.
"""

from __future__ import annotations

import logging
import socket
import threading

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.models import Analysis
from app.queue import EmbeddedEnqueuer
from app.schemas import JobState
from worker.service import registry, webhooks
from worker.service.jobstore import SessionFactory
from worker.service.runner import Pipeline, run_job
from worker.service.sweeper import reap

log = logging.getLogger("layerscope.embedded")


class EmbeddedWorker(threading.Thread):
    def __init__(
        self,
        sf: SessionFactory,
        settings: Settings,
        enqueuer: EmbeddedEnqueuer,
        pipeline: Pipeline | None = None,
    ):
        super().__init__(name="layerscope-embedded-worker", daemon=True)
        self.sf, self.settings, self.enqueuer, self.pipeline = sf, settings, enqueuer, pipeline
        self.stop_event = threading.Event()
        self.name_for_jobs = f"embedded@{socket.gethostname()}"

    def next_job(self) -> str | None:
        with session_scope(self.sf) as s:
            return s.scalar(
                select(Analysis.id)
                .where(Analysis.state == JobState.QUEUED.value)
                .order_by(Analysis.created_at)
                .limit(1)
            )

    def run(self) -> None:
        log.info("embedded worker started")
        while not self.stop_event.is_set():
            try:
                reap(self.sf, self.settings)
                webhooks.process(self.sf, self.settings)
                registry.process(self.sf, self.settings)
                job = self.next_job()
                if job is not None:
                    run_job(job, self.sf, self.settings, self.name_for_jobs, self.pipeline)
                    continue
            except Exception:
                log.exception("embedded worker loop error")
            self.enqueuer.wakeup.wait(1.0)
            self.enqueuer.wakeup.clear()

    def stop(self) -> None:
        self.stop_event.set()
        self.enqueuer.wakeup.set()
