"""The analysis resource against a real database (Postgres and SQLite)."""

from __future__ import annotations

import copy
import csv
import io
import math

from app.models import Analysis
from app.schemas import JobState
from tests.api.conftest import SPEC, Api
from worker.service import jobstore
from worker.stage import ArtifactFile, LayerRow, MetricRow, StageResult


def submit(api: Api, spec: dict | None = None, **kw) -> dict:  # noqa: ANN003
    resp = api.post("/v1/analyses", json=spec or SPEC, **kw)
    assert resp.status_code == 201, resp.text
    return resp.json()


def assert_problem(resp, status: int) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["detail"]
    return body


def test_submit_returns_201_location_and_queued_job(api: Api) -> None:
    resp = api.post("/v1/analyses", json=SPEC)
    assert resp.status_code == 201
    job = resp.json()
    assert resp.headers["location"] == f"/v1/analyses/{job['id']}"
    assert job["state"] == "QUEUED"
    assert job["labels"] == {"team": "research"}
    assert job["spec"]["dataset"]["seed"] == 0  # defaults filled in and stored
    got = api.get(resp.headers["location"]).json()
    assert got["id"] == job["id"] and got["progress"] == {"stage": None, "done": 0, "total": 0}


def test_a_submit_is_marked_sent_before_it_is_sent_and_unmarked_when_the_broker_is_down(api: Api) -> None:
    """The sweeper sends rows with no `enqueued_at`: a row committed unmarked, then marked after the
    send, could be sent twice (once by the submit, once by a sweep in between)."""
    seen: list[object] = []

    class Broker:
        up = True

        def enqueue(self, analysis_id: str, queue: str = "cpu") -> bool:
            with api.sf() as s:  # what a sweep running now would read
                seen.append(s.get(Analysis, analysis_id).enqueued_at)
            return self.up

    broker = Broker()
    app = api.client.app
    before, app.state.enqueuer = app.state.enqueuer, broker
    try:
        sent = api.post("/v1/analyses", json=SPEC).json()["id"]
        broker.up = False
        unsent = api.post("/v1/analyses", json={**SPEC, "labels": {"team": "other"}}).json()["id"]
    finally:
        app.state.enqueuer = before
    assert len(seen) == 2 and all(t is not None for t in seen)
    with api.sf() as s:
        assert s.get(Analysis, sent).enqueued_at is not None
        assert s.get(Analysis, unsent).enqueued_at is None and s.get(Analysis, unsent).state == "QUEUED"


