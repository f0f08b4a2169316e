"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from app import openapi, problems
from app.api import analyses, answers, catalog, dashboard, gates, health, keys, metrics, webhooks
from app.auth import KeyCache
from app.config import Settings, get_settings
from app.db import read_session_factory, session_factory
from app.queue import Enqueuer, make_enqueuer
from app.ratelimit import TokenBucket

DESCRIPTION = """
Layer analysis of transformer language models: which layers matter (AVSS),
which can be pruned, which drive hallucination (EAVSS and calibrated detectors),
and whether tuning those layers helps (`mitigate`, measured against a random-layer
control; its patch is applied with `model.patch`).

Submit an analysis with `POST /v1/analyses`, poll `GET /v1/analyses/{id}` until
its `state` is SUCCEEDED, FAILED or CANCELLED, then read `/layers`, `/metrics`,
`/answers` and `/artifacts`. Every route but `/healthz` and `/readyz` needs
`Authorization: Bearer <key>`. Errors are `application/problem+json`.
"""


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class _ContentLengthLimit:
    """A declared Content-Length over the limit is a 413 before any of the body is read."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                response = problems.problem_response(
                    413, f"Request body over the limit of {self.max_body_bytes} bytes."
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _InflightLimit:
    """At most `limit` requests are worked on at once; the rest wait here, in the event loop, in order.

    Each request in progress may hold a database connection, so with `limit` at most the pool's 10
    steady connections a burst waits for its turn instead of timing out on the pool (503) or opening
    and closing overflow connections, and fewer threads contend for the GIL. `/healthz` is never held
    back: liveness must not queue.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.limit <= 0 or scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # one semaphore per event loop (test clients start their own)
            self.loop, self.slots = loop, asyncio.Semaphore(self.limit)
        assert self.slots is not None
        async with self.slots:
            await self.app(scope, receive, send)


class _Measure:
    """HTTP latency by method, route template and status (Prometheus), waiting time included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            metrics.HTTP_LATENCY.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, enqueuer: Enqueuer | None = None) -> FastAPI:
    settings = settings or get_settings()
    # /docs and /redoc from assets shipped in a package, so they render without internet.
    app = FastAPIOffline(
        title="layerscope", version="0.1.0", description=DESCRIPTION,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.resolved_database_url)
    app.state.read_session_factory = read_session_factory(settings.resolved_database_url)
    app.state.enqueuer = enqueuer or make_enqueuer(settings)
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    app.state.rate_limiter = TokenBucket(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    if settings.auth_disabled:
        logging.getLogger("layerscope.api").warning(
            "AUTH IS DISABLED (LAYERSCOPE_AUTH_DISABLED=true): every request acts on project %r. Local use only.",
            settings.default_project,
        )

    # Plain ASGI middlewares (no per-request task group and body streams as with @app.middleware).
    # Outermost first: measure -> in-flight limit -> Content-Length limit -> streamed-body limit -> app.
    # The streamed (chunked) body is counted as it arrives; FastAPI turns its overflow into a 413
    # that problems.py renders.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    app.add_middleware(_ContentLengthLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(_InflightLimit, limit=settings.max_inflight_requests)
    app.add_middleware(_Measure)

    problems.install(app)
    app.include_router(health.router)
    app.include_router(analyses.router)
    app.include_router(answers.router)
    app.include_router(catalog.router)
    app.include_router(keys.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(gates.router)
    app.include_router(webhooks.router)
    openapi.install(app)

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return Response(status_code=307, headers={"Location": "/docs"})

    return app
