"""Hostile and oversized input, and the security promises, on a real SQLite database.

Limits (body size, examples per job, tokens per example, page sizes) are refused at the
API. Paths that escape the configured roots, `trust_remote_code`, and malformed data files
go through the real worker code path (`worker.service.runner.run_job` with the real pipeline), end
FAILED with an error a person can act on, and a file outside the roots is never opened
(checked with a Python audit hook on every `open`). Keys are stored as an HMAC and compared
in constant time; secrets never reach the logs; another project's resources are 404.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import auth as auth_module
from app.auth import create_key
from app.config import Settings
from app.db import session_factory, session_scope
from app.logs import JsonFormatter
from app.main import create_app
from app.models import Analysis, ApiKey
from app.schemas import MAX_EXAMPLES, MAX_TOKENS, JobState
from tests.api.test_analyses import assert_problem
from tests.conftest import free_port, make_settings, serve_in_thread, store_analysis
from worker.service import jobstore
from worker.service.runner import run_job
from worker.stage import ArtifactFile, LayerRow, StageResult

# ------------------------------------------------------------------ file-open audit

_WATCHED: list[str] = []  # substrings of paths that must never be opened while set
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _WATCHED:
        return
    path = args[0] if args else None
    if isinstance(path, (str, bytes, os.PathLike)):
        text = os.fsdecode(path)
        if any(w in text for w in _WATCHED):
            _OPENED.append(text)


sys.addaudithook(_audit)  # process-wide and permanent; it does nothing while _WATCHED is empty


@pytest.fixture
def never_opened() -> Iterator[list[str]]:
    """Add path fragments to the yielded list; the test fails if any matching path is opened."""
    _OPENED.clear()
    yield _WATCHED
    watched = list(_WATCHED)
    _WATCHED.clear()
    assert not _OPENED, f"opened files that must never be read: {_OPENED} (watching {watched})"


def test_the_open_audit_sees_every_read(tmp_path: Path) -> None:
    """The control for the checks below: the audit hook does see Python- and os-level opens."""
    token = uuid.uuid4().hex
    probe = tmp_path / f"probe-{token}.txt"
    probe.write_text("x")
    _WATCHED.append(token)
    _OPENED.clear()
    try:
        probe.read_text()
        os.close(os.open(probe, os.O_RDONLY))
        assert len(_OPENED) == 2, _OPENED
    finally:
        _WATCHED.clear()
        _OPENED.clear()


# ------------------------------------------------------------------ environment


@dataclass
class Env:
    settings: Settings
    sf: object
    client: TestClient
    key: str
    token: str  # unique marker in the names of files outside the roots
    outside: Path
    model_root: Path
    data_root: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def submit(self, spec: dict) -> str:
        resp = self.client.post("/v1/analyses", json=spec, headers=self.auth)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def run(self, spec: dict, settings: Settings | None = None, *, past_the_api: bool = False) -> Analysis:
        """Submit over the API (or, `past_the_api`, store it as a job the API accepted under another
        configuration), then run it as a worker would: real runner, real pipeline."""
        analysis_id = store_analysis(self.sf, "sec", spec) if past_the_api else self.submit(spec)
        run_job(analysis_id, self.sf, settings or self.settings, "reliability-worker")
        with self.sf() as s:
            return s.get(Analysis, analysis_id)


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Env:
    token = uuid.uuid4().hex[:12]
    model_root, data_root, outside = tmp_path / "roots" / "models", tmp_path / "roots" / "data", tmp_path / "outside"
    for d in (model_root, data_root, outside):
        d.mkdir(parents=True)
    # Outside the roots: a data file and a model folder (its config.json must never be read) ...
    (outside / f"secret-{token}.jsonl").write_text('{"text": "must never be read"}\n')
    (outside / f"model-{token}").mkdir()
    (outside / f"model-{token}" / "config.json").write_text('{"model_type": "llama"}')
    # ... and links inside the roots that point there.
    (data_root / f"escape-{token}.jsonl").symlink_to(outside / f"secret-{token}.jsonl")
    (model_root / f"escape-{token}").symlink_to(outside / f"model-{token}")
    settings = make_settings(
        sqlite_url, tmp_path, model_roots=[model_root], data_roots=[data_root],
        max_body_bytes=256 * 1024, rate_limit_per_minute=0,
    )
    sf = session_factory(settings.resolved_database_url)
    with session_scope(sf) as s:
        key = create_key(s, settings, "sec", "sec", ["read", "submit", "admin"])
    return Env(settings, sf, TestClient(create_app(settings)), key, token, outside, model_root, data_root)


def spec(model: str = "tiny-random-llama", **dataset: object) -> dict:
    return {
        "model": {"name": model},
        "dataset": dataset or {"rows": [{"text": "hello world"}, {"text": "a second text"}], "limit": 2},
        "stages": {"avss": {"plots": False}},
    }


def fields(body: dict) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


# ------------------------------------------------------------------ limits


def test_body_over_the_limit_is_413_with_or_without_content_length(env: Env) -> None:
    limit = env.settings.max_body_bytes
    big = json.dumps(spec(rows=[{"text": "x" * 1000}] * (limit // 1000 + 10), limit=2)).encode()
    headers = {**env.auth, "content-type": "application/json"}
    body = assert_problem(env.client.post("/v1/analyses", content=big, headers=headers), 413)
    assert str(limit) in body["detail"]

    def chunked(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    # A chunked body has no Content-Length; it is counted while it streams in.
    body = assert_problem(env.client.post("/v1/analyses", content=chunked(big), headers=headers), 413)
    assert str(limit) in body["detail"]
    # A lying Content-Length is refused before the body is read.
    assert_problem(env.client.post("/v1/analyses", content=b"{}", headers={**headers, "content-length": str(limit + 1)}), 413)
    # Under the limit, chunked or not, the same body is accepted.
    small = json.dumps(spec()).encode()
    assert env.client.post("/v1/analyses", content=chunked(small, 64), headers=headers).status_code == 201
    with env.sf() as s:
        assert len(list(s.scalars(select(Analysis.id)))) == 1  # nothing of the refused bodies was stored


def test_the_body_limit_holds_over_real_http(env: Env) -> None:
    """The same through uvicorn on a real socket, where a chunked body is decoded by the server."""
    import httpx

    with serve_in_thread(create_app(env.settings)) as url:
        big = json.dumps(spec(rows=[{"text": "x" * 1000}] * 300, limit=2)).encode()
        headers = {**env.auth, "content-type": "application/json"}
        with httpx.Client(base_url=url, timeout=10) as client:
            for content in (big, iter([big[i : i + 8192] for i in range(0, len(big), 8192)])):
                resp = client.post("/v1/analyses", content=content, headers=headers)
                assert_problem(resp, 413)
            assert client.post("/v1/analyses", json=spec(), headers=env.auth).status_code == 201


@pytest.mark.parametrize(
    ("dataset", "field", "ok"),
    [
        ({"name": "chatterbot-trivia", "limit": MAX_EXAMPLES + 1}, "dataset.limit", {"limit": MAX_EXAMPLES}),
        ({"name": "chatterbot-trivia", "limit": 0}, "dataset.limit", {"limit": 1}),
        ({"rows": [{"text": "x"}] * 10_001}, "dataset.rows", {"rows": [{"text": "x"}] * 10_000}),
        ({"name": "chatterbot-trivia", "max_tokens": MAX_TOKENS + 1}, "dataset.max_tokens", {"max_tokens": MAX_TOKENS}),
        ({"name": "chatterbot-trivia", "max_tokens": 7}, "dataset.max_tokens", {"max_tokens": 8}),
    ],
)
def test_examples_and_tokens_per_job_are_capped(env: Env, dataset: dict, field: str, ok: dict) -> None:
    body = assert_problem(env.client.post("/v1/analyses", json=spec(**dataset), headers=env.auth), 422)
    assert field in fields(body), body
    accepted = {**dataset, **ok}
    assert env.client.post("/v1/analyses", json=spec(**accepted), headers=env.auth).status_code == 201


def test_page_sizes_are_capped(env: Env) -> None:
    analysis_id = env.submit(spec())
    hook = env.client.post("/v1/webhooks", json={"url": "https://example.com/h"}, headers=env.auth).json()["id"]
    for path, name, top in [
        ("/v1/analyses", "page_size", 200),
        ("/v1/gates/verdicts", "page_size", 200),
        (f"/v1/analyses/{analysis_id}/verdicts", "page_size", 200),
        (f"/v1/webhooks/{hook}/deliveries", "limit", 200),
    ]:
        for bad in (top + 1, 0, -1, "many", 10**30):
            body = assert_problem(env.client.get(path, params={name: bad}, headers=env.auth), 422)
            assert f"query.{name}" in fields(body), (path, bad, body)
        assert env.client.get(path, params={name: top}, headers=env.auth).status_code == 200
    body = assert_problem(env.client.get("/v1/analyses", params={"page_token": "not-a-token"}, headers=env.auth), 422)
    assert "page_token" in fields(body)


def test_list_pages_cap_inline_rows_per_spec(env: Env) -> None:
    """A list page carried every spec whole (200 specs of up to 8 MB: 31.7 MB measured). Now inline rows
    are cut to the first 3 per spec there; the single-analysis route and `view=full` give them whole."""
    from app.api.analyses import FULL_VIEW_PAGE, LIST_ROWS

    rows = [{"text": f"row {i} " + "x" * 2000} for i in range(100)]
    qa = [{"question": f"q{i}?", "answer": "a"} for i in range(50)]
    job = spec(rows=rows, limit=100)
    job["stages"]["prune"] = {"qa_dataset": {"rows": qa, "limit": 50}, "tasks": ["qa"]}
    ids = [env.submit(job) for _ in range(3)]
    brief = env.client.get("/v1/analyses", headers=env.auth)
    assert brief.status_code == 200
    for item in brief.json()["items"]:
        assert item["spec_rows_cut"] is True
        assert len(item["spec"]["dataset"]["rows"]) == LIST_ROWS and item["spec"]["dataset"]["limit"] == 100
        assert len(item["spec"]["stages"]["prune"]["qa_dataset"]["rows"]) == LIST_ROWS
    one = env.client.get(f"/v1/analyses/{ids[0]}", headers=env.auth).json()
    assert one["spec_rows_cut"] is False and one["spec"]["dataset"]["rows"] == rows
    full = env.client.get("/v1/analyses", params={"view": "full"}, headers=env.auth)
    assert all(i["spec"]["dataset"]["rows"] == rows and not i["spec_rows_cut"] for i in full.json()["items"])
    assert len(full.content) > 20 * len(brief.content), (len(full.content), len(brief.content))
    assert FULL_VIEW_PAGE < 200  # view=full pages are smaller: the rest comes with next_page_token
    page = env.client.get("/v1/analyses", params={"view": "full", "page_size": 2}, headers=env.auth).json()
    assert len(page["items"]) == 2 and page["next_page_token"]
    # A spec with few rows is shown whole in the list too.
    few = env.submit(spec())
    item = env.client.get("/v1/analyses", params={"page_size": 1}, headers=env.auth).json()["items"][0]
    assert item["id"] == few and item["spec_rows_cut"] is False and len(item["spec"]["dataset"]["rows"]) == 2


def test_requests_in_progress_are_capped_and_health_is_never_held_back() -> None:
    """The API works on at most `max_inflight_requests` at once (each may hold a pooled database
    connection); the rest wait their turn instead of timing out on the pool."""
    import asyncio

    from app.main import _InflightLimit

    inside, peak, health_waited = 0, 0, []

    async def app(scope: dict, receive: object, send: object) -> None:
        nonlocal inside, peak
        if scope["path"] == "/healthz":
            health_waited.append(inside)
            return
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.01)
        inside -= 1

    async def burst() -> None:
        limited = _InflightLimit(app, 3)
        calls = [limited({"type": "http", "path": f"/v1/analyses/{i}"}, None, None) for i in range(40)]
        calls.insert(20, limited({"type": "http", "path": "/healthz"}, None, None))
        await asyncio.gather(*calls)

    asyncio.run(burst())
    assert peak == 3
    assert health_waited == [3]  # answered while three requests were in progress, not after them


# ------------------------------------------------------------------ paths


def _model_escapes(env: Env) -> list[str]:
    t = env.token
    return [
        "../../etc/passwd",
        "/etc/passwd",
        str(env.outside / f"model-{t}"),  # absolute, outside the roots
        f"../../outside/model-{t}",  # relative, climbing out of the root
        f"escape-{t}",  # a symlink inside the root that points outside
        f"./escape-{t}/.",
    ]


def _data_escapes(env: Env) -> list[str]:
    t = env.token
    return [
        "../../etc/passwd",
        "/etc/passwd",
        str(env.outside / f"secret-{t}.jsonl"),
        f"../../outside/secret-{t}.jsonl",
        f"escape-{t}.jsonl",
        f"{env.data_root}/escape-{t}.jsonl",  # absolute, spelled inside the root, resolving outside
    ]


# The first four shapes are outside the roots however they resolve: 422 at submit. The last two lie in a
# root and only a symlink leads out: the worker refuses them when it resolves the path.
CERTAIN_AT_SUBMIT = 4


def test_model_paths_outside_the_roots_are_422_at_submit_or_end_failed_unread(env: Env, never_opened: list[str]) -> None:
    never_opened += ["passwd", env.token]
    for i, name in enumerate(_model_escapes(env)):
        resp = env.client.post("/v1/analyses", json=spec(model=name), headers=env.auth)
        if i < CERTAIN_AT_SUBMIT:
            body = assert_problem(resp, 422)
            assert body["errors"][0]["field"] == "model.name" and "model roots" in body["detail"], (name, body)
        else:
            assert resp.status_code == 201, (name, resp.text)
        # Past the API too (a job accepted under other roots): the worker refuses every shape.
        row = env.run(spec(model=name), past_the_api=True)
        assert (row.state, row.error_type) == (JobState.FAILED.value, "path_not_allowed"), (name, row.error_detail)
        assert "model roots" in row.error_detail


def test_data_paths_outside_the_roots_are_422_at_submit_or_end_failed_unread(env: Env, never_opened: list[str]) -> None:
    never_opened += ["passwd", env.token]
    for i, path in enumerate(_data_escapes(env)):
        resp = env.client.post("/v1/analyses", json=spec(path=path, limit=2), headers=env.auth)
        if i < CERTAIN_AT_SUBMIT:
            body = assert_problem(resp, 422)
            assert body["errors"][0]["field"] == "dataset.path" and "data roots" in body["detail"], (path, body)
        else:
            assert resp.status_code == 201, (path, resp.text)
        row = env.run(spec(path=path, limit=2), past_the_api=True)
        assert (row.state, row.error_type) == (JobState.FAILED.value, "path_not_allowed"), (path, row.error_detail)
        assert "data roots" in row.error_detail


def test_a_model_folder_whose_files_link_outside_the_roots_is_refused_unread(env: Env, never_opened: list[str]) -> None:
    """A real folder under the root, holding links to a model elsewhere: only the folder path used to be
    resolved, so the linked files loaded. Now every entry inside is resolved too."""
    t = env.token
    linked = env.model_root / f"linked-{t}"
    linked.mkdir()
    (linked / "config.json").symlink_to(env.outside / f"model-{t}" / "config.json")
    deeper = env.model_root / f"deeper-{t}"
    (deeper / "sub").mkdir(parents=True)
    (deeper / "config.json").write_text('{"model_type": "llama"}')
    (deeper / "sub" / "weights").symlink_to(env.outside / f"model-{t}")  # a linked folder, one level down
    never_opened += [t]
    for name, escape in ((f"linked-{t}", "config.json"), (f"deeper-{t}", "sub/weights")):
        row = env.run(spec(model=name))
        assert (row.state, row.error_type) == (JobState.FAILED.value, "path_not_allowed"), (name, row.error_detail)
        assert escape in row.error_detail and "model roots" in row.error_detail, row.error_detail


def _tiny_safetensors_folder(folder: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.mark.parametrize("damage", ["half", "header_cut", "four_bytes", "header_not_json"])
def test_a_truncated_safetensors_file_is_model_invalid_naming_the_file(env: Env, damage: str) -> None:
    """A valid config with a damaged `model.safetensors` ended FAILED `internal_error` ("SafetensorError:
    incomplete metadata"); now `model_invalid` naming the file."""
    weights = _tiny_safetensors_folder(env.model_root / f"cut-{damage}")
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    weights.write_bytes({
        "half": data[: len(data) // 2],
        "header_cut": data[: 8 + length // 2],
        "four_bytes": data[:4],
        "header_not_json": data[:8] + b"{" * length + data[8 + length:],
    }[damage])
    row = env.run(spec(model=f"cut-{damage}"))
    assert (row.state, row.error_type) == (JobState.FAILED.value, "model_invalid"), row.error_detail
    assert "model.safetensors" in row.error_detail and f"cut-{damage}" in row.error_detail, row.error_detail


def test_local_files_are_refused_when_no_roots_are_configured(env: Env, never_opened: list[str]) -> None:
    never_opened += ["passwd"]
    closed = env.settings.model_copy(update={"model_roots": [], "data_roots": []})
    client = TestClient(create_app(closed))
    for job, field in ((spec(model="/etc/passwd"), "model.name"), (spec(path="/etc/passwd", limit=2), "dataset.path")):
        body = assert_problem(client.post("/v1/analyses", json=job, headers=env.auth), 422)
        assert body["errors"][0]["field"] == field and "disabled" in body["detail"], body
        row = env.run(job, settings=closed, past_the_api=True)
        assert (row.state, row.error_type) == (JobState.FAILED.value, "path_not_allowed"), row.error_detail


def test_trust_remote_code_is_refused_at_submit_and_by_the_worker(env: Env) -> None:
    job = spec()
    job["model"]["trust_remote_code"] = True
    body = assert_problem(env.client.post("/v1/analyses", json=job, headers=env.auth), 422)
    assert "model.trust_remote_code" in fields(body)
    # Allow-listed at submit time, then taken off the list before a worker runs it: the worker refuses.
    allowing = env.settings.model_copy(update={"trust_remote_code_allowlist": ["tiny-random-llama"]})
    client = TestClient(create_app(allowing))
    resp = client.post("/v1/analyses", json=job, headers=env.auth)
    assert resp.status_code == 201, resp.text
    run_job(resp.json()["id"], env.sf, env.settings, "reliability-worker")
    with env.sf() as s:
        row = s.get(Analysis, resp.json()["id"])
    assert (row.state, row.error_type) == (JobState.FAILED.value, "trust_remote_code_refused"), row.error_detail


# ------------------------------------------------------------------ malformed data files

MALFORMED = {
    "broken.jsonl": (b'{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n', "line 3"),
    "not-an-object.jsonl": (b'{"text": "one"}\n{"text": "two"}\n["three"]\n', "line 3"),
    "bad-utf8.jsonl": (b'{"text": "one"}\n{"text": "two"}\n{"text": "\xff\xfe"}\n', "line 3"),
    "bad-row.csv": (b"text,label\nfirst,a\nsecond,b,extra\nthird,c\n", "line 3"),
    "no-text.csv": (b"text,label\nfirst,a\n,b\n", "line 3"),
    "broken.json": (b'[\n  {"text": "one"},\n  {"text": "two"\n]\n', "line 4"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_data_files_end_failed_naming_file_and_line(env: Env, name: str) -> None:
    content, where = MALFORMED[name]
    (env.data_root / name).write_bytes(content)
    row = env.run(spec(path=name, limit=2))
    assert (row.state, row.error_type) == (JobState.FAILED.value, "dataset_invalid"), row.error_detail
    assert name in row.error_detail and where in row.error_detail, row.error_detail


# ------------------------------------------------------------------ keys


def test_keys_are_stored_as_an_hmac_of_the_server_pepper(env: Env) -> None:
    with env.sf() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.prefix == env.key.split("_")[1]))
    expected = hmac.new(env.settings.key_pepper.encode(), env.key.encode(), hashlib.sha256).hexdigest()
    assert row.key_hash == expected
    assert env.key.split("_", 2)[2] not in json.dumps({c.name: str(getattr(row, c.name)) for c in row.__table__.columns})
    # The pepper is part of the hash: the same key is unknown to a server with another pepper.
    other = TestClient(create_app(env.settings.model_copy(update={"key_pepper": "another-pepper"})))
    assert_problem(other.get("/v1/analyses", headers=env.auth), 401)
    assert env.client.get("/v1/analyses", headers=env.auth).status_code == 200


def test_a_revoked_key_stops_working_at_once_here_and_within_the_cache_time_elsewhere(env: Env) -> None:
    made = env.client.post("/v1/keys", json={"name": "short-lived", "scopes": ["read"]}, headers=env.auth).json()
    key = {"Authorization": f"Bearer {made['key']}"}
    assert env.client.get("/v1/analyses", headers=key).status_code == 200  # now in the key cache
    assert env.client.delete(f"/v1/keys/{made['id']}", headers=env.auth).status_code == 204
    assert_problem(env.client.get("/v1/analyses", headers=key), 401)  # the revoking process: at once
    # Revoked by another replica (here: straight in the database): accepted until the cache entry expires.
    import time

    from sqlalchemy import update

    from app.models import utcnow

    replica = TestClient(create_app(env.settings.model_copy(update={"key_cache_seconds": 0.5})))
    made = env.client.post("/v1/keys", json={"name": "elsewhere", "scopes": ["read"]}, headers=env.auth).json()
    key = {"Authorization": f"Bearer {made['key']}"}
    assert replica.get("/v1/analyses", headers=key).status_code == 200
    with session_scope(env.sf) as s:
        s.execute(update(ApiKey).where(ApiKey.id == made["id"]).values(revoked_at=utcnow()))
    time.sleep(0.6)
    assert_problem(replica.get("/v1/analyses", headers=key), 401)


def test_keys_are_compared_in_constant_time(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    source = inspect.getsource(auth_module)  # the one digest comparison of the key path is compare_digest
    assert source.count("hmac.compare_digest(") == 1 and "key_hash ==" not in source and "== hash_key" not in source
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):  # noqa: ANN001, ANN202
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    prefix = env.key.split("_")[1]
    wrong_secret = f"ls_{prefix}_{'A' * 43}"
    unknown_prefix = f"ls_{'0' * 12}_{'A' * 43}"
    for key, status in ((env.key, 200), (wrong_secret, 401), (unknown_prefix, 401)):
        calls.clear()
        assert env.client.get("/v1/analyses", headers={"Authorization": f"Bearer {key}"}).status_code == status
        # One digest comparison per request, also for an unknown prefix (no early return that times it).
        assert len(calls) == 1, (key, calls)
        assert all(len(a) == len(b) == 64 for a, b in calls)


# ------------------------------------------------------------------ secrets and logs


def test_secrets_never_reach_the_logs(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    settings = env.settings
    settings.webhook_allow_private_networks = True  # the receiver below is a closed loopback port
    secrets_seen: list[str] = [env.key, env.key.split("_", 2)[2]]

    made = env.client.post("/v1/keys", json={"name": "ci", "scopes": ["read"]}, headers=env.auth)
    assert made.status_code == 201
    new_key = made.json()["key"]
    secrets_seen += [new_key, new_key.split("_", 2)[2]]
    assert env.client.get("/v1/analyses", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    prefix = new_key.split("_")[1]
    wrong = f"ls_{prefix}_wrong-secret-{uuid.uuid4().hex}"
    secrets_seen.append(wrong)
    assert_problem(env.client.get("/v1/analyses", headers={"Authorization": f"Bearer {wrong}"}), 401)
    assert_problem(env.client.post("/v1/analyses", json=spec(), headers={"Authorization": f"Bearer {new_key}"}), 403)

    hook_secret = f"whsec-test-{uuid.uuid4().hex}"
    secrets_seen.append(hook_secret)
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: the delivery fails and is logged
    made = env.client.post("/v1/webhooks", json={"url": url, "secret": hook_secret}, headers=env.auth)
    assert made.status_code == 201, made.text
    refused = env.client.post("/v1/webhooks", json={"url": "ftp://x/y", "secret": hook_secret}, headers=env.auth)
    assert_problem(refused, 422)
    generated = env.client.post("/v1/webhooks", json={"url": url}, headers=env.auth).json()["secret"]
    secrets_seen.append(generated)

    # A finished job emits an event; the delivery attempt to the dead receiver logs a warning.
    from worker.service import webhooks

    analysis_id = env.submit(spec())
    token = jobstore.claim(env.sf, analysis_id, "w")
    jobstore.save_stage(env.sf, settings, analysis_id, token, StageResult(
        stage="avss", layers=[LayerRow(0, "model.layers.0", "avss", {"avss": 1.0})],
        artifacts=[ArtifactFile("a.svg", "image/svg+xml", b"<svg/>")],
    ))
    jobstore.finish(env.sf, analysis_id, token, JobState.SUCCEEDED)
    webhooks.on_finished(env.sf, settings, analysis_id, JobState.SUCCEEDED)
    assert webhooks.deliver_due(env.sf, settings, budget_s=10) == 2
    assert any("webhook" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert len(lines) >= 3, lines
    leaked = [(s, line) for s in secrets_seen for line in lines if s in line]
    assert not leaked, leaked


# ------------------------------------------------------------------ service-wide metrics


def test_metrics_of_every_project_need_the_operator_scope(env: Env) -> None:
    """`/metrics` counts every project's jobs; a project admin saw them all. Now only an `operator` key
    (made with the server's CLI, never through the API) reads them."""
    env.submit(spec())
    with session_scope(env.sf) as s:
        other_admin = create_key(s, env.settings, "other-project", "adm", ["read", "submit", "admin"])
        operator = create_key(s, env.settings, "ops", "prometheus", ["operator"])
    for key in (env.key, other_admin):
        body = assert_problem(env.client.get("/metrics", headers={"Authorization": f"Bearer {key}"}), 403)
        assert "operator" in body["detail"]
    resp = env.client.get("/metrics", headers={"Authorization": f"Bearer {operator}"})
    assert resp.status_code == 200 and 'layerscope_jobs{state="QUEUED"} 1.0' in resp.text, resp.text[:500]
    # A project admin cannot mint one, and an operator key is no project key.
    made = env.client.post("/v1/keys", json={"name": "x", "scopes": ["read", "operator"]}, headers=env.auth)
    assert "scopes" in fields(assert_problem(made, 422))
    ops = {"Authorization": f"Bearer {operator}"}
    for method, path in (("GET", "/v1/analyses"), ("GET", "/v1/keys"), ("POST", "/v1/webhooks")):
        assert_problem(env.client.request(method, path, headers=ops, json={"url": "https://example.com/h"}), 403)


# ------------------------------------------------------------------ webhook targets

EMBEDDED_LOOPBACK = [
    "http://[::7f00:1]/hook",  # IPv4-compatible ::127.0.0.1
    "http://[64:ff9b::7f00:1]:8080/hook",  # NAT64 well-known prefix
    "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    "http://[::ffff:0:7f00:1]/hook",  # IPv4-translated
    "http://[::ffff:7f00:1]/hook",  # IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",  # NAT64 of 169.254.169.254
    "http://[2002:a00:1::1]/hook",  # 6to4 of 10.0.0.1
    "http://[fec0::1]/hook",  # site-local
    "http://[64:ff9b:1::a00:1]/hook",  # NAT64 local use
]


def test_webhook_urls_embedding_a_private_ipv4_in_ipv6_are_refused(env: Env) -> None:
    """IPv6 spellings of loopback/private IPv4 and site-local addresses passed registration and delivery."""
    from app.webhooks import UrlRefused, check_url

    for url in EMBEDDED_LOOPBACK:
        body = assert_problem(env.client.post("/v1/webhooks", json={"url": url}, headers=env.auth), 422)
        assert "url" in fields(body) and "non-public" in body["detail"], (url, body)
        with pytest.raises(UrlRefused, match="non-public"):  # the delivery-time check (resolving)
            check_url(url, [], False, resolve=True)
    assert env.client.get("/v1/webhooks", headers=env.auth).json() == []
    # Public IPv4 behind the same prefixes stays allowed.
    for url in ("http://[64:ff9b::808:808]/hook", "http://[2002:808:808::1]/hook", "http://[::ffff:8.8.8.8]/hook"):
        check_url(url, [], False, resolve=False)


# ------------------------------------------------------------------ projects


def test_another_projects_resources_are_404_on_every_route(env: Env) -> None:
    auth = env.auth
    analysis_id = env.submit(spec())
    token = jobstore.claim(env.sf, analysis_id, "w")
    jobstore.save_stage(env.sf, env.settings, analysis_id, token, StageResult(
        stage="avss", layers=[LayerRow(0, "model.layers.0", "avss", {"avss": 1.0})],
        artifacts=[ArtifactFile("a.svg", "image/svg+xml", b"<svg/>")],
    ))
    jobstore.finish(env.sf, analysis_id, token, JobState.SUCCEEDED)
    c = env.client
    assert c.post("/v1/gates", json={"name": "mine", "rules": ["layers.avss.warnings == 0"]}, headers=auth).status_code == 201
    verdict = c.post(f"/v1/analyses/{analysis_id}/gate", params={"policy": "mine"}, headers=auth).json()["id"]
    hook = c.post("/v1/webhooks", json={"url": "https://example.com/h"}, headers=auth).json()["id"]
    with env.sf() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.prefix == env.key.split("_")[1]))
    with session_scope(env.sf) as s:
        intruder = {"Authorization": f"Bearer {create_key(s, env.settings, 'intruder', 'x', ['read', 'submit', 'admin'])}"}

    a = f"/v1/analyses/{analysis_id}"
    probes = [
        ("GET", a), ("GET", f"{a}/layers"), ("GET", f"{a}/metrics"), ("GET", f"{a}/artifacts"),
        ("GET", f"{a}/answers"), ("GET", f"{a}/artifacts/a.svg"), ("GET", f"{a}/verdicts"), ("POST", f"{a}/cancel"),
        ("POST", f"{a}/gate?policy=mine"), ("DELETE", a),
        ("GET", "/v1/gates/mine"), ("GET", "/v1/gates/mine/versions"), ("GET", f"/v1/gates/verdicts/{verdict}"),
        ("GET", f"/v1/webhooks/{hook}"), ("GET", f"/v1/webhooks/{hook}/deliveries"), ("DELETE", f"/v1/webhooks/{hook}"),
        ("DELETE", f"/v1/keys/{key_id}"),
    ]
    for method, path in probes:
        assert_problem(c.request(method, path, headers=intruder), 404)
    for path in ("/v1/analyses", "/v1/gates", "/v1/webhooks"):
        assert c.get(path, headers=intruder).json() in ([], {"items": [], "next_page_token": None})
    assert c.get("/v1/gates/verdicts", headers=intruder).json()["items"] == []
    assert [k["name"] for k in c.get("/v1/keys", headers=intruder).json()] == ["x"]
    # Nothing of the owner's was touched.
    for method, path in probes:
        if method == "GET":
            assert c.get(path, headers=auth).status_code == 200, path
