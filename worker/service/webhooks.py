"""The worker side of events: emit on a job's end, evaluate the spec's gate, deliver with retries.

Nothing is lost when a worker dies:
- `on_finished` stores the terminal event (unique per analysis), the spec's gate
  verdict and its event, and the registry updates of an analysis of a registered
  model version (`app/registry.py`) in one transaction. A job that ended without it (the
  worker died right after the final write, or the API or the reaper ended it)
  is found by `emit_missed`, run from every sweep.
- Deliveries are rows (`webhook_deliveries`). A sender takes one by moving its
  `next_attempt_at` past a lease (a conditional update: one sender per attempt);
  if it dies mid-send the lease runs out and the next sweep sends it again.
  Delivery is therefore at least once: receivers deduplicate on `webhook-id`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from app.db import rowcount, session_scope
from app.events import enqueue_event
from app.models import (
    Analysis,
    AnalysisLabel,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from app.registry import RUN, enqueue_update
from app.schemas import JobState
from app.verdicts import evaluate_and_store, find_policy, split_policy_ref
from app.webhooks import TERMINAL_EVENT, UrlRefused, backoff, check_url, encode_body, headers, pinned_request
from worker.service.jobstore import SessionFactory

log = logging.getLogger("layerscope.webhooks")

FINISHED = [s.value for s in JobState if s.finished]


def _analysis_data(session: Any, row: Analysis) -> dict[str, Any]:
    labels = {lab.key: lab.value for lab in session.scalars(
        select(AnalysisLabel).where(AnalysisLabel.analysis_id == row.id))}
    return {
        "analysis_id": row.id,
        "state": row.state,
        "model": row.model_name,
        "labels": labels,
        "attempt": row.attempt,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "error": {"type": row.error_type, "detail": row.error_detail or ""} if row.error_type else None,
        "warnings": len(row.warnings or []),
        "gate_policy": (row.spec or {}).get("gate_policy"),
        "links": {"self": f"/v1/analyses/{row.id}", "verdicts": f"/v1/analyses/{row.id}/verdicts"},
    }


def on_finished(sf: SessionFactory, settings: Settings, analysis_id: str, final: JobState | None = None) -> bool:
    """After a job's final write: its terminal event and, on success, the spec's gate verdict and the
    registry updates. Once per job.

    Reads the state from the row (`final` is informational: a run that lost its job passes None, and
    the event is then the new owner's). Returns True when this call emitted the event. Never raises:
    a missed emission is redone by the sweep (`emit_missed`).
    """
    try:
        with session_scope(sf) as s:
            row = s.get(Analysis, analysis_id)
            if row is None or row.state not in FINISHED:
                return False
            enqueue_event(s, row.project, TERMINAL_EVENT[row.state], _analysis_data(s, row),
                          analysis_id=row.id, dedupe_key=f"terminal:{row.id}")
            if row.state == JobState.SUCCEEDED.value:
                enqueue_update(s, row, RUN)  # a registered version's run, before its verdict (app/registry.py)
            ref = (row.spec or {}).get("gate_policy")
            if row.state == JobState.SUCCEEDED.value and ref:
                name, version = split_policy_ref(ref)
                policy = find_policy(s, row.project, name, version)
                shown = f"{name} version {version}" if version else name
                error = None if policy else f"the spec names gate policy {shown!r}, which this project does not have"
                evaluate_and_store(s, row, name, policy, "spec", error)
        return True
    except IntegrityError:
        return False  # already emitted (by another worker or the sweep)
    except Exception:
        log.exception("events of %s not emitted; the sweep retries", analysis_id)
        return False


def emit_missed(sf: SessionFactory, settings: Settings, limit: int = 100) -> int:
    """Jobs that ended recently without their terminal event (API cancel, reaper, a worker that died)."""
    since = utcnow() - dt.timedelta(seconds=settings.webhook_event_window)
    with session_scope(sf) as s:
        ids = list(s.scalars(
            select(Analysis.id)
            .where(Analysis.state.in_(FINISHED), Analysis.finished_at >= since)
            .where(~exists().where(WebhookEvent.analysis_id == Analysis.id,
                                   WebhookEvent.type.in_(list(TERMINAL_EVENT.values()))))
            .order_by(Analysis.finished_at)
            .limit(limit)
        ))
    return sum(on_finished(sf, settings, i) for i in ids)


def _claim(sf: SessionFactory, settings: Settings, limit: int, due_by: dt.datetime | None = None) -> list[str]:
    """Take up to `limit` deliveries due by `due_by` (default now) by moving them past a lease."""
    now = due_by or utcnow()
    lease = utcnow() + dt.timedelta(seconds=settings.webhook_timeout + 60)
    with session_scope(sf) as s:
        due = list(s.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ))
    taken = []
    for delivery_id in due:
        with session_scope(sf) as s:
            if rowcount(s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .values(next_attempt_at=lease)
            )):
                taken.append(delivery_id)
    return taken


def _send(client: httpx.Client, settings: Settings, url: str, secret: str, event: WebhookEvent) -> tuple[int | None, str | None]:
    try:
        address = check_url(url, settings.webhook_allowed_hosts, settings.webhook_allow_private_networks)
    except UrlRefused as exc:
        return None, f"refused: {exc}"
    body = encode_body(event.id, event.type, event.payload, event.created_at.isoformat())
    target, host_header, extensions = pinned_request(url, address)  # connect to the address just checked
    try:
        resp = client.post(target, content=body, headers={**headers(secret, event.id, body), **host_header},
                           extensions=extensions)
    except httpx.TimeoutException:
        return None, f"timeout after {settings.webhook_timeout:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= resp.status_code < 300:
        return resp.status_code, None
    if 300 <= resp.status_code < 400:
        return resp.status_code, "redirects are not followed"
    return resp.status_code, f"HTTP {resp.status_code}"


def deliver_one(sf: SessionFactory, settings: Settings, delivery_id: str, client: httpx.Client) -> str:
    """Send a claimed delivery once and record the attempt; returns the delivery's new state."""
    with session_scope(sf) as s:
        found = s.execute(
            select(WebhookDelivery, WebhookEvent, Webhook.url, Webhook.secret)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.id == delivery_id)
        ).first()
        if found is None:
            return "gone"  # the webhook was deleted meanwhile
        delivery, event, url, secret = found
        s.expunge_all()
    started, t0 = utcnow(), time.perf_counter()
    status, error = _send(client, settings, url, secret, event)
    elapsed = (time.perf_counter() - t0) * 1000
    attempt = delivery.attempts + 1
    ok = error is None
    if ok:
        values: dict[str, Any] = {"state": "delivered", "delivered_at": utcnow(), "next_attempt_at": None}
    elif attempt >= settings.webhook_max_attempts:
        values = {"state": "failed", "next_attempt_at": None}
    else:
        delay = backoff(attempt, settings.webhook_backoff_base, settings.webhook_backoff_max)
        values = {"state": "pending", "next_attempt_at": utcnow() + dt.timedelta(seconds=delay)}
    with session_scope(sf) as s:
        if s.get(WebhookDelivery, delivery_id) is None:
            return "gone"
        s.add(WebhookAttempt(id=str(uuid.uuid4()), delivery_id=delivery_id, attempt=attempt, started_at=started,
                             duration_ms=round(elapsed, 3), status_code=status, error=error))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                  .values(attempts=attempt, last_status=status, last_error=error, **values))
    level = logging.INFO if ok else logging.WARNING
    log.log(level, "webhook %s %s -> %s (attempt %d): %s", event.type, event.id, url, attempt, error or status)
    return values["state"]


