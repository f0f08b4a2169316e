"""Webhook delivery on a real database to a real HTTP receiver on 127.0.0.1 that checks signatures.

Covers: Standard-Webhooks signatures, a failed delivery retried with backoff then
delivered, the attempt cap, a sender dying mid-send, events of jobs that ended
outside the runner (API cancel, reaper, a worker dying after its final write),
the spec's gate verdict event, and the sweeper and embedded-worker hooks.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.auth import create_key
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis, WebhookDelivery, WebhookEvent, utcnow
from app.queue import EmbeddedEnqueuer
from app.schemas import JobState
from app.webhooks import InvalidSignature, generate_secret, headers, sign, verify
from tests.api.conftest import SPEC
from tests.conftest import make_settings
from worker.service import jobstore
from worker.service.runner import run_job
from worker.service.sweeper import reap, sweep
from worker.service.webhooks import _claim, deliver_due, emit_missed, process
from worker.stage import LayerRow, StageResult


class Receiver:
    """A webhook endpoint: verifies every signature independently, answers `statuses` in turn (then 204)."""

    def __init__(self, secret: str, statuses: list[int] | None = None):
        self.secret, self.statuses = secret, list(statuses or [])
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append({"headers": hdrs, "body": body, "valid": receiver.valid(hdrs, body)})
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def valid(self, hdrs: dict[str, str], body: bytes) -> bool:
        """Standard Webhooks verification written out, not using the service's code."""
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        signed = f"{hdrs['webhook-id']}.{hdrs['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        fresh = abs(time.time() - int(hdrs["webhook-timestamp"])) < 60
        given = [s.split(",", 1)[1] for s in hdrs["webhook-signature"].split() if s.startswith("v1,")]
        return fresh and any(hmac.compare_digest(expected, g) for g in given)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    client: TestClient
    settings: Any
    sf: Any
    key: str

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers={"Authorization": f"Bearer {self.key}"}, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers={"Authorization": f"Bearer {self.key}"}, **kw)

    def register(self, receiver: Receiver, **body: Any) -> str:
        resp = self.post("/v1/webhooks", json={"url": receiver.url, "secret": receiver.secret, **body})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def deliveries(self, hook: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/webhooks/{hook}/deliveries").json()["items"]

    def submit(self, spec: dict | None = None) -> str:
        resp = self.post("/v1/analyses", json=spec or SPEC)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Env:
    settings = make_settings(
        db_url, tmp_path, webhook_allowed_hosts=["127.0.0.1"], webhook_backoff_base=0.2, webhook_backoff_max=1.0,
        webhook_max_attempts=3, webhook_timeout=2.0,
    )
    sf = session_factory(settings.resolved_database_url)
    # The Postgres database is shared by the run: settle what earlier tests left (events of their jobs,
    # deliveries to their receivers) so that counts here are this test's own.
    while emit_missed(sf, settings):
        pass
    with session_scope(sf) as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.state == "pending").values(state="failed"))
        key = create_key(s, settings, f"hooks-{uuid.uuid4().hex[:8]}", "t", ["read", "submit", "admin"])
    return Env(TestClient(create_app(settings)), settings, sf, key)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(generate_secret())
    yield r
    r.close()


def ok_pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
    save(StageResult(stage="avss", layers=[LayerRow(i, f"b{i}", "avss", {"avss": float(i)}) for i in range(3)]))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_signing_matches_the_standard_webhooks_construction() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"a":1}'
    hdrs = headers(secret, "evt_1", body, timestamp=1_700_000_000)
    expected = base64.b64encode(hmac.new(b"k" * 32, b"evt_1.1700000000." + body, hashlib.sha256).digest()).decode()
    assert hdrs["webhook-signature"] == f"v1,{expected}"
    verify(secret, hdrs, body, now=1_700_000_010)
    with pytest.raises(InvalidSignature):
        verify(secret, hdrs, b'{"a":2}', now=1_700_000_010)
    with pytest.raises(InvalidSignature):
        verify(secret, hdrs, body, now=1_700_001_000)  # a replay, too old
    with pytest.raises(InvalidSignature):
        verify(secret, {**hdrs, "webhook-id": "evt_2"}, body, now=1_700_000_010)
    # A plain (non-whsec) secret is used as its UTF-8 bytes.
    plain = sign("plain-secret-123456", "m", 5, b"x")
    assert plain == "v1," + base64.b64encode(hmac.new(b"plain-secret-123456", b"m.5.x", hashlib.sha256).digest()).decode()


