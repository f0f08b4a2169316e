"""The FastAPI application factory."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from app import problems
from app.api import analyses, dashboard, gates, health, keys, metrics, webhooks
from app.config import Settings, get_settings
from app.db import session_factory
from app.queue import Enqueuer, make_enqueuer
from app.ratelimit import TokenBucket

DESCRIPTION = """
Layer analysis of transformer language models: which layers matter (AVSS),
which can be pruned, and which drive hallucination.

Submit an analysis with `POST /v1/analyses`, poll `GET /v1/analyses/{id}` until
its `state` is SUCCEEDED, FAILED or CANCELLED, then read `/layers`, `/metrics`
and `/artifacts`. Every route but `/healthz` and `/readyz` needs
`Authorization: Bearer <key>`. Errors are `application/problem+json`.
"""


def create_app(settings: Settings | None = None, enqueuer: Enqueuer | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="layerscope", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.resolved_database_url)
    app.state.enqueuer = enqueuer or make_enqueuer(settings)
    app.state.rate_limiter = TokenBucket(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    if settings.auth_disabled:
        logging.getLogger("layerscope.api").warning(
            "AUTH IS DISABLED (LAYERSCOPE_AUTH_DISABLED=true): every request acts on project %r. Local use only.",
            settings.default_project,
        )

    @app.middleware("http")
    async def limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return problems.problem_response(
                413, f"Request body over the limit of {settings.max_body_bytes} bytes."
            )
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.HTTP_LATENCY.labels(
            request.method, getattr(route, "path", "unmatched"), str(response.status_code)
        ).observe(time.perf_counter() - started)
        return response

    problems.install(app)
    app.include_router(health.router)
    app.include_router(analyses.router)
    app.include_router(keys.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(gates.router)
    app.include_router(webhooks.router)

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return Response(status_code=307, headers={"Location": "/docs"})

    return app
