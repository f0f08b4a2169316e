"""NUL and other control characters in requests, on both databases.

Postgres cannot store U+0000 in text or JSONB: a NUL in a path id, a query filter, a header or
a JSON body used to reach it and answer 500 (SQLite took it). Every route with a key now answers
422 problem+json naming the field (`app/api/guard.py`, run from `app.auth.require` once the key
is accepted), and nothing is stored. A request without a valid key is still a 401 first.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import create_key
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis, ApiKey, GatePolicy, GateVerdict, Webhook
from tests.conftest import make_settings

SPEC: dict[str, Any] = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": [{"text": "hello world"}, {"text": "a second line of text"}], "limit": 2},
    "stages": {"avss": {}},
    "labels": {"team": "research"},
}
PROBLEM = "application/problem+json"


@dataclass
class Env:
    client: TestClient
    sf: Any
    project: str
    key: str
    analysis_id: str
    webhook_id: str

    def call(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def stored(self) -> dict[str, int]:
        """Rows of this test's project in every table a request could write."""
        with self.sf() as s:
            return {
                model.__name__: s.scalar(select(func.count()).select_from(model).where(model.project == self.project))
                for model in (Analysis, ApiKey, GatePolicy, GateVerdict, Webhook)
            }


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Env:
    settings = make_settings(db_url, tmp_path, rate_limit_per_minute=0)
    sf = session_factory(settings.resolved_database_url)
    project = f"ctl-{uuid.uuid4().hex[:8]}"
    with session_scope(sf) as s:
        key = create_key(s, settings, project, "ctl", ["read", "submit", "admin"])
    client = TestClient(create_app(settings))
    auth = {"Authorization": f"Bearer {key}"}
    job = client.post("/v1/analyses", json=SPEC, headers=auth)
    assert job.status_code == 201, job.text
    hook = client.post("/v1/webhooks", json={"url": "https://example.com/hook"}, headers=auth)
    assert hook.status_code == 201, hook.text
    policy = client.post("/v1/gates", json={"name": "ctl", "rules": ["layers.avss.warnings == 0"]}, headers=auth)
    assert policy.status_code == 201, policy.text
    return Env(client, sf, project, key, job.json()["id"], hook.json()["id"])


def assert_422_naming(resp: Any, field: str, what: str) -> None:
    assert resp.status_code == 422, f"{what}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith(PROBLEM), what
    body = resp.json()
    assert body["status"] == 422 and body["title"], what
    assert field in [e["field"] for e in body["errors"]], f"{what}: {body}"
    assert field in body["detail"] and ("NUL" in body["detail"] or "control character" in body["detail"]), body