def test_failed_delivery_is_retried_with_backoff_then_succeeds(env: Env) -> None:
    receiver = Receiver(generate_secret(), statuses=[500])
    # A backoff long enough that "not due yet" holds on a loaded machine (0.2 s did not, under 8 busy processes).
    env.settings.webhook_backoff_base, env.settings.webhook_backoff_max = 2.0, 4.0
    try:
        hook = env.register(receiver)
        job = env.submit()
        assert run_job(job, env.sf, env.settings, "w1", ok_pipeline) == JobState.SUCCEEDED
        assert deliver_due(env.sf, env.settings) == 1
        (d,) = env.deliveries(hook)
        assert d["state"] == "pending" and d["attempt_count"] == 1 and d["last_status"] == 500
        assert d["attempts"][0]["status_code"] == 500 and d["attempts"][0]["error"] == "HTTP 500"
        next_at = dt.datetime.fromisoformat(d["next_attempt_at"])
        assert dt.timedelta(seconds=0.1) < next_at - dt.datetime.fromisoformat(d["attempts"][0]["started_at"])
        assert deliver_due(env.sf, env.settings) == 0  # not due yet: backoff
        wait_for(lambda: utcnow() >= next_at)
        assert deliver_due(env.sf, env.settings) == 1
        (d,) = env.deliveries(hook)
        assert d["state"] == "delivered" and d["delivered_at"] and d["next_attempt_at"] is None
        assert [a["status_code"] for a in d["attempts"]] == [500, 204] and d["attempts"][1]["error"] is None
        assert all(a["duration_ms"] is not None for a in d["attempts"])

        first, second = receiver.received
        assert first["valid"] and second["valid"]
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == d["event_id"]
        event = json.loads(second["body"])
        assert event["type"] == "analysis.succeeded" and event["id"] == d["event_id"]
        assert event["data"]["analysis_id"] == job and event["data"]["state"] == "SUCCEEDED"
        assert event["data"]["labels"] == {"team": "research"}
        assert deliver_due(env.sf, env.settings) == 0  # delivered is final
    finally:
        receiver.close()


def test_attempt_cap_ends_failed_and_unreachable_receivers_record_the_error(env: Env) -> None:
    receiver = Receiver(generate_secret(), statuses=[503] * 10)
    try:
        env.settings.webhook_backoff_base = 0.01
        hook = env.register(receiver)
        job = env.submit()
        run_job(job, env.sf, env.settings, "w1", ok_pipeline)
        for _ in range(env.settings.webhook_max_attempts):
            wait_for(lambda: deliver_due(env.sf, env.settings) == 1, timeout=5)
        (d,) = env.deliveries(hook)
        assert d["state"] == "failed" and d["attempt_count"] == 3 and d["next_attempt_at"] is None
        assert [a["status_code"] for a in d["attempts"]] == [503, 503, 503]
        time.sleep(0.05)
        assert deliver_due(env.sf, env.settings) == 0
    finally:
        receiver.close()

    # A receiver that is gone: the connection error is recorded, the delivery stays pending for a retry.
    env.settings.webhook_backoff_base = 5.0
    assert env.client.delete(f"/v1/webhooks/{hook}", headers={"Authorization": f"Bearer {env.key}"}).status_code == 204
    dead = Receiver(generate_secret())
    dead.close()
    hook = env.register(dead)
    other = env.submit()
    run_job(other, env.sf, env.settings, "w1", ok_pipeline)
    assert deliver_due(env.sf, env.settings) == 1
    (d,) = env.deliveries(hook)
    assert d["state"] == "pending" and d["attempts"][0]["status_code"] is None
    assert "Connect" in d["attempts"][0]["error"]


def test_a_sender_dying_mid_send_does_not_lose_the_event(env: Env, receiver: Receiver) -> None:
    hook = env.register(receiver)
    job = env.submit()
    run_job(job, env.sf, env.settings, "w1", ok_pipeline)
    taken = _claim(env.sf, env.settings, 10)  # a sender takes it ... and dies before sending
    assert len(taken) == 1
    assert deliver_due(env.sf, env.settings) == 0  # leased: nobody else sends it meanwhile
    with session_scope(env.sf) as s:  # the lease runs out
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == taken[0])
                  .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
    assert deliver_due(env.sf, env.settings) == 1
    assert env.deliveries(hook)[0]["state"] == "delivered"
    assert len(receiver.received) == 1 and receiver.received[0]["valid"]


