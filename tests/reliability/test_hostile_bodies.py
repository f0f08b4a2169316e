"""JSON bodies the service cannot hold, on both databases: deep nesting, non-finite numbers, lone
surrogates (issue 19, medium). Each answered 500 before (or was stored changed: `Infinity` in a float
option became null); now each is a 422 problem+json naming the field (the depth: the limit), and
nothing is stored.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.guard import MAX_JSON_DEPTH, GuardedRoute, nesting_exceeds
from app.auth import create_key
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis, ApiKey, GatePolicy, Webhook
from tests.api.test_analyses import assert_problem
from tests.conftest import make_settings, serve_in_thread

SPEC: dict[str, Any] = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": [{"text": "hello world"}, {"text": "a second line"}], "limit": 2},
    "stages": {"avss": {}},
}


@dataclass
class Env:
    client: TestClient
    sf: Any
    project: str
    auth: dict[str, str]
    settings: Any

    def post(self, path: str, body: bytes | str) -> httpx.Response:
        data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        return self.client.post(path, content=data, headers={**self.auth, "content-type": "application/json"})

    def stored(self) -> dict[str, int]:
        with self.sf() as s:
            return {m.__name__: s.scalar(select(func.count()).select_from(m).where(m.project == self.project))
                    for m in (Analysis, ApiKey, GatePolicy, Webhook)}


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Env:
    settings = make_settings(db_url, tmp_path, rate_limit_per_minute=0)
    sf = session_factory(settings.resolved_database_url)
    project = f"body-{uuid.uuid4().hex[:8]}"
    with session_scope(sf) as s:
        key = create_key(s, settings, project, "k", ["read", "submit", "admin"])
    return Env(TestClient(create_app(settings)), sf, project, {"Authorization": f"Bearer {key}"}, settings)


def spec_with(**paths: str) -> str:
    """SPEC as JSON text with raw JSON fragments put at dotted paths (`dataset.rows.0.meta`)."""
    spec = copy.deepcopy(SPEC)
    marks = {}
    for i, (path, fragment) in enumerate(paths.items()):
        *parents, last = path.split("__")
        node: Any = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        mark = f"@@{i}@@"
        if isinstance(node, list):
            node[int(last)] = mark
        else:
            node[last] = mark
        marks[mark] = fragment
    text = json.dumps(spec)
    for mark, fragment in marks.items():
        text = text.replace(json.dumps(mark), fragment)
    return text


def fields_of(body: dict) -> list[str]:
    return [e["field"] for e in body.get("errors", [])]


# ------------------------------------------------------------------ nesting


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100, 256, 300, 900, 1000, 5000, 100_000])
def test_deep_nesting_is_422_naming_the_limit_at_any_depth(env: Env, depth: int) -> None:
    before = env.stored()
    body = assert_problem(env.post("/v1/analyses", spec_with(dataset__rows__0__meta=nested(depth))), 422)
    assert fields_of(body) == ["body"] and str(MAX_JSON_DEPTH) in body["detail"], body
    assert body["errors"][0]["type"] == "json_too_deep"
    assert env.stored() == before


def test_deep_nesting_is_refused_on_every_route_with_a_body_and_the_limit_itself_is_accepted(env: Env) -> None:
    deep = nested(600)
    for path, text in [
        ("/v1/webhooks", f'{{"url": "https://example.com/h", "description": {deep}}}'),
        ("/v1/gates", f'{{"name": "g", "rules": {deep}}}'),
        ("/v1/keys", f'{{"name": "k", "scopes": {deep}}}'),
        ("/v1/analyses", deep),
        ("/v1/analyses", '{"a": ' * 500 + "1" + "}" * 500),
    ]:
        body = assert_problem(env.post(path, text), 422)
        assert str(MAX_JSON_DEPTH) in body["detail"], (path, body)
    # The body is level 1, `dataset` 2, `rows` 3, a row 4: a row's meta may nest MAX_JSON_DEPTH - 4 more.
    ok = env.post("/v1/analyses", spec_with(dataset__rows__0__meta=nested(MAX_JSON_DEPTH - 4)))
    assert ok.status_code == 201, ok.text
    body = assert_problem(env.post("/v1/analyses", spec_with(dataset__rows__0__meta=nested(MAX_JSON_DEPTH - 3))), 422)
    assert fields_of(body) == ["body"]
    # Brackets inside strings do not count.
    ok = env.post("/v1/analyses", spec_with(dataset__rows__0__text=json.dumps(nested(5000) + '\\"{[')))
    assert ok.status_code == 201, ok.text


def test_deep_nesting_over_real_http_keeps_the_connection(env: Env) -> None:
    """Through uvicorn: the 422 comes back and the same keep-alive connection serves the next request."""
    with serve_in_thread(create_app(env.settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        headers = {**env.auth, "content-type": "application/json"}
        for depth in (300, 900, 5000):
            resp = client.post("/v1/analyses", content=spec_with(dataset__rows__0__meta=nested(depth)), headers=headers)
            assert_problem(resp, 422)
        assert client.post("/v1/analyses", json=SPEC, headers=env.auth).status_code == 201
        assert client.get("/v1/analyses", headers=env.auth).status_code == 200


def test_the_depth_scan() -> None:
    assert not nesting_exceeds(b'{"a": [1, {"b": [2]}], "c": {}}', 4)
    assert nesting_exceeds(b'{"a": [1, {"b": [2]}], "c": {}}', 3)
    assert not nesting_exceeds(b'{"a": "[[[[[[[[[[[[[["}', 2)  # inside a string
    assert not nesting_exceeds(b'{"a": "\\"[[[[[[[[[[[[["}', 2)  # after an escaped quote
    assert not nesting_exceeds(b"[" * 100, 10)  # unbalanced: the parser answers it
    assert nesting_exceeds(b"[" * 100 + b"]" * 100, 99) and not nesting_exceeds(b"[" * 100 + b"]" * 100, 100)


def test_every_route_with_a_body_checks_the_depth(env: Env) -> None:
    def routes(container: Any) -> list[Any]:  # included routers are kept as routers (FastAPI >= 0.165)
        found = []
        for r in container.routes:
            inner = getattr(r, "original_router", None)
            found += routes(inner) if inner is not None else [r]
        return found

    with_body = [r for r in routes(env.client.app) if getattr(r, "body_field", None) is not None]
    assert len(with_body) >= 5
    assert all(isinstance(r, GuardedRoute) for r in with_body), [r.path for r in with_body if not isinstance(r, GuardedRoute)]


# ------------------------------------------------------------------ non-finite numbers

NON_FINITE = ["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1" + "0" * 400 + ".5"]


@pytest.mark.parametrize("token", NON_FINITE)
@pytest.mark.parametrize(
    ("where", "field"),
    [
        ({"stages__prune": '{"delta": %s}'}, "stages.prune.delta"),
        ({"stages__avss": '{"sparsity_eps": %s}'}, "stages.avss.sparsity_eps"),
        ({"stages__hallucination": '{"p_values": [0.5, %s]}'}, "stages.hallucination.p_values.1"),
        ({"dataset__rows__0__score": "%s"}, "dataset.rows.0.score"),
        ({"dataset__rows__1__meta": '{"w": [1, %s]}'}, "dataset.rows.1.meta.w.1"),
    ],
)
def test_a_non_finite_number_is_422_naming_the_field(env: Env, token: str, where: dict, field: str) -> None:
    before = env.stored()
    text = spec_with(**{k: v % token for k, v in where.items()})
    body = assert_problem(env.post("/v1/analyses", text), 422)
    assert field in fields_of(body) and "finite" in body["detail"], body
    assert env.stored() == before


def test_non_finite_numbers_as_text_and_in_other_bodies(env: Env) -> None:
    for text in ('"inf"', '"-Infinity"', '"NaN"'):
        body = assert_problem(env.post("/v1/analyses", spec_with(stages__prune=f'{{"delta": {text}}}')), 422)
        assert "stages.prune.delta" in fields_of(body) and "finite" in body["detail"], body
    body = assert_problem(env.post("/v1/webhooks", '{"url": "https://example.com/h", "description": NaN}'), 422)
    assert fields_of(body) == ["description"], body
    # Finite extremes are fine.
    ok = env.post("/v1/analyses", spec_with(stages__prune='{"delta": 1.7976931348623157e308}', dataset__rows__0__x="-1e-400"))
    assert ok.status_code == 201, ok.text


# ------------------------------------------------------------------ lone surrogates


@pytest.mark.parametrize(
    ("path", "text", "field"),
    [
        ("/v1/analyses", spec_with(dataset__rows__0__text='"a\\ud800b"'), "dataset.rows.0.text"),
        ("/v1/analyses", spec_with(dataset__rows__1__text='"\\udfff"'), "dataset.rows.1.text"),
        ("/v1/analyses", spec_with(dataset__fields='{"text": "a\\udc00"}'), "dataset.fields.text"),
        ("/v1/analyses", spec_with(dataset__rows__0__meta='{"k\\ud800": 1}'), "dataset.rows.0.meta.k\\ud800"),
        ("/v1/analyses", spec_with(labels='{"team": "x\\ud83d"}'), "labels.team"),
        ("/v1/analyses", spec_with(model__name='"tiny\\ud800"'), "model.name"),
        ("/v1/analyses", spec_with(stages__prune='{"qa_prompt": "Q: {question} \\ude00"}'), "stages.prune.qa_prompt"),
        # The same surrogate as raw (invalid) UTF-8 bytes, which Python's JSON parser also lets through.
        ("/v1/analyses", spec_with(dataset__rows__0__text='"a\ud800b"'), "dataset.rows.0.text"),
        ("/v1/webhooks", '{"url": "https://example.com/h", "description": "\\ud800"}', "description"),
        ("/v1/gates", '{"name": "g", "rules": ["layers.avss.warnings == 0"], "description": "\\udbff"}', "description"),
        ("/v1/keys", '{"name": "k\\ud800", "scopes": ["read"]}', "name"),
    ],
)
def test_a_lone_surrogate_is_422_naming_the_field(env: Env, path: str, text: str, field: str) -> None:
    before = env.stored()
    body = assert_problem(env.post(path, text), 422)
    assert field in fields_of(body) and "surrogate" in body["detail"], body
    assert env.stored() == before


def test_a_surrogate_pair_is_one_character_and_kept(env: Env) -> None:
    resp = env.post("/v1/analyses", spec_with(dataset__rows__0__text='"smile \\ud83d\\ude00"', labels='{"e": "\\ud83d\\ude00"}'))
    assert resp.status_code == 201, resp.text
    got = env.client.get(f"/v1/analyses/{resp.json()['id']}", headers=env.auth).json()
    assert got["spec"]["dataset"]["rows"][0]["text"] == "smile \U0001f600" and got["labels"] == {"e": "\U0001f600"}
