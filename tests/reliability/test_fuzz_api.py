"""Schemathesis against the service's own OpenAPI document, every route, in-process (ASGI).

With an admin key on every case: no 5xx, every error is problem+json, every status code,
content type and body matches what `/openapi.json` documents (schemathesis' built-in
checks), for valid and invalid (negative) inputs. Without a key: every documented route
but `/healthz` and `/readyz` answers 401 problem+json. Hostile bodies: schema-valid bodies of
every POST/PUT with one value replaced by what JSON can spell but the service cannot hold (a
non-finite number, a lone surrogate, nesting past the limit) are 422 saying which.

The app runs on a fresh SQLite database seeded with one finished analysis (layers,
metrics, answers, an artifact), a gate policy and verdict, and a webhook; path parameters are
sometimes replaced by those ids (valid cases only) so the fuzzer reaches the found-resource code paths, not
only 404s. Bounded: `MAX_EXAMPLES` per operation, derandomized, so the file runs in well
under two minutes and the same cases run every time.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.auth import create_key
from app.config import Settings
from app.db import engine_for, session_factory, session_scope
from app.main import create_app
from app.migrate import upgrade
from app.schemas import JobState
from worker.service import jobstore
from worker.stage import AnswerRecord, ArtifactFile, LayerRow, MetricRow, StageResult

MAX_EXAMPLES = 25
PUBLIC = {"/healthz", "/readyz"}  # and /dashboard*, which is not in the OpenAPI document
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Nothing is created at import (collection must stay cheap): create_app touches no database
# until the first request, and the `seeded` fixture creates and migrates this file.
_TMP = Path(tempfile.gettempdir()) / f"layerscope-fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
SETTINGS = Settings(
    database_url=f"sqlite:///{_TMP / 'fuzz.db'}",
    redis_url=None,
    data_dir=_TMP / "data",
    auth_disabled=False,
    rate_limit_per_minute=0,  # the per-key limit is tested in tests/api; here it would turn cases into 429s
)
APP = create_app(SETTINGS)
KNOWN: dict[str, str] = {}  # path parameter -> an id that exists (filled by `seeded`)
KEYS: dict[str, str] = {}
AIMED: Counter[str] = Counter()
SEEN: Counter[tuple[str, int]] = Counter()  # (test, status) -> requests; printed at teardown (`-s`)


def _config(mode: str) -> SchemathesisConfig:
    # The tests set (or leave out) the Authorization header themselves, so schemathesis must not
    # generate the bearer scheme's header, nor count leaving it out as a negative case.
    return SchemathesisConfig.from_dict({"generation": {"mode": mode, "with-security-parameters": False}})


schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=_config("all"))
# Without a key: valid inputs only (a body that is not JSON at all is a 422 before authentication).
schema_no_key = schemathesis.openapi.from_asgi("/openapi.json", APP, config=_config("positive"))


def _aim_at_known(case) -> None:  # noqa: ANN001
    """Every other valid (positive) case goes to a resource that exists, so the fuzzer reaches the
    found-resource code paths, not only 404s. Negative cases keep their invalid path values."""
    params = case.path_parameters or {}
    known = {k: KNOWN[k] for k in params if k in KNOWN}
    if not known or case.meta is None or not case.meta.generation.mode.is_positive:
        return
    AIMED[case.operation.label] += 1
    if AIMED[case.operation.label] % 2:
        case.path_parameters = {**params, **known}


def _keep_failure(ctx, failure, case, response) -> bool:  # noqa: ANN001
    """One known, harmless mismatch: `PUT /v1/gates/{name}` also routes `/v1/gates/verdicts` (the name
    is reserved and answered 422), so `Allow` there truthfully lists PUT, which the schema cannot."""
    undocumented = getattr(failure, "undocumented_methods", None)
    return not (case.path == "/v1/gates/verdicts" and undocumented == ["PUT"])


schema.hook("filter_failure")(_keep_failure)


def problem_json_errors(ctx: CheckContext, response, case) -> bool | None:  # noqa: ANN001
    """Every 4xx/5xx is application/problem+json with the RFC 9457 members and a matching status."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("application/problem+json"):
        raise Failure(operation=case.operation.label, title="Error is not problem+json",
                      message=f"{response.status_code} answered with content-type {content_type!r}")
    body = response.json()
    if body.get("status") != response.status_code or not body.get("title") or not body.get("detail"):
        raise Failure(operation=case.operation.label, title="Malformed problem+json",
                      message=f"{response.status_code}: {body}")
    return True


