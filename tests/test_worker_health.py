"""`layerscope worker-health`: a ping over a real Redis, else the heartbeat of the job the node runs
(the solo pool answers no ping while it runs a job). The answered-ping case is in
tests/integration/test_wheel.py, against a real worker process."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

from app.db import session_factory
from app.models import utcnow
from cli.health import check, node_name
from tests.conftest import make_settings
from tests.test_jobs import new_job

NODE = "layerscope-health-test@nowhere"


def test_a_node_that_does_not_answer_and_runs_nothing_is_unhealthy(sqlite_url: str, redis_url: str,
                                                                   tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, redis_url=redis_url)
    healthy, why = check(settings, NODE, timeout=0.3)
    assert not healthy and "runs no job" in why


def test_a_busy_node_is_healthy_while_its_job_heartbeats(sqlite_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, redis_url=redis_url, heartbeat_timeout=60)
    sf = session_factory(settings.resolved_database_url)
    new_job(sf, "RUNNING", worker=NODE, heartbeat_at=utcnow() - dt.timedelta(seconds=5))
    new_job(sf, "RUNNING", worker="another@host", heartbeat_at=utcnow() - dt.timedelta(seconds=500))
    healthy, why = check(settings, NODE, timeout=0.3)
    assert healthy and "running a job" in why

    stale = make_settings(sqlite_url, tmp_path, redis_url=redis_url, heartbeat_timeout=2)
    healthy, why = check(stale, NODE, timeout=0.3)
    assert not healthy and "heartbeat" in why


def test_percent_h_is_this_host() -> None:
    assert node_name("gpu0@%h") == f"gpu0@{socket.gethostname()}"
