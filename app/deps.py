"""FastAPI dependencies: settings and a database session per request.

Both are `async` so resolving them costs no worker-thread hop: creating a Session does no I/O
(its connection is taken at the first query, in the route's thread), and closing one whose
connection is idle (an autocommit read, or after a commit) does none either. Only a session
left inside a transaction is closed (rolled back) in a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # GET routes only read: they get an autocommit session (no BEGIN/ROLLBACK round trips).
    read = request.method in ("GET", "HEAD") and getattr(request.app.state, "read_session_factory", None)
    session = (read or request.app.state.session_factory)()
    try:
        yield session
    finally:
        if not read and session.in_transaction():
            await run_in_threadpool(session.close)  # a rollback: database I/O, off the event loop
        else:
            session.close()