@pytest.fixture(scope="module", autouse=True)
def seeded() -> Iterator[None]:
    _TMP.mkdir(parents=True)
    url = SETTINGS.resolved_database_url
    upgrade(url)
    sf = session_factory(url)
    with session_scope(sf) as s:
        KEYS["admin"] = create_key(s, SETTINGS, "fuzz", "fuzz-admin", ["read", "submit", "admin", "operator"])
    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    with TestClient(APP) as client:
        job = client.post("/v1/analyses", headers=auth, json={
            "model": {"name": "tiny-random-llama"}, "dataset": {"rows": [{"text": "hello"}], "limit": 1},
            "stages": {"avss": {}}, "labels": {"team": "fuzz"},
        })
        assert job.status_code == 201, job.text
        analysis_id = job.json()["id"]
        token = jobstore.claim(sf, analysis_id, "fuzz-seed")
        assert token
        jobstore.save_stage(sf, SETTINGS, analysis_id, token, StageResult(
            stage="avss",
            layers=[LayerRow(i, f"model.layers.{i}", "avss", {"avss": 0.1 * i}) for i in range(4)],
            metrics=[MetricRow("avss", "prune_count", 1.0, n=4)],
            artifacts=[ArtifactFile("avss.svg", "image/svg+xml", b"<svg/>")],
            answers=[AnswerRecord(i, "test", f"q{i}?", [f"a{i}"], "a0", i == 0, "exact" if i == 0 else None, 1,
                                  "newline", {"length": 0.5}, scope=f"variant={i % 2}") for i in range(3)],
        ))
        jobstore.finish(sf, analysis_id, token, JobState.SUCCEEDED)
        policy = client.post("/v1/gates", headers=auth, json={"name": "fuzz-policy", "rules": ["layers.avss.warnings == 0"]})
        assert policy.status_code == 201, policy.text
        verdict = client.post(f"/v1/analyses/{analysis_id}/gate", headers=auth, params={"policy": "fuzz-policy"})
        assert verdict.status_code == 201, verdict.text
        hook = client.post("/v1/webhooks", headers=auth, json={"url": "https://example.com/hook"})
        assert hook.status_code == 201, hook.text
    KNOWN.update(analysis_id=analysis_id, name="fuzz-policy", webhook_id=hook.json()["id"],
                 verdict_id=verdict.json()["id"])
    yield
    for test in sorted({t for t, _ in SEEN}):
        codes = {code: n for (t, code), n in sorted(SEEN.items()) if t == test}
        print(f"\n{test}: {sum(codes.values())} requests, by status {codes}")
    if _HOSTILE_SEEN:
        print(f"hostile bodies by kind: {dict(sorted(_HOSTILE_SEEN.items()))}")
    KNOWN.clear()
    engine_for(url).dispose()
    shutil.rmtree(_TMP, ignore_errors=True)


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_route_with_an_admin_key(case) -> None:  # noqa: ANN001
    # A fresh key per case would hide a case that revokes the key; the one admin key is kept
    # valid by never aiming DELETE /v1/keys/{key_id} at it (key ids are not in KNOWN).
    _aim_at_known(case)
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {KEYS['admin']}"},
        additional_checks=[problem_json_errors],
        # A schema-valid value the service refuses on meaning (a rule that does not parse, a webhook
        # URL on a private network, a label filter without '=') is a documented 422, not a bug.
        excluded_checks=[positive_data_acceptance],
    )
    SEEN["with key", response.status_code] += 1


@schema_no_key.parametrize()
@FUZZ_SETTINGS
def test_every_route_without_a_key_is_401(case) -> None:  # noqa: ANN001
    response = case.call()
    SEEN["without key", response.status_code] += 1
    if case.path in PUBLIC:
        assert response.status_code in (200, 405), response.text
        return
    if case.method.upper() != case.operation.method.upper():
        assert response.status_code == 405, response.text  # an undeclared method: routing answers first
        return
    assert response.status_code == 401, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    assert response.headers["content-type"][0].startswith("application/problem+json")
    assert response.headers["www-authenticate"] == ["Bearer"]
    # ... and 401 is a documented answer of that operation.
    assert "401" in case.operation.definition.raw["responses"], case.operation.label


