"""The Celery application of the workers: shared settings, the task, and the sweeper thread.

Start with `layerscope worker` (solo pool: one job at a time per process, which
is what a GPU wants, and no CUDA state is ever forked).
"""

from __future__ import annotations

from celery import signals

from app.config import get_settings
from app.db import session_factory
from app.queue import CeleryEnqueuer, make_celery
from worker.service.sweeper import SweeperThread

settings = get_settings()
celery = make_celery(settings)
celery.conf.include = ["worker.service.tasks"]

_sweeper: SweeperThread | None = None


@signals.setup_logging.connect
def _keep_our_logging(**_: object) -> None:
    """Connected so Celery leaves the JSON logging of `layerscope worker` in place."""


@signals.worker_ready.connect
def _start_sweeper(**_: object) -> None:
    global _sweeper
    _sweeper = SweeperThread(session_factory(settings.resolved_database_url), settings, CeleryEnqueuer(settings))
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_: object) -> None:
    if _sweeper is not None:
        _sweeper.stop_event.set()
