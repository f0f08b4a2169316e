"""Handing accepted jobs to workers: Celery by task name, or the embedded runner.

The database row is the queue's source of truth. The row is committed marked as
sent (`enqueued_at`), then sent; if the send fails (broker down) the mark is cleared
and the workers' sweeper sends it once the broker is back (a job whose process died
between commit and send is re-sent after `requeue_after`). Only the sweeper sends a
row with no mark, so a submit and a sweep never both send one job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from celery import Celery

from app.config import Settings
from app.routing import CPU_QUEUE

log = logging.getLogger("layerscope.queue")

RUN_TASK = "layerscope.run_analysis"


def celery_settings(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by producers and workers (ARCHITECTURE.md, long GPU jobs)."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": 2,
        "socket_timeout": 10,
    }
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_hard_time_limit,
        "task_default_queue": CPU_QUEUE,
        "broker_connection_timeout": 2,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("layerscope")
    app.conf.update(celery_settings(settings))
    return app


class Enqueuer(Protocol):
    def enqueue(self, analysis_id: str, queue: str = CPU_QUEUE) -> bool:
        """Hand the job to a worker of `queue` (`app/routing.py`); False when that could not be done now."""
        ...


class CeleryEnqueuer:
    def __init__(self, settings: Settings):
        self.celery = make_celery(settings)

    def enqueue(self, analysis_id: str, queue: str = CPU_QUEUE) -> bool:
        try:
            self.celery.send_task(RUN_TASK, args=[analysis_id], queue=queue, retry=False)
            return True
        except Exception as exc:  # kombu raises several types when Redis is down
            log.warning("enqueue of %s failed (%s); the sweeper will retry", analysis_id, type(exc).__name__)
            return False


class EmbeddedEnqueuer:
    """The in-process runner polls the table; this only wakes it up early."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    def enqueue(self, analysis_id: str, queue: str = CPU_QUEUE) -> bool:
        self.wakeup.set()
        return True


def make_enqueuer(settings: Settings) -> Enqueuer:
    return EmbeddedEnqueuer() if settings.embedded else CeleryEnqueuer(settings)