# Values JSON can spell but the service cannot hold (app/api/guard.py): each put in place of one value
# of a schema-valid body, a different value each case.
HOSTILE = {
    "number_not_finite": ["Infinity", "-Infinity", "NaN", "1e400", "-1e999", "1" + "0" * 400 + ".5"],
    "string_surrogate": ['"a\\ud800b"', '"\\udfff"', '{"k\\udbff": 1}', '["ok", "\\ud83d"]'],
    "json_too_deep": ["[" * 65 + "]" * 65, "[" * 300 + "]" * 300, '{"a":' * 900 + "1" + "}" * 900, "[" * 5000 + "]" * 5000],
}
_HOSTILE_CASES = [(kind, fragment) for kind, fragments in HOSTILE.items() for fragment in fragments]
_HOSTILE_SEEN = Counter[str]()
schema_bodies = schemathesis.openapi.from_asgi("/openapi.json", APP, config=_config("positive")).include(
    method=["POST", "PUT"]
)


def _leaf_paths(value: object, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))] or [path]
    return [path]


def _with_hostile(body: object, n: int) -> tuple[str, bytes]:
    """`body` as JSON text with its n-th leaf (cycling) replaced by the n-th hostile fragment."""
    kind, fragment = _HOSTILE_CASES[n % len(_HOSTILE_CASES)]
    mark = "@@hostile@@"
    if not isinstance(body, dict | list) or not body:
        body = {"x": mark}
    else:
        leaves = _leaf_paths(body)
        *parents, last = leaves[(n // len(_HOSTILE_CASES)) % len(leaves)] or ("x",)
        node = body
        for key in parents:
            node = node[key]
        node[last] = mark
    text = json.dumps(body).replace(json.dumps(mark), fragment)
    return kind, text.encode("utf-8", "surrogatepass")


@schema_bodies.parametrize()
@FUZZ_SETTINGS
def test_every_body_with_a_hostile_value_is_422_naming_it(case) -> None:  # noqa: ANN001
    """Schema-valid bodies of every POST/PUT with one value replaced by a non-finite number, a lone
    surrogate or a nesting past the limit: 422 problem+json saying which, never a 5xx or a 2xx."""
    if case.body is None or not (case.media_type or "").endswith("json"):
        return
    _aim_at_known(case)
    n = sum(_HOSTILE_SEEN.values())
    kind, content = _with_hostile(copy.deepcopy(case.body), n)
    _HOSTILE_SEEN[kind] += 1
    with TestClient(APP) as client:
        response = client.request(
            case.method, case.formatted_path, params=case.query, content=content,
            headers={"Authorization": f"Bearer {KEYS['admin']}", "content-type": "application/json"},
        )
    SEEN["hostile bodies", response.status_code] += 1
    assert response.status_code == 422, f"{case.method} {case.formatted_path} {kind}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json")
    types = {e.get("type") for e in response.json()["errors"]}
    assert kind in types or (kind == "string_surrogate" and "string_nul" in types), (kind, response.text)


def test_the_dashboard_and_docs_are_the_only_key_less_routes_outside_the_schema() -> None:
    """/dashboard, /docs, /redoc and their assets hold no data and need no key; nothing else under
    them is reachable, and the docs pages load only assets this server serves (no CDN)."""
    documented = set(APP.openapi()["paths"])
    assert not any(p.startswith(("/dashboard", "/docs", "/redoc", "/static-offline-docs")) for p in documented)
    with TestClient(APP) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200
            assets = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
            assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
            for asset in assets:
                assert client.get(asset).status_code == 200, asset
        assert client.get("/static-offline-docs/..%2F..%2Fcore.py").status_code == 404
    assert len(documented) >= 20
    with TestClient(APP) as client:
        assert client.get("/dashboard").status_code == 200
        assert client.get("/dashboard/assets/app.js").status_code == 200
        for probe in ("/dashboard/assets/index.html", "/dashboard/assets/..%2F..%2Fconfig.py",
                      "/dashboard/assets/%2Fetc%2Fpasswd"):
            resp = client.get(probe)
            assert resp.status_code == 404, probe
            assert resp.headers["content-type"].startswith("application/problem+json")
