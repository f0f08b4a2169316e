"""Celery tasks: thin wrappers around `worker.service.runner.run_job`."""

from __future__ import annotations

import logging
import os

from celery.exceptions import SoftTimeLimitExceeded

from app.db import session_factory
from app.queue import RUN_TASK
from worker.service.celery_app import celery, settings
from worker.service.runner import EXIT_DEVICE_ERROR, run_job


def _exit_for_restart() -> None:
    """After a non-OOM CUDA error (the job is already requeued): end this process, whose CUDA
    context is unusable, so its supervisor (a restart policy, `layerscope worker --gpus`)
    starts a fresh one. The unacknowledged message is harmless: only a QUEUED row is claimed."""
    logging.shutdown()
    os._exit(EXIT_DEVICE_ERROR)


@celery.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True)
def run_analysis(self, analysis_id: str) -> str | None:
    final = run_job(
        analysis_id,
        session_factory(settings.resolved_database_url),
        settings,
        worker_name=self.request.hostname or "celery",
        timeout_exceptions=(SoftTimeLimitExceeded,),
        on_device_error=_exit_for_restart,
    )
    return final.value if final else None