def deliver_due(
    sf: SessionFactory,
    settings: Settings,
    limit: int = 50,
    budget_s: float = 30.0,
    client: httpx.Client | None = None,
) -> int:
    """Send due deliveries, one claim at a time, until none is due, `limit` were sent or `budget_s` passed.

    The budget keeps a slow receiver from holding up the rest of the sweep (reaping, job pick-up).
    """
    deadline = time.monotonic() + budget_s
    due_by = utcnow()  # a retry scheduled during this call waits for a later one
    sent = 0
    own = client is None
    try:
        while sent < limit and time.monotonic() < deadline:
            taken = _claim(sf, settings, 1, due_by)
            if not taken:
                break
            if client is None:
                client = httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False)
            try:
                deliver_one(sf, settings, taken[0], client)
            except Exception:  # its lease runs out and a later sweep tries again
                log.exception("delivery %s not recorded", taken[0])
            sent += 1
    finally:
        if own and client is not None:
            client.close()
    return sent


def process(sf: SessionFactory, settings: Settings, budget_s: float = 30.0) -> None:
    """One sweep's worth of webhook work: emit missed events, then send what is due. Never raises."""
    try:
        emit_missed(sf, settings)
        deliver_due(sf, settings, budget_s=budget_s)
    except Exception as exc:  # database down: the next sweep tries again
        log.warning("webhook sweep failed: %s: %s", type(exc).__name__, exc)
