"""`layerscope worker-health --name NODE`: the container healthcheck of one worker process.

A worker is healthy when its Celery node answers a ping over the broker, or, since the solo pool
(one job per process, the default) answers no control message while it runs a job, when a job that
node claimed has a heartbeat younger than `LAYERSCOPE_HEARTBEAT_TIMEOUT`. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import datetime as dt
import socket

import typer

from app.config import Settings, get_settings


def node_name(name: str) -> str:
    """Celery's `%h` (the host name), as `layerscope worker --name` expands it."""
    return name.replace("%h", socket.gethostname())


def check(settings: Settings, node: str, timeout: float) -> tuple[bool, str]:
    from sqlalchemy import select

    from app.db import session_factory
    from app.models import Analysis, utcnow
    from app.queue import make_celery

    if make_celery(settings).control.ping(destination=[node], timeout=timeout):
        return True, f"{node} answered a ping"
    with session_factory(settings.resolved_database_url)() as session:
        beat = session.scalar(
            select(Analysis.heartbeat_at)
            .where(Analysis.worker == node, Analysis.state.in_(("RUNNING", "CANCELLING")))
            .order_by(Analysis.heartbeat_at.desc()).limit(1)
        )
    if beat is not None:
        age = (utcnow() - (beat if beat.tzinfo else beat.replace(tzinfo=dt.UTC))).total_seconds()
        if age <= settings.heartbeat_timeout:
            return True, f"{node} is running a job (heartbeat {age:.0f} s ago)"
        return False, f"{node} did not answer, and its job's heartbeat is {age:.0f} s old"
    return False, f"{node} did not answer a ping within {timeout:g} s and runs no job"


def register(app: typer.Typer) -> None:
    @app.command("worker-health")
    def worker_health(
        name: str = typer.Option(..., help="The worker's node name, as given to `layerscope worker --name` "
                                 "(`%h` = this host's name)."),
        timeout: float = typer.Option(5.0, help="Seconds to wait for the ping's answer."),
    ) -> None:
        """Exit 0 when the worker NAME answers a ping or runs a job with a fresh heartbeat, else 1
        (a container healthcheck)."""
        healthy, why = check(get_settings(), node_name(name), timeout)
        typer.echo(why)
        raise typer.Exit(0 if healthy else 1)