def test_nul_in_path_and_query_is_422_naming_the_parameter(env: Env) -> None:
    aid, hid = env.analysis_id, env.webhook_id
    before = env.stored()
    cases = [
        # (method, path, query params, the field the problem must name)
        ("GET", f"/v1/analyses/{aid}/layers", {"stage": "\x00"}, "query.stage"),
        ("GET", f"/v1/analyses/{aid}/layers", {"scorer": "avss\x00"}, "query.scorer"),
        ("GET", f"/v1/analyses/{aid}/metrics", {"stage": "\x00"}, "query.stage"),
        ("GET", f"/v1/analyses/{aid}/layers", {"stage": "a\x00b", "format": "csv"}, "query.stage"),
        ("GET", f"/v1/analyses/{aid}/answers", {"scope": "\x00"}, "query.scope"),
        ("GET", "/v1/analyses", {"model": "tiny\x00"}, "query.model"),
        ("GET", "/v1/analyses", {"label": "team=\x00"}, "query.label"),
        ("GET", "/v1/gates/verdicts", {"policy": "\x00"}, "query.policy"),
        ("GET", "/v1/gates/verdicts", {"label": "\x00=x"}, "query.label"),
        ("GET", "/v1/analyses/%00", {}, "path.analysis_id"),
        ("GET", f"/v1/analyses/{aid}%00", {}, "path.analysis_id"),
        ("GET", f"/v1/analyses/{aid}/artifacts/%00", {}, "path.name"),
        ("GET", "/v1/analyses/%00/verdicts", {}, "path.analysis_id"),
        ("GET", "/v1/gates/verdicts/%00", {}, "path.verdict_id"),
        ("GET", "/v1/gates/ctl%00/versions", {}, "path.name"),
        ("GET", f"/v1/webhooks/{hid}%00", {}, "path.webhook_id"),
        ("GET", "/v1/webhooks/%00/deliveries", {}, "path.webhook_id"),
        ("POST", f"/v1/analyses/{aid}%00/cancel", {}, "path.analysis_id"),
        ("POST", f"/v1/analyses/{aid}/gate", {"policy": "ctl\x00"}, "query.policy"),
        ("DELETE", f"/v1/analyses/{aid}%00", {}, "path.analysis_id"),
        ("DELETE", "/v1/keys/%00", {}, "path.key_id"),
        ("DELETE", f"/v1/webhooks/{hid}%00", {}, "path.webhook_id"),
        # Other control characters in a path id (ids and names never hold one).
        ("GET", f"/v1/analyses/{aid}%01", {}, "path.analysis_id"),
        ("GET", "/v1/analyses/%1F", {}, "path.analysis_id"),
        ("DELETE", f"/v1/webhooks/{hid}%7F", {}, "path.webhook_id"),
    ]
    for method, path, params, field in cases:
        assert_422_naming(env.call(method, path, params=params), field, f"{method} {path} {params}")
    assert env.stored() == before
    with env.sf() as s:  # neither cancelled nor deleted
        assert s.get(Analysis, aid).state == "QUEUED"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/analyses", {"labels": {"team": "a\x00b"}}, "labels.team"),
        ("POST", "/v1/analyses", {"dataset": {"rows": [{"text": "ok"}, {"text": "x\x00y"}], "limit": 2}},
         "dataset.rows.1.text"),
        ("POST", "/v1/analyses", {"dataset": {"rows": [{"text": "ok", "meta": {"k\x00": 1}}], "limit": 1}},
         "dataset.rows.0.meta.k\\x00"),
        ("POST", "/v1/analyses", {"model": {"name": "tiny\x00"}}, "model.name"),
        ("POST", "/v1/keys", {"name": "k\x00", "scopes": ["read"]}, "name"),
        ("POST", "/v1/gates", {"name": "g1", "rules": ["layers.avss.warnings == 0"], "description": "d\x00"},
         "description"),
        ("POST", "/v1/gates", {"name": "g2", "rules": ["layers.avss.warnings == 0\x00"]}, "rules.0"),
        ("PUT", "/v1/gates/ctl", {"rules": ["layers.avss.warnings == 1"], "description": "\x00"}, "description"),
        ("POST", "/v1/webhooks", {"url": "https://example.com/h\x00"}, "url"),
        ("POST", "/v1/webhooks", {"url": "https://example.com/h", "description": "x\x00"}, "description"),
    ],
)
def test_nul_in_json_bodies_is_422_naming_the_field_and_nothing_is_stored(
    env: Env, method: str, path: str, body: dict, field: str
) -> None:
    if path == "/v1/analyses":
        body = {**copy.deepcopy(SPEC), **body}
    before = env.stored()
    assert_422_naming(env.call(method, path, json=body), field, f"{method} {path}")
    assert env.stored() == before


def test_nul_in_a_header_is_422_and_in_a_key_is_401(env: Env) -> None:
    before = env.stored()
    resp = env.call("POST", "/v1/analyses", json=SPEC, headers={"Idempotency-Key": "a\x00b"})
    assert_422_naming(resp, "header.idempotency-key", "Idempotency-Key")
    resp = env.client.get("/v1/analyses", headers={"Authorization": "Bearer ls_\x00_secret"})
    assert resp.status_code == 401 and resp.headers["content-type"].startswith(PROBLEM), resp.text
    assert env.stored() == before


def test_the_key_is_checked_before_the_values(env: Env) -> None:
    """No key, or one lacking the scope, is 401/403 whatever the values hold (as for any invalid value)."""
    resp = env.client.get(f"/v1/analyses/{env.analysis_id}/layers", params={"stage": "\x00"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
    resp = env.client.post("/v1/analyses", json={**SPEC, "labels": {"team": "\x00"}})
    assert resp.status_code == 401, resp.text


def test_a_nul_inside_a_page_token_is_a_4xx(env: Env) -> None:
    forged = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "a\x00"]).encode()).decode()
    resp = env.call("GET", "/v1/gates/verdicts", params={"page_token": forged.rstrip("=")})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "page_token", resp.text
    resp = env.call("GET", f"/v1/analyses/{env.analysis_id}/verdicts", params={"page_token": forged})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "page_token", resp.text
    # /v1/analyses decodes its own tokens (a NUL there is refused by Postgres: 422, never 500; SQLite
    # just finds nothing).
    resp = env.call("GET", "/v1/analyses", params={"page_token": forged})
    assert resp.status_code in (200, 422), resp.text
    if resp.status_code == 422:
        assert resp.headers["content-type"].startswith(PROBLEM)


def test_text_that_only_looks_like_nul_and_other_control_characters_in_values_are_kept(env: Env) -> None:
    """A literal backslash-u0000 is text, and a label value may hold a tab or BEL: stored, and found
    by a `label=key=value` filter (only NUL is refused in query values)."""
    labels = {"literal": "\\u0000", "bell": "ding\x07", "tab": "a\tb"}
    resp = env.call("POST", "/v1/analyses", json={**SPEC, "labels": labels})
    assert resp.status_code == 201, resp.text
    assert resp.json()["labels"] == labels
    for key, value in labels.items():
        found = env.call("GET", "/v1/analyses", params={"label": f"{key}={value}"})
        assert found.status_code == 200, found.text
        assert [a["id"] for a in found.json()["items"]] == [resp.json()["id"]], (key, found.text)
