"""The correctness judge is the operator's configuration, never the tenant's (issue 19, high).

Before: a `read,submit` key could submit `judge: {"base_url": "http://127.0.0.1:<port>/internal?path=",
"api_key_env": "LAYERSCOPE_KEY_PEPPER"}`; the worker POSTed to that loopback URL with
`Authorization: Bearer <the worker's key pepper>` and the internal reply came back in the job's
`error.detail`. Now a spec names a judge configured in `LAYERSCOPE_JUDGES`; a URL or an
environment variable in a spec is a 422; a job stored in the old shape fails
`judge_not_configured` without calling anything; and no reply body of a failed judge call
reaches the client. Everything runs for real: the API in-process, the real runner and pipeline
on `tiny-random-llama`, and an HTTP listener on loopback standing in for an internal service.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import create_key
from app.config import JudgeEndpoint, Settings
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis
from app.schemas import JobState
from tests.api.test_analyses import assert_problem
from tests.conftest import make_settings, store_analysis
from worker.evaluation.correctness import JudgeError, OpenAIJudge
from worker.service.runner import run_job

MARKER = f"INTERNAL-SECRET-{uuid.uuid4().hex}"  # in every reply of the listener; must never reach a client
KEY_ENV = "LS_RELIABILITY_JUDGE_KEY"
KEY_VALUE = f"operator-judge-key-{uuid.uuid4().hex}"


class _Internal(BaseHTTPRequestHandler):
    """A service on loopback: records every request, answers per `server.mode`, always with MARKER."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),  # type: ignore[attr-defined]
                                     "body": body})
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "yes":
            reply = {"choices": [{"message": {"role": "assistant", "content": "yes"}}], "note": MARKER}
            return self._send(200, json.dumps(reply).encode(), "application/json")
        if mode == "verdict":
            reply = {"choices": [{"message": {"role": "assistant", "content": f"maybe {MARKER}"}}]}
            return self._send(200, json.dumps(reply).encode(), "application/json")
        if mode == "content":
            reply = {"choices": [{"message": {"role": "assistant", "content": {"secret": MARKER}}}]}
            return self._send(200, json.dumps(reply).encode(), "application/json")
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:1/{MARKER}")
            self.send_header("Content-Length", str(len(MARKER)))
            self.end_headers()
            self.wfile.write(MARKER.encode())
            return None
        status = {"html": 200, "500": 500, "401": 401, "429": 429}[mode]
        return self._send(status, f"<html>{MARKER} db=postgresql://admin:pw@db</html>".encode(), "text/html")

    def _send(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def internal() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Internal)
    server.daemon_threads = True
    server.mode = "html"  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Env:
    settings: Settings
    sf: object
    client: TestClient
    project: str
    tenant: dict[str, str]  # a read,submit key: what the attack needed

    def stored(self) -> int:
        with self.sf() as s:  # type: ignore[operator]
            return s.scalar(select(func.count()).select_from(Analysis).where(Analysis.project == self.project))

    def run(self, analysis_id: str) -> Analysis:
        run_job(analysis_id, self.sf, self.settings, "reliability-worker")
        with self.sf() as s:  # type: ignore[operator]
            return s.get(Analysis, analysis_id)


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path, internal: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> Env:
    pepper = f"pepper-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, KEY_VALUE)
    monkeypatch.setenv("LAYERSCOPE_KEY_PEPPER", pepper)  # as a real worker has it in its environment
    judges = {"internal": JudgeEndpoint(base_url=f"{internal.url}/v1", model="m", api_key_env=KEY_ENV, retries=0)}
    settings = make_settings(sqlite_url, tmp_path, rate_limit_per_minute=0, judges=judges, key_pepper=pepper)
    sf = session_factory(settings.resolved_database_url)
    project = f"judge-{uuid.uuid4().hex[:8]}"
    with session_scope(sf) as s:
        key = create_key(s, settings, project, "tenant", ["read", "submit"])
    return Env(settings, sf, TestClient(create_app(settings)), project, {"Authorization": f"Bearer {key}"})


def qa_spec(judge: dict) -> dict:
    rows = [{"question": f"What is item {i} called?", "answer": f"thing{i}"} for i in range(8)]
    return {
        "model": {"name": "tiny-random-llama", "device": "cpu"},
        "dataset": {"rows": rows, "limit": 8, "max_tokens": 32},
        "stages": {"hallucination": {
            "correctness_rules": ["judge"], "judge": judge, "n_shots": 1, "max_new_tokens": 2,
            "detectors": ["length"], "n_boot": 0, "layer_probes": False, "min_group": 1, "batch_size": 8,
        }},
    }


