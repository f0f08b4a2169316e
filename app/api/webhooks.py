"""Webhooks (admin scope): register a receiver, list, delete, and read every delivery attempt.

Events are written to an outbox table (`webhook_events`, fanned out to one
`webhook_deliveries` row per subscribed webhook) in the same transaction as the
change they report; the workers' sweeper sends them with retries
(`worker/service/webhooks.py`). `app.events.enqueue_event` is the one way to emit an event.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.guard import GuardedRoute
from app.auth import Principal, require
from app.config import Settings
from app.deps import get_session, get_settings_dep
from app.models import Webhook, WebhookAttempt, WebhookDelivery, WebhookEvent, utcnow
from app.problems import Problem
from app.schemas import Strict
from app.webhooks import EVENT_TYPES, UrlRefused, check_url, generate_secret

PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/problem+json": {}}}
    for code, desc in {
        401: "Missing or invalid API key",
        403: "The key lacks the admin scope",
        404: "No such webhook in this key's project",
        422: "Invalid request, or a URL this server refuses to call",
        400: "The body could not be read (e.g. JSON that is not UTF-8)",
        413: "Request body over the size limit",
        429: "Rate limit of this API key exceeded (see Retry-After)",
        503: "Database unavailable",
    }.items()
}
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=PROBLEMS, route_class=GuardedRoute)

DeliveryState = Literal["pending", "delivered", "failed"]


# ----------------------------------------------------------------- models


class WebhookCreate(Strict):
    url: str = Field(min_length=8, max_length=2048, description="http(s) URL that receives the POSTs.")
    secret: str | None = Field(
        None, min_length=16, max_length=255,
        description="Signing secret (`whsec_<base64>` or any string of 16+ characters); generated when omitted.",
    )
    event_types: list[str] = Field(
        default_factory=list, max_length=len(EVENT_TYPES),
        description=f"Only these events; empty means all of {list(EVENT_TYPES)}.",
    )
    description: str | None = Field(None, max_length=255)

    @field_validator("event_types")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")
        return sorted(set(value))


class WebhookOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    description: str | None
    created_at: dt.datetime
    links: dict[str, str]


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret; store it now, it is not shown again.")


class AttemptOut(BaseModel):
    attempt: int
    started_at: dt.datetime
    duration_ms: float | None
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    event_id: str = Field(description="The `webhook-id` header; the same on every retry.")
    event_type: str
    analysis_id: str | None
    state: DeliveryState
    attempt_count: int
    next_attempt_at: dt.datetime | None
    last_status: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    attempts: list[AttemptOut]


class DeliveryList(BaseModel):
    webhook_id: str
    items: list[DeliveryOut]


def _out(row: Webhook) -> dict[str, Any]:
    return {
        "id": row.id, "url": row.url, "event_types": list(row.event_types or []), "description": row.description,
        "created_at": row.created_at,
        "links": {"self": f"/v1/webhooks/{row.id}", "deliveries": f"/v1/webhooks/{row.id}/deliveries"},
    }


def _get_owned(session: Session, principal: Principal, webhook_id: str) -> Webhook:
    row = session.get(Webhook, webhook_id)
    if row is None or row.project != principal.project:
        raise Problem(404, f"No webhook {webhook_id!r} in this project.")
    return row


# ----------------------------------------------------------------- routes


@router.post(
    "", status_code=201, response_model=WebhookCreated, summary="Register a webhook",
    description=(
        "Every terminal state of an analysis (`analysis.succeeded|failed|cancelled`) and every gate verdict "
        "(`gate.verdict`), and every model-registry update of an analysis of a registered version "
        "(`registry.updated`, or `registry.failed` once its retries are spent) is POSTed as JSON, signed Standard-Webhooks style (`webhook-id`, `webhook-timestamp`, "
        "`webhook-signature: v1,<base64 HMAC-SHA256>`), retried with exponential backoff until a 2xx. "
        "Hosts on private networks are refused unless the server allows them."
    ),
)
def create_webhook(
    body: WebhookCreate,
    response: Response,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings_dep),
) -> WebhookCreated:
    try:
        # Names are resolved at delivery (by the worker); here only literal addresses and localhost are checked.
        check_url(body.url, settings.webhook_allowed_hosts, settings.webhook_allow_private_networks, resolve=False)
    except UrlRefused as exc:
        raise Problem(422, f"url: {exc}", errors=[{"field": "url", "message": str(exc)}]) from None
    row = Webhook(
        id=str(uuid.uuid4()), project=principal.project, url=body.url, secret=body.secret or generate_secret(),
        event_types=body.event_types, description=body.description, created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    response.headers["Location"] = f"/v1/webhooks/{row.id}"
    return WebhookCreated(**_out(row), secret=row.secret)


@router.get("", response_model=list[WebhookOut], summary="List this project's webhooks")
def list_webhooks(
    principal: Principal = Depends(require("admin")), session: Session = Depends(get_session)
) -> list[WebhookOut]:
    rows = session.scalars(
        select(Webhook).where(Webhook.project == principal.project).order_by(Webhook.created_at, Webhook.id)
    )
    return [WebhookOut(**_out(r)) for r in rows]


@router.get("/{webhook_id}", response_model=WebhookOut, summary="Get a webhook")
def get_webhook(
    webhook_id: str, principal: Principal = Depends(require("admin")), session: Session = Depends(get_session)
) -> WebhookOut:
    return WebhookOut(**_out(_get_owned(session, principal, webhook_id)))


@router.delete("/{webhook_id}", status_code=204, summary="Delete a webhook and its delivery log")
def delete_webhook(
    webhook_id: str, principal: Principal = Depends(require("admin")), session: Session = Depends(get_session)
) -> Response:
    session.delete(_get_owned(session, principal, webhook_id))
    session.commit()
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries", response_model=DeliveryList, summary="Deliveries and every attempt",
    description="Newest first: each event sent to this webhook, its state, and every attempt's status, time, error.",
)
def list_deliveries(
    webhook_id: str,
    state: DeliveryState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
) -> DeliveryList:
    hook = _get_owned(session, principal, webhook_id)
    query = (
        select(WebhookDelivery, WebhookEvent.type, WebhookEvent.analysis_id)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookDelivery.webhook_id == hook.id)
    )
    if state:
        query = query.where(WebhookDelivery.state == state)
    rows = session.execute(
        query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)
    ).all()
    attempts: dict[str, list[AttemptOut]] = {r[0].id: [] for r in rows}
    if attempts:
        for a in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.started_at, WebhookAttempt.attempt)
        ):
            attempts[a.delivery_id].append(AttemptOut(
                attempt=a.attempt, started_at=a.started_at, duration_ms=a.duration_ms,
                status_code=a.status_code, error=a.error,
            ))
    items = [
        DeliveryOut(
            id=d.id, event_id=d.event_id, event_type=etype, analysis_id=aid, state=d.state,  # type: ignore[arg-type]
            attempt_count=d.attempts, next_attempt_at=d.next_attempt_at, last_status=d.last_status,
            last_error=d.last_error, created_at=d.created_at, delivered_at=d.delivered_at, attempts=attempts[d.id],
        )
        for d, etype, aid in rows
    ]
    return DeliveryList(webhook_id=hook.id, items=items)
