"""Emitting webhook events: the outbox (`webhook_events`, fanned out to one
`webhook_deliveries` row per subscribed webhook), written in the same transaction as
the change it reports; the workers' sweeper sends them (`worker/service/webhooks.py`).
`enqueue_event` is the one way to emit an event, used by the API routes and the worker.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Webhook, WebhookDelivery, WebhookEvent, utcnow
from app.webhooks import EVENT_TYPES


def enqueue_event(
    session: Session,
    project: str,
    event_type: str,
    data: dict[str, Any],
    *,
    analysis_id: str | None = None,
    dedupe_key: str | None = None,
) -> WebhookEvent:
    """Store an event and one pending delivery per subscribed webhook, in the caller's transaction.

    With a `dedupe_key` a second emission of the same event raises IntegrityError at the flush.
    """
    assert event_type in EVENT_TYPES, event_type
    now = utcnow()
    event = WebhookEvent(
        id=f"evt_{uuid.uuid4().hex}", project=project, type=event_type, analysis_id=analysis_id,
        dedupe_key=dedupe_key, payload=data, created_at=now,
    )
    session.add(event)
    session.flush()
    for hook in session.scalars(select(Webhook).where(Webhook.project == project)):
        if hook.event_types and event_type not in hook.event_types:
            continue
        session.add(WebhookDelivery(
            id=str(uuid.uuid4()), webhook_id=hook.id, event_id=event.id, state="pending", attempts=0,
            next_attempt_at=now, created_at=now,
        ))
    return event
