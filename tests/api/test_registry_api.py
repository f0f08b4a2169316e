"""The registry fields of the API: specs naming MLflow, a policy's registry actions, the outbox rows."""

from __future__ import annotations

from sqlalchemy import select

from app.models import RegistryUpdate
from tests.api.conftest import Api

SPEC = {"dataset": {"rows": [{"text": "hello world"}]}, "stages": {"avss": {}}}


def test_registry_spec_needs_a_configured_tracking_server(api: Api) -> None:
    resp = api.post("/v1/analyses", json={**SPEC, "registry": {"mlflow": {"model": "m", "version": "3"}}})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["errors"][0]["field"] == "model.mlflow"  # no `model`: it is loaded from the version
    resp = api.post("/v1/analyses", json={**SPEC, "model": {"name": "tiny-random-llama"},
                                          "registry": {"mlflow": {"model": "m", "alias": "candidate"}}})
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "registry.mlflow"


def test_registry_refs_are_validated(api: Api) -> None:
    for bad in ({"model": "m"}, {"model": "m", "version": "3", "alias": "x"}, {"model": "m", "version": "v3"},
                {"model": "", "version": "1"}, {"model": "m", "alias": "9bad"}):
        resp = api.post("/v1/analyses", json={**SPEC, "registry": {"mlflow": bad}})
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.json()["errors"][0]["field"].startswith("registry.mlflow"), resp.json()
    for bad_model in ({"mlflow": "runs:/abc/model"}, {"mlflow": "models:/m"}, {"name": "org/x", "mlflow": "models:/m/1"}):
        resp = api.post("/v1/analyses", json={**SPEC, "model": bad_model})
        assert resp.status_code == 422, (bad_model, resp.text)
        assert resp.json()["errors"][0]["field"].startswith("model"), resp.json()


def test_policy_registry_actions_are_versioned(api: Api) -> None:
    rules = {"rules": ["warnings == 0"]}
    first = api.client.put("/v1/gates/release", json=rules, headers=api.headers())
    assert first.status_code == 201 and first.json()["registry"] is None
    second = api.client.put("/v1/gates/release", json={**rules, "registry": {"alias_on_pass": "champion"}},
                            headers=api.headers())
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2 and second.json()["registry"] == {"alias_on_pass": "champion"}
    same = api.client.put("/v1/gates/release", json={**rules, "registry": {"alias_on_pass": "champion"}},
                          headers=api.headers())
    assert same.status_code == 200 and same.json()["version"] == 2
    bad = api.client.put("/v1/gates/release", json={**rules, "registry": {"alias_on_pass": "no spaces"}},
                         headers=api.headers())
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "registry.alias_on_pass"


def test_api_verdict_of_a_registered_version_stores_an_outbox_row(api: Api, tmp_path) -> None:  # noqa: ANN001
    from app.db import session_scope
    from tests.conftest import store_analysis

    analysis_id = store_analysis(api.sf, api.project, {**SPEC, "registry": {"mlflow": {"model": "m", "version": "3"}}})
    with session_scope(api.sf) as s:
        from app.models import Analysis

        s.get(Analysis, analysis_id).state = "SUCCEEDED"
    api.client.put("/v1/gates/release", json={"rules": ["warnings == 0"]}, headers=api.headers())
    resp = api.post(f"/v1/analyses/{analysis_id}/gate?policy=release")
    assert resp.status_code in (200, 201), resp.text
    with session_scope(api.sf) as s:
        rows = list(s.scalars(select(RegistryUpdate).where(RegistryUpdate.analysis_id == analysis_id)))
        assert [(r.kind, r.state, r.verdict_id) for r in rows] == [("verdict", "pending", resp.json()["id"])]
    plain = store_analysis(api.sf, api.project, SPEC)
    with session_scope(api.sf) as s:
        s.get(Analysis, plain).state = "SUCCEEDED"
    assert api.post(f"/v1/analyses/{plain}/gate?policy=release").status_code in (200, 201)
    with session_scope(api.sf) as s:
        assert not list(s.scalars(select(RegistryUpdate).where(RegistryUpdate.analysis_id == plain)))