def test_a_spec_can_give_neither_a_judge_url_nor_an_environment_variable(env: Env, internal: ThreadingHTTPServer) -> None:
    """The attack of the issue, and its variants, are 422 at submit, naming the judge; nothing is stored."""
    attacks = [
        {"base_url": f"{internal.url}/internal/admin?path=", "model": "m", "api_key_env": "LAYERSCOPE_KEY_PEPPER"},
        {"base_url": f"{internal.url}/v1", "model": "m", "api_key_env": "DATABASE_URL"},
        {"name": "internal", "base_url": f"{internal.url}/other"},
        {"name": "internal", "api_key_env": "LAYERSCOPE_KEY_PEPPER"},
    ]
    for judge in attacks:
        body = assert_problem(env.client.post("/v1/analyses", json=qa_spec(judge), headers=env.tenant), 422)
        assert any(e["field"].startswith("stages.hallucination.judge") for e in body["errors"]), body
        assert "LAYERSCOPE_JUDGES" in body["detail"], body
    assert env.stored() == 0
    assert internal.requests == []  # type: ignore[attr-defined]


def test_an_unknown_judge_name_is_422_listing_the_configured_ones(env: Env) -> None:
    body = assert_problem(env.client.post("/v1/analyses", json=qa_spec({"name": "openai"}), headers=env.tenant), 422)
    assert [e["field"] for e in body["errors"]] == ["stages.hallucination.judge.name"], body
    assert "'openai'" in body["detail"] and "internal" in body["detail"]
    assert env.settings.judges["internal"].base_url not in body["detail"]  # names only, never the URL
    assert env.stored() == 0


def _store_legacy_job(env: Env, judge: dict) -> str:
    """A job queued before judges were named (its spec holds a URL and a variable), as the database has it."""
    return store_analysis(env.sf, env.project, qa_spec(judge))


def test_a_stored_job_with_a_judge_url_fails_without_calling_it(env: Env, internal: ThreadingHTTPServer) -> None:
    analysis_id = _store_legacy_job(env, {
        "base_url": f"{internal.url}/internal/admin?path=", "model": "m", "api_key_env": "LAYERSCOPE_KEY_PEPPER",
    })
    row = env.run(analysis_id)
    assert (row.state, row.error_type) == (JobState.FAILED.value, "judge_not_configured"), row.error_detail
    assert internal.requests == [], internal.requests  # type: ignore[attr-defined]
    # The tenant reads the job (and the list) as before, and nothing of the server's is in it.
    for path in (f"/v1/analyses/{analysis_id}", "/v1/analyses"):
        resp = env.client.get(path, headers=env.tenant)
        assert resp.status_code == 200, resp.text
        assert env.settings.key_pepper not in resp.text and MARKER not in resp.text


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("html", "not chat-completions JSON"),
        ("500", "HTTP 500"),
        ("429", "HTTP 429"),
        ("401", "HTTP 401"),
        ("redirect", "redirects are not followed"),
        ("verdict", "neither yes nor no"),
        ("content", "not text"),
    ],
)
def test_a_failed_judge_call_never_quotes_the_reply(internal: ThreadingHTTPServer, mode: str, says: str) -> None:
    internal.mode = mode  # type: ignore[attr-defined]
    with OpenAIJudge(f"{internal.url}/v1", "m", timeout=5, label="internal") as judge:
        with pytest.raises(JudgeError) as err:
            judge.equivalent("q", "a", "b")
    message = str(err.value)
    assert says in message and "'internal'" in message, message
    assert MARKER not in message and "postgresql" not in message, message
    assert len(internal.requests) == 1  # type: ignore[attr-defined]  # the redirect was not followed


def test_a_configured_judge_is_called_with_the_operators_key_and_its_failure_names_no_body(
    env: Env, internal: ThreadingHTTPServer
) -> None:
    internal.mode = "500"  # type: ignore[attr-defined]
    resp = env.client.post("/v1/analyses", json=qa_spec({"name": "internal"}), headers=env.tenant)
    assert resp.status_code == 201, resp.text
    row = env.run(resp.json()["id"])
    assert (row.state, row.error_type) == (JobState.FAILED.value, "judge_failed"), row.error_detail
    assert "'internal'" in row.error_detail and "HTTP 500" in row.error_detail, row.error_detail
    got = env.client.get(f"/v1/analyses/{row.id}", headers=env.tenant)
    assert MARKER not in got.text and "postgresql" not in got.text and KEY_VALUE not in got.text
    seen = internal.requests  # type: ignore[attr-defined]
    assert {r["path"] for r in seen} == {"/v1/chat/completions"}
    assert {r["auth"] for r in seen} == {f"Bearer {KEY_VALUE}"}

    internal.mode = "yes"  # type: ignore[attr-defined]
    resp = env.client.post("/v1/analyses", json=qa_spec({"name": "internal"}), headers=env.tenant)
    row = env.run(resp.json()["id"])
    assert row.state == JobState.SUCCEEDED.value, row.error_detail
    rules = row.summary["hallucination"]["counts"]["rules"]
    assert rules["train"]["judge"] + rules["test"]["judge"] > 0, rules
