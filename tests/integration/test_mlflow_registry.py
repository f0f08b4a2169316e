"""The MLflow Model Registry flow against a real `mlflow server` (SQLite backend, local artifact root,
loopback, a free port), started once for this module.

A tiny random Llama is registered (versions 1 and 2, `mlflow.transformers.log_model`); analyses name a
version as their subject, run in the service's in-process worker (SQLite), and must leave the run, the
verdict tags and the alias in MLflow; with the server stopped the analysis still succeeds with a warning
and its updates land once the server is back.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import create_key
from app.db import session_factory, session_scope
from app.main import create_app
from app.migrate import upgrade
from app.models import RegistryUpdate, WebhookEvent
from tests.conftest import make_settings, wait_for_analysis
from tests.integration.mlflow_server import MlflowServer
from worker.service.embedded import EmbeddedWorker

mlflow = pytest.importorskip("mlflow")

pytestmark = pytest.mark.integration
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
MODEL = "layerscope-tiny-llama"
ROWS = [{"text": t} for t in ("the cat sat on the mat", "a second line of text", "layers of a model", "hello")]


@dataclass
class Env:
    server: MlflowServer
    client: TestClient
    key: str
    sf: Any
    registry: Any  # mlflow.MlflowClient

    def req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.client.request(method, path, headers={"Authorization": f"Bearer {self.key}"}, **kw)

    def get(self, path: str) -> httpx.Response:
        return self.req("GET", path)

    def submit(self, spec: dict[str, Any]) -> str:
        resp = self.req("POST", "/v1/analyses", json=spec)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def finished(self, analysis_id: str) -> dict[str, Any]:
        return wait_for_analysis(self.get, analysis_id, timeout=240)

    def updates(self, analysis_id: str) -> list[RegistryUpdate]:
        with session_scope(self.sf) as s:
            rows = list(s.scalars(select(RegistryUpdate).where(RegistryUpdate.analysis_id == analysis_id)
                                  .order_by(RegistryUpdate.created_at)))
            s.expunge_all()
        return rows

    def wait_updates_done(self, analysis_id: str, timeout: float = 120) -> list[RegistryUpdate]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.updates(analysis_id)
            if rows and all(r.state == "done" for r in rows):
                return rows
            time.sleep(0.3)
        raise AssertionError([(r.kind, r.state, r.attempts, r.last_error) for r in self.updates(analysis_id)])


def _register_versions(url: str, n: int) -> None:
    import mlflow.transformers
    import torch

    from worker.modelzoo.loading import _tiny_random

    mlflow.set_tracking_uri(url)
    model, tokenizer, _ = _tiny_random("llama", torch.float32)
    for _ in range(n):
        with mlflow.start_run():
            mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
                registered_model_name=MODEL, pip_requirements=["torch", "transformers"],
            )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(work)
    server.start()
    worker = None
    try:
        _register_versions(server.url, 2)
        db = f"sqlite:///{work / 'layerscope.db'}"
        upgrade(db)
        settings = make_settings(
            db, work, mlflow_tracking_uri=server.url, mlflow_http_retries=0, mlflow_timeout=5,
            registry_backoff_base=0.5, registry_backoff_max=2.0, registry_max_attempts=200,
        )
        sf = session_factory(settings.resolved_database_url)
        with session_scope(sf) as s:
            key = create_key(s, settings, f"proj-{uuid.uuid4().hex[:8]}", "ci", ["read", "submit", "admin"])
        app = create_app(settings)
        worker = EmbeddedWorker(app.state.session_factory, settings, app.state.enqueuer)
        worker.start()
        yield Env(server, TestClient(app), key, sf, mlflow.MlflowClient(server.url))
    finally:
        if worker is not None:
            worker.stop()
            worker.join(timeout=30)
        server.stop()


def _policy(env: Env, name: str, rules: list[str], **registry: str) -> None:
    resp = env.req("PUT", f"/v1/gates/{name}", json={"rules": rules, "registry": registry or None})
    assert resp.status_code in (200, 201), resp.text
    assert resp.json()["registry"] == (registry or None)


def _events(env: Env, analysis_id: str, kind: str) -> list[dict[str, Any]]:
    with session_scope(env.sf) as s:
        return [e.payload for e in s.scalars(
            select(WebhookEvent).where(WebhookEvent.analysis_id == analysis_id, WebhookEvent.type == kind))]


def _eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.3)


PASSING = ["layers.avss.avss.avss.count >= 4", "layers.avss.warnings >= 0"]
FAILING = ["layers.avss.avss.avss.count >= 1000"]


def test_pass_logs_the_run_tags_the_version_and_moves_the_alias(env: Env) -> None:
    _policy(env, "release", PASSING, alias_on_pass="champion")
    # The registered version is the subject: with no `model`, it is also what is loaded (models:/NAME/1).
    analysis_id = env.submit({
        "registry": {"mlflow": {"model": MODEL, "version": "1"}}, "dataset": {"rows": ROWS},
        "stages": {"avss": {}}, "gate_policy": "release",
    })
    job = env.finished(analysis_id)
    assert job["state"] == "SUCCEEDED", job
    assert job["summary"]["runtime"]["source"] == f"mlflow:models:/{MODEL}/1"
    assert not [w for w in job["warnings"] if w.startswith("registry:")]
    run_update, verdict_update = env.wait_updates_done(analysis_id)
    assert (run_update.kind, verdict_update.kind) == ("run", "verdict")

    version = env.registry.get_model_version(MODEL, "1")
    tags = version.tags
    assert tags["layerscope.gate.verdict"] == "pass"
    assert tags["layerscope.gate.policy"] == "release@1"
    assert tags["layerscope.gate.analysis_id"] == analysis_id
    assert tags["layerscope.gate.failing_rules"] == "none"
    assert tags["layerscope.gate.release"] == "pass"
    assert env.registry.get_model_version_by_alias(MODEL, "champion").version == "1"

    run = env.registry.get_run(tags["layerscope.run_id"])
    assert run.data.tags["layerscope.analysis_id"] == analysis_id
    assert run.data.tags["layerscope.model_version"] == "1"
    assert run.data.params["model"] == f"models:/{MODEL}/1"
    files = {a.path for a in env.registry.list_artifacts(run.info.run_id, "layers")}
    assert {"layers/avss-avss.json", "layers/avss-avss.csv"} <= files
    table = env.registry.load_table(run.info.experiment_id, "layers/avss-avss.json", run_ids=[run.info.run_id])
    layers = env.get(f"/v1/analyses/{analysis_id}/layers?stage=avss").json()["items"]
    assert sorted(table["layer"]) == sorted(r["layer"] for r in layers if r["scorer"] == "avss")
    assert {a.path for a in env.registry.list_artifacts(run.info.run_id, "plots")}, "no plots logged"
    metrics = env.get(f"/v1/analyses/{analysis_id}/metrics").json()["items"]
    for m in metrics:
        if m["ci_low"] is not None:  # an interval travels as separate metrics
            key = f"{m['stage']}.{m['scope']}.{m['name']}".replace("=", "_").replace(",", "_")
            assert run.data.metrics[f"{key}.ci_low"] == pytest.approx(m["ci_low"])

    updated = _events(env, analysis_id, "registry.updated")
    assert sorted(e["kind"] for e in updated) == ["run", "verdict"]
    assert [e["result"]["alias"] for e in updated if e["kind"] == "verdict"] == ["champion"]
    assert len(_events(env, analysis_id, "gate.verdict")) == 1


def test_fail_tags_the_version_and_leaves_the_alias(env: Env) -> None:
    _policy(env, "strict", FAILING, alias_on_pass="champion")
    env.registry.set_registered_model_alias(MODEL, "candidate", "2")
    # Subject by alias (resolved when the job starts); the model itself named by its registry URI.
    analysis_id = env.submit({
        "model": {"mlflow": f"models:/{MODEL}@candidate"}, "registry": {"mlflow": {"model": MODEL, "alias": "candidate"}},
        "dataset": {"rows": ROWS}, "stages": {"avss": {}}, "gate_policy": "strict",
    })
    job = env.finished(analysis_id)
    assert job["state"] == "SUCCEEDED", job
    env.wait_updates_done(analysis_id)
    assert env.get(f"/v1/analyses/{analysis_id}").json()["summary"]["registry"]["mlflow"]["version"] == "2"
    tags = env.registry.get_model_version(MODEL, "2").tags
    assert tags["layerscope.gate.verdict"] == "fail"
    assert tags["layerscope.gate.policy"] == "strict@1"
    assert FAILING[0] in tags["layerscope.gate.failing_rules"]
    assert tags["layerscope.gate.analysis_id"] == analysis_id
    assert env.registry.get_model_version_by_alias(MODEL, "champion").version == "1", "a failing verdict moved it"
    # A verdict asked for later through the API tags the same version too.
    resp = env.req("POST", f"/v1/analyses/{analysis_id}/gate?policy=release")
    assert resp.status_code in (200, 201), resp.text
    assert resp.json()["verdict"] == "pass"
    env.wait_updates_done(analysis_id)
    assert env.registry.get_model_version(MODEL, "2").tags["layerscope.gate.release"] == "pass"
    assert env.registry.get_model_version_by_alias(MODEL, "champion").version == "2"


def test_registry_down_leaves_the_analysis_succeeded_and_the_update_is_retried(env: Env) -> None:
    _policy(env, "release", PASSING, alias_on_pass="champion")
    env.server.stop()
    try:
        # The model comes from elsewhere (the registry is down); the subject is version 1.
        analysis_id = env.submit({
            "model": {"name": "tiny-random-llama"}, "registry": {"mlflow": {"model": MODEL, "version": "1"}},
            "dataset": {"rows": ROWS}, "stages": {"avss": {}}, "gate_policy": "release",
        })
        assert env.finished(analysis_id)["state"] == "SUCCEEDED"

        def registry_warnings() -> list[str]:  # added by the first failed attempt, right after the job's end
            return [w for w in env.get(f"/v1/analyses/{analysis_id}").json()["warnings"] if w.startswith("registry:")]

        _eventually(lambda: bool(registry_warnings()))
        assert "retried" in registry_warnings()[0] and "Connection refused" in registry_warnings()[0]
        assert env.get(f"/v1/analyses/{analysis_id}").json()["state"] == "SUCCEEDED"
        verdicts = env.get(f"/v1/analyses/{analysis_id}/verdicts").json()
        assert [v["verdict"] for v in verdicts["items"]] == ["pass"], "the verdict is stored while MLflow is down"
        _eventually(lambda: all(u.attempts >= 1 for u in env.updates(analysis_id)[:1]))
        assert all(u.state == "pending" for u in env.updates(analysis_id))
    finally:
        env.server.start()
    rows = env.wait_updates_done(analysis_id, timeout=120)
    assert rows[0].attempts >= 2
    tags = env.registry.get_model_version(MODEL, "1").tags
    assert tags["layerscope.gate.analysis_id"] == analysis_id
    assert tags["layerscope.gate.verdict"] == "pass"
    job = env.get(f"/v1/analyses/{analysis_id}").json()
    assert job["state"] == "SUCCEEDED"
    assert all(u["state"] == "done" for u in job["summary"]["registry"]["mlflow"]["updates"].values())
