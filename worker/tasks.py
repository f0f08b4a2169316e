"""Celery tasks: thin wrappers around `worker.runner.run_job`."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded

from app.db import session_factory
from app.queue import RUN_TASK
from worker.celery_app import celery, settings
from worker.runner import run_job


@celery.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True)
def run_analysis(self, analysis_id: str) -> str | None:  # type: ignore[no-untyped-def]
    final = run_job(
        analysis_id,
        session_factory(settings.resolved_database_url),
        settings,
        worker_name=self.request.hostname or "celery",
        timeout_exceptions=(SoftTimeLimitExceeded,),
    )
    return final.value if final else None
