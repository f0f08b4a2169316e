"""Prometheus metrics (`/metrics`): jobs by state, queue depth, HTTP latency, stage durations.

Service-wide numbers (every project's jobs, all traffic), so they need the `operator` scope, which
no project key has (a project `admin` gets 403) and only the server's CLI grants."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from app.auth import OPERATOR, Principal, require
from app.models import Analysis
from app.routing import QUEUES
from app.schemas import JobState

router = APIRouter(tags=["health"])

REGISTRY = CollectorRegistry()
HTTP_LATENCY = Histogram(
    "layerscope_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
    registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS = Gauge("layerscope_jobs", "Analyses by state", ["state"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "layerscope_queue_depth", "Messages waiting per broker queue, cpu and gpu (-1: unknown; embedded mode: "
    "queued jobs, queue=embedded)", ["queue"], registry=REGISTRY,
)
STAGE_SECONDS = Gauge(
    "layerscope_stage_seconds_mean", "Mean duration of finished stages (from stored timings)", ["stage"],
    registry=REGISTRY,
)


@router.get(
    "/metrics", summary="Prometheus metrics (service-wide: operator scope)", response_class=Response,
    description="Jobs by state over every project, queue depth, HTTP latency and stage durations. Needs an "
    "`operator` key (`layerscope keys create --scopes operator`); a project admin key is 403.",
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}},
        **{code: {"description": desc, "content": {"application/problem+json": {}}} for code, desc in {
            401: "Missing or invalid API key", 403: "The key lacks the operator scope",
            429: "Rate limit of this API key exceeded (see Retry-After)", 503: "Database unavailable",
        }.items()},
    },
)
def prometheus_metrics(request: Request, principal: Principal = Depends(require(OPERATOR))) -> Response:
    settings = request.app.state.settings
    with request.app.state.session_factory() as session:
        counts = dict(session.execute(select(Analysis.state, func.count()).group_by(Analysis.state)).all())
        timings = session.scalars(
            select(Analysis.summary).where(Analysis.state == JobState.SUCCEEDED.value)
            .order_by(Analysis.finished_at.desc()).limit(200)
        ).all()
    for state in JobState:
        JOBS.labels(state.value).set(counts.get(state.value, 0))
    per_stage: dict[str, list[float]] = {}
    for summary in timings:
        for stage, result in (summary or {}).items():
            seconds = result.get("seconds") if isinstance(result, dict) else None
            if isinstance(seconds, int | float):
                per_stage.setdefault(stage, []).append(float(seconds))
    for stage, values in per_stage.items():
        STAGE_SECONDS.labels(stage).set(sum(values) / len(values))
    if settings.embedded:
        QUEUE_DEPTH.labels("embedded").set(counts.get(JobState.QUEUED.value, 0))
    else:
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)
            for queue in QUEUES:
                QUEUE_DEPTH.labels(queue).set(client.llen(queue))
            client.close()
        except redis.RedisError:
            for queue in QUEUES:
                QUEUE_DEPTH.labels(queue).set(-1)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
