"""Liveness (`/healthz`) and readiness (`/readyz`: database and broker reachable)."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database and broker reachable",
    responses={503: {"description": "A dependency is down", "content": {"application/problem+json": {}}}},
)
def readyz(request: Request) -> Any:
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    if settings.embedded:
        checks["broker"] = "embedded (in-process worker)"
    else:
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)
            client.ping()
            client.close()
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"unreachable ({type(exc).__name__})"
    ready = all(v == "ok" or v.startswith("embedded") for v in checks.values())
    if ready:
        return {"status": "ready", "checks": checks}
    return JSONResponse(
        {"type": "about:blank", "title": "Service unavailable", "status": 503,
         "detail": "Not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
         "checks": checks},
        status_code=503, media_type="application/problem+json", headers={"Retry-After": "5"},
    )