def test_unknown_and_impossible_fields_are_422_naming_the_field(api: Api) -> None:
    bad = copy.deepcopy(SPEC)
    bad["model"]["colour"] = "blue"
    body = assert_problem(api.post("/v1/analyses", json=bad), 422)
    assert any(e["field"] == "model.colour" for e in body["errors"])

    bad = copy.deepcopy(SPEC)
    bad["dataset"]["limit"] = 0
    body = assert_problem(api.post("/v1/analyses", json=bad), 422)
    assert any(e["field"] == "dataset.limit" for e in body["errors"])

    bad = copy.deepcopy(SPEC)
    bad["dataset"] = {"name": "chatterbot-trivia", "path": "/x.jsonl"}
    body = assert_problem(api.post("/v1/analyses", json=bad), 422)
    assert "exactly one dataset source" in body["detail"]

    bad = copy.deepcopy(SPEC)
    bad["stages"] = {}
    assert_problem(api.post("/v1/analyses", json=bad), 422)

    bad = copy.deepcopy(SPEC)
    bad["stages"] = {"avss": {"prune_fraction": 1.5}}
    body = assert_problem(api.post("/v1/analyses", json=bad), 422)
    assert any(e["field"] == "stages.avss.prune_fraction" for e in body["errors"])

    for heal, fld in (({"steps": 0}, "steps"), ({"targets": "embeddings"}, "targets"),
                      ({"dataset": {"name": "x", "path": "y"}}, "dataset")):
        bad = copy.deepcopy(SPEC)
        bad["stages"] = {"prune": {"heal": heal}}
        body = assert_problem(api.post("/v1/analyses", json=bad), 422)
        assert any(e["field"].startswith(f"stages.prune.heal.{fld}") for e in body["errors"]), body

    assert_problem(api.post("/v1/analyses", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_trust_remote_code_is_refused_unless_allow_listed(api: Api) -> None:
    spec = copy.deepcopy(SPEC)
    spec["model"] = {"name": "someone/custom-model", "trust_remote_code": True}
    body = assert_problem(api.post("/v1/analyses", json=spec), 422)
    assert "allow-list" in body["detail"]


def test_idempotency_key_same_body_same_job_other_body_422(api: Api) -> None:
    first = api.post("/v1/analyses", json=SPEC, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 201
    again = api.post("/v1/analyses", json=SPEC, headers={"Idempotency-Key": "abc-1"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = copy.deepcopy(SPEC)
    other["dataset"]["limit"] = 1
    assert_problem(api.post("/v1/analyses", json=other, headers={"Idempotency-Key": "abc-1"}), 422)
    # The key is per project: another project may use it.
    resp = api.client.post("/v1/analyses", json=SPEC, headers={**api.headers(api.other_key), "Idempotency-Key": "abc-1"})
    assert resp.status_code == 201 and resp.json()["id"] != first.json()["id"]


def test_idempotency_is_enforced_by_the_database(api: Api) -> None:
    import pytest
    from sqlalchemy.exc import IntegrityError

    from app.models import utcnow

    submit(api, headers={"Idempotency-Key": "db-key"})
    with api.sf() as s:
        s.add(Analysis(id="dup", project=api.project, state="QUEUED", spec={}, spec_hash="x", idempotency_key="db-key",
                       model_name="m", progress_done=0, progress_total=0, attempt=0, warnings=[], summary={},
                       created_at=utcnow()))
        with pytest.raises(IntegrityError):
            s.commit()


def test_list_paginates_with_cursor_and_filters(api: Api) -> None:
    ids = []
    for i in range(5):
        spec = copy.deepcopy(SPEC)
        spec["labels"] = {"team": "a" if i % 2 else "b", "run": str(i)}
        if i == 4:
            spec["model"]["name"] = "tiny-random-gpt2"
        ids.append(submit(api, spec)["id"])
    seen, token = [], None
    while True:
        params = {"page_size": 2, **({"page_token": token} if token else {})}
        page = api.get("/v1/analyses", params=params).json()
        seen += [j["id"] for j in page["items"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    assert [j["id"] for j in api.get("/v1/analyses", params={"label": "team=a"}).json()["items"]] == [ids[3], ids[1]]
    assert len(api.get("/v1/analyses", params=[("label", "team=b"), ("label", "run=2")]).json()["items"]) == 1
    assert [j["id"] for j in api.get("/v1/analyses", params={"model": "tiny-random-gpt2"}).json()["items"]] == [ids[4]]
    assert len(api.get("/v1/analyses", params={"state": "QUEUED"}).json()["items"]) == 5
    assert api.get("/v1/analyses", params={"state": "FAILED"}).json()["items"] == []
    assert_problem(api.get("/v1/analyses", params={"page_token": "garbage!"}), 422)
    assert_problem(api.get("/v1/analyses", params={"label": "novalue"}), 422)
    assert_problem(api.get("/v1/analyses", params={"page_size": 1000}), 422)
    assert_problem(api.get("/v1/analyses", params={"state": "SLEEPING"}), 422)


def test_cancel_queued_job_ends_cancelled_and_finished_job_is_409(api: Api) -> None:
    job = submit(api)
    resp = api.post(f"/v1/analyses/{job['id']}/cancel")
    assert resp.status_code == 202 and resp.json()["state"] == "CANCELLED"
    assert resp.json()["finished_at"] is not None
    # Cancelling twice is harmless.
    assert api.post(f"/v1/analyses/{job['id']}/cancel").json()["state"] == "CANCELLED"
    done = submit(api)
    token = jobstore.claim(api.sf, done["id"], "test-worker")
    jobstore.finish(api.sf, done["id"], token, JobState.SUCCEEDED)
    assert_problem(api.post(f"/v1/analyses/{done['id']}/cancel"), 409)


def test_cancel_running_job_goes_cancelling(api: Api) -> None:
    job = submit(api)
    token = jobstore.claim(api.sf, job["id"], "test-worker")
    assert token
    assert api.post(f"/v1/analyses/{job['id']}/cancel").json()["state"] == "CANCELLING"
    assert jobstore.current_state(api.sf, job["id"], token) == "CANCELLING"


def test_delete_only_finished_jobs_and_their_results(api: Api) -> None:
    job = submit(api)
    assert_problem(api.delete(f"/v1/analyses/{job['id']}"), 409)
    api.post(f"/v1/analyses/{job['id']}/cancel")
    assert api.delete(f"/v1/analyses/{job['id']}").status_code == 204
    assert_problem(api.get(f"/v1/analyses/{job['id']}"), 404)
    assert_problem(api.get(f"/v1/analyses/{job['id']}/layers"), 404)


def _store_results(api: Api, analysis_id: str) -> None:
    token = jobstore.claim(api.sf, analysis_id, "test-worker")
    result = StageResult(
        stage="avss",
        layers=[
            LayerRow(layer=i, block_name=f"model.layers.{i}", scorer="avss",
                     values={"variance": float(i + 1), "avss": math.nan if i == 1 else 0.5})
            for i in range(3)
        ],
        metrics=[MetricRow(scope="avss", name="prune_count", value=1.0, n=3),
                 MetricRow(scope="x", name="inf", value=math.inf)],
        artifacts=[ArtifactFile(name="avss.svg", media_type="image/svg+xml", data=b"<svg/>")],
        summary={"prune_layers": [0], "bad": math.nan},
        warnings=["something degraded"],
    )
    jobstore.save_stage(api.sf, api.settings, analysis_id, token, result)
    jobstore.save_stage(api.sf, api.settings, analysis_id, token, result)  # a redelivery overwrites
    jobstore.finish(api.sf, analysis_id, token, JobState.SUCCEEDED)


def test_result_tables_json_csv_and_artifacts(api: Api) -> None:
    job = submit(api)
    _store_results(api, job["id"])
    base = f"/v1/analyses/{job['id']}"
    got = api.get(base).json()
    assert got["state"] == "SUCCEEDED"
    assert got["summary"]["avss"] == {"prune_layers": [0], "bad": None}
    assert got["warnings"] == ["[avss] something degraded"]

    layers = api.get(f"{base}/layers").json()["items"]
    assert [r["layer"] for r in layers] == [0, 1, 2]  # upserted twice, stored once
    assert layers[1]["values"]["avss"] is None  # NaN never reaches a client
    assert layers[2]["values"]["variance"] == 3.0
    assert api.get(f"{base}/layers", params={"scorer": "nope"}).json()["items"] == []

    text = api.get(f"{base}/layers", params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 and rows[0]["block_name"] == "model.layers.0" and rows[1]["avss"] == ""

    metrics = {m["name"]: m for m in api.get(f"{base}/metrics").json()["items"]}
    assert metrics["prune_count"]["value"] == 1.0 and metrics["prune_count"]["n"] == 3
    assert metrics["inf"]["value"] is None
    assert "prune_count" in api.get(f"{base}/metrics", params={"format": "csv"}).text
    assert api.get(f"{base}/metrics.csv").text == api.get(f"{base}/metrics", params={"format": "csv"}).text
    assert_problem(api.get("/v1/analyses/00000000-0000-0000-0000-000000000000/layers.csv"), 404)

    arts = api.get(f"{base}/artifacts").json()["items"]
    assert [a["name"] for a in arts] == ["avss.svg"]
    dl = api.get(arts[0]["download_url"])
    assert dl.status_code == 200 and dl.content == b"<svg/>" and dl.headers["content-type"] == "image/svg+xml"
    assert_problem(api.get(f"{base}/artifacts/missing.png"), 404)
    assert_problem(api.get(f"{base}/layers", params={"format": "xml"}), 422)


def test_auth_scopes_and_project_isolation(api: Api) -> None:
    job = submit(api)
    base = f"/v1/analyses/{job['id']}"
    assert_problem(api.client.get(base), 401)
    assert_problem(api.client.get(base, headers={"Authorization": "Bearer ls_nope_nope"}), 401)
    assert_problem(api.client.get(base, headers={"Authorization": "Basic abc"}), 401)
    # Another project's job is a 404, not a 403: its existence is not disclosed.
    assert_problem(api.client.get(base, headers=api.headers(api.other_key)), 404)
    assert_problem(api.client.post(f"{base}/cancel", headers=api.headers(api.other_key)), 404)
    assert api.client.get("/v1/analyses", headers=api.headers(api.other_key)).json()["items"] == []
    # A read-only key can read but not submit or cancel.
    assert api.client.get(base, headers=api.headers(api.read_key)).status_code == 200
    assert_problem(api.client.post("/v1/analyses", json=SPEC, headers=api.headers(api.read_key)), 403)
    assert_problem(api.client.post(f"{base}/cancel", headers=api.headers(api.read_key)), 403)
    # Admin keys manage keys; revoked keys stop working at once.
    created = api.post("/v1/keys", json={"name": "ci", "scopes": ["read"]})
    assert created.status_code == 201
    new_key = created.json()["key"]
    assert api.client.get(base, headers=api.headers(new_key)).status_code == 200
    assert api.delete(f"/v1/keys/{created.json()['id']}").status_code == 204
    assert_problem(api.client.get(base, headers=api.headers(new_key)), 401)
    assert_problem(api.client.get("/v1/keys", headers=api.headers(api.read_key)), 403)
    listed = api.get("/v1/keys").json()
    assert all("key" not in k and "key_hash" not in k for k in listed)


def test_keys_are_stored_hashed(api: Api) -> None:
    from sqlalchemy import select

    from app.models import ApiKey

    with api.sf() as s:
        hashes = list(s.scalars(select(ApiKey.key_hash)))
    assert api.key not in hashes and all(len(h) == 64 for h in hashes)


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_body_over_limit_is_413(api: Api) -> None:
    big = b"{" + b" " * (api.settings.max_body_bytes + 1) + b"}"
    assert_problem(api.post("/v1/analyses", content=big, headers={"content-type": "application/json"}), 413)


def test_unknown_route_and_method_are_problems(api: Api) -> None:
    assert_problem(api.get("/v1/nothing"), 404)
    assert_problem(api.client.put("/v1/analyses"), 405)


def test_prometheus_metrics_need_the_operator_scope_and_count_jobs(api: Api) -> None:
    from app.auth import create_key
    from app.db import session_scope

    submit(api)
    assert_problem(api.client.get("/metrics", headers=api.headers(api.read_key)), 403)
    assert_problem(api.get("/metrics"), 403)  # a project admin: the numbers are every project's
    with session_scope(api.sf) as s:
        operator = create_key(s, api.settings, api.project, "ops", ["operator"])
    text = api.client.get("/metrics", headers=api.headers(operator)).text
    assert 'layerscope_jobs{state="QUEUED"}' in text
    assert "layerscope_http_request_seconds_bucket" in text and "layerscope_queue_depth" in text


def test_json_logs_carry_the_analysis_id() -> None:
    import json
    import logging

    from app.logs import JsonFormatter, analysis_id_var

    token = analysis_id_var.set("abc-123")
    try:
        record = logging.LogRecord("layerscope.worker", logging.INFO, __file__, 1, "hello %s", ("x",), None)
        line = json.loads(JsonFormatter().format(record))
    finally:
        analysis_id_var.reset(token)
    assert line["msg"] == "hello x" and line["analysis_id"] == "abc-123" and line["level"] == "INFO"


def test_rate_limit_per_key_is_429_with_retry_after(db_url: str, tmp_path) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from app.auth import create_key
    from app.db import session_factory, session_scope
    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(db_url, tmp_path, rate_limit_per_minute=60)  # burst of 10
    with session_scope(session_factory(settings.resolved_database_url)) as s:
        key = create_key(s, settings, "rl", "rl", ["read"])
        other = create_key(s, settings, "rl", "rl2", ["read"])
    client = TestClient(create_app(settings))
    codes = [client.get("/v1/analyses", headers={"Authorization": f"Bearer {key}"}).status_code for _ in range(12)]
    assert codes[:10] == [200] * 10 and codes[-1] == 429
    resp = client.get("/v1/analyses", headers={"Authorization": f"Bearer {key}"})
    assert_problem(resp, 429)
    assert int(resp.headers["retry-after"]) >= 1
    # Another key has its own bucket; health is never limited.
    assert client.get("/v1/analyses", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    assert all(client.get("/healthz").status_code == 200 for _ in range(20))


def test_layer_values_come_back_as_ints_bools_and_floats(api: Api) -> None:
    """Ranks and counts are integers and flags booleans in JSON and CSV, whether a stage handed
    over 1.0 or 1, and for rows stored as floats before the values were typed."""
    job = submit(api)
    token = jobstore.claim(api.sf, job["id"], "test-worker")
    rows = [LayerRow(layer=i, block_name=f"model.layers.{i}", scorer="avss",
                     values={"rank": float(2 - i), "prune": 1.0 if i == 1 else 0.0, "count": 64.0,
                             "avss": 0.5, "variance": 2.0, "rank_alt": math.nan})
            for i in range(2)]
    jobstore.save_stage(api.sf, api.settings, job["id"], token, StageResult(stage="avss", layers=rows))
    with api.sf() as s:  # a row as the worker wrote it before: every value a float
        from app.models import LayerScore
        s.add(LayerScore(analysis_id=job["id"], stage="profile", scorer="profile", layer=0, block_name="b",
                         values={"block_output.count": 8704.0, "block_output.tokens": 136.0,
                                 "block_output.rms": 1.0}))
        s.commit()
    jobstore.finish(api.sf, job["id"], token, JobState.SUCCEEDED)
    base = f"/v1/analyses/{job['id']}"

    items = api.get(f"{base}/layers", params={"stage": "avss"}).json()["items"]
    got = [r["values"] for r in items]
    assert [v["rank"] for v in got] == [2, 1] and all(type(v["rank"]) is int for v in got)
    assert [v["prune"] for v in got] == [False, True]
    assert all(type(v["count"]) is int and type(v["avss"]) is float for v in got)
    assert got[0]["variance"] == 2.0 and type(got[0]["variance"]) is float  # an integral float stays a number
    assert got[0]["rank_alt"] is None
    old = api.get(f"{base}/layers", params={"stage": "profile"}).json()["items"][0]["values"]
    assert old == {"block_output.count": 8704, "block_output.tokens": 136, "block_output.rms": 1.0}
    assert type(old["block_output.count"]) is int and type(old["block_output.rms"]) is float

    text = api.get(f"{base}/layers", params={"stage": "avss", "format": "csv"}).text
    as_csv = api.get(f"{base}/layers.csv", params={"stage": "avss"})
    assert as_csv.headers["content-type"].startswith("text/csv") and as_csv.text == text
    csv_rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["rank"], r["prune"], r["count"], r["rank_alt"]) for r in csv_rows] == [("2", "0", "64", ""),
                                                                                   ("1", "1", "64", "")]

    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["LayerRowOut"]["properties"]["values"]
    assert schema["properties"]["rank"]["anyOf"][0] == {"type": "integer"}
    assert schema["properties"]["prune"]["anyOf"][0] == {"type": "boolean"}
    assert schema["additionalProperties"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