def test_jobs_ended_outside_the_runner_still_emit_their_event_once(env: Env, receiver: Receiver) -> None:
    hook = env.register(receiver)
    # 1. Cancelled through the API while queued.
    cancelled = env.submit()
    assert env.post(f"/v1/analyses/{cancelled}/cancel").json()["state"] == "CANCELLED"
    # 2. Failed by the reaper (worker lost on its last attempt).
    lost = env.submit()
    with session_scope(env.sf) as s:
        s.execute(update(Analysis).where(Analysis.id == lost).values(
            state="RUNNING", attempt=env.settings.max_attempts,
            heartbeat_at=utcnow() - dt.timedelta(seconds=env.settings.heartbeat_timeout + 5)))
    reap(env.sf, env.settings)
    # 3. A worker that died right after its final write (no end-of-job hook ran).
    crashed = env.submit()
    token = jobstore.claim(env.sf, crashed, "w-dead")
    jobstore.finish(env.sf, crashed, token, JobState.SUCCEEDED)

    assert emit_missed(env.sf, env.settings) == 3
    assert emit_missed(env.sf, env.settings) == 0
    process(env.sf, env.settings)
    got = {e["data"]["analysis_id"]: e["type"] for e in receiver.events()}
    assert got == {cancelled: "analysis.cancelled", lost: "analysis.failed", crashed: "analysis.succeeded"}
    assert all(r["valid"] for r in receiver.received)
    failed = next(e for e in receiver.events() if e["type"] == "analysis.failed")
    assert failed["data"]["error"]["type"] == "worker_lost"
    assert all(d["state"] == "delivered" for d in env.deliveries(hook))
    with env.sf() as s:
        assert len(list(s.scalars(select(WebhookEvent).where(WebhookEvent.analysis_id.in_(
            [cancelled, lost, crashed]))))) == 3


def test_gate_verdict_events_and_event_type_filters(env: Env) -> None:
    everything = Receiver(generate_secret())
    verdicts_only = Receiver(generate_secret())
    try:
        env.register(everything)
        env.register(verdicts_only, event_types=["gate.verdict"])
        assert env.post("/v1/gates", json={"name": "release", "rules": ["layers.avss.warnings == 0",
                                                                        "layers.avss.avss.avss.count == 3"]}).status_code == 201
        job = env.submit({**copy.deepcopy(SPEC), "gate_policy": "release"})
        run_job(job, env.sf, env.settings, "w1", ok_pipeline)
        verdict = env.post(f"/v1/analyses/{job}/gate", params={"policy": "release"}).json()
        process(env.sf, env.settings)
        assert sorted(e["type"] for e in everything.events()) == ["analysis.succeeded", "gate.verdict", "gate.verdict"]
        events = verdicts_only.events()
        assert [e["type"] for e in events] == ["gate.verdict", "gate.verdict"]
        assert {e["data"]["trigger"] for e in events} == {"spec", "api"}
        api_event = next(e for e in events if e["data"]["trigger"] == "api")
        assert api_event["data"]["id"] == verdict["id"] and api_event["data"]["passed"] is True
        assert api_event["data"]["rules"][1]["observed"] == 3
        assert all(r["valid"] for r in everything.received + verdicts_only.received)
    finally:
        everything.close()
        verdicts_only.close()


def test_delivery_refuses_hosts_the_url_policy_forbids(env: Env, receiver: Receiver) -> None:
    hook = env.register(receiver)
    env.settings.webhook_allowed_hosts = []  # the policy tightened after registration
    job = env.submit()
    run_job(job, env.sf, env.settings, "w1", ok_pipeline)
    assert deliver_due(env.sf, env.settings) == 1
    (d,) = env.deliveries(hook)
    assert receiver.received == [] and d["attempts"][0]["error"].startswith("refused: ")


def test_the_sweep_sends_events(env: Env, receiver: Receiver) -> None:
    env.register(receiver)
    job = env.submit()
    env.post(f"/v1/analyses/{job}/cancel")
    sweep(env.sf, env.settings, EmbeddedEnqueuer())
    assert [e["type"] for e in receiver.events()] == ["analysis.cancelled"]


def test_embedded_worker_runs_the_job_and_delivers_its_event(env: Env, receiver: Receiver) -> None:
    from worker.service.embedded import EmbeddedWorker

    env.register(receiver)
    worker = EmbeddedWorker(env.sf, env.settings, env.client.app.state.enqueuer, ok_pipeline)
    worker.start()
    try:
        job = env.submit()
        wait_for(lambda: len(receiver.received) == 1, timeout=20)
    finally:
        worker.stop()
        worker.join(timeout=10)
    event = receiver.events()[0]
    assert event["type"] == "analysis.succeeded" and event["data"]["analysis_id"] == job
    assert receiver.received[0]["valid"]
