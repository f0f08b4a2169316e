"""The mitigate stage through the API with the in-process worker (the same runner and
pipeline as a Celery worker) on the real database backends, and `model.patch` applying
its artifact to a fresh base model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app.config import Settings
from app.schemas import ModelSpec
from tests.api.conftest import Api
from tests.conftest import wait_for_analysis
from worker.mitigation.patch import apply_patch, read_patch
from worker.modelzoo import load_model
from worker.service.embedded import EmbeddedWorker

QA = [{"question": f"What is item number {i} called?", "answer": f"thing{i}"} for i in range(48)]
SPEC = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": QA, "limit": len(QA), "max_tokens": 64},
    "stages": {
        "hallucination": {"n_shots": 2, "max_new_tokens": 3, "n_boot": 20, "probe_l2": 1.0,
                          "detectors": ["sequence_likelihood"], "layer_probes": False, "test_fraction": 0.3},
        "mitigate": {"top_k": 1, "epochs": 1, "learning_rate": 1e-2, "n_boot": 20,
                     "eval_detectors": ["sequence_likelihood", "p_ik"],
                     "perplexity_dataset": {"rows": [{"text": "a few words of general text"}] * 3, "limit": 3}},
    },
}


@pytest.fixture
def worker(api: Api) -> Iterator[None]:
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = api.client.app
    w = EmbeddedWorker(app.state.session_factory, api.settings, app.state.enqueuer)
    w.start()
    yield
    w.stop()
    w.join(timeout=30)
    torch.set_num_threads(torch_threads)


def _wait(api: Api, analysis_id: str) -> dict:
    return wait_for_analysis(api.get, analysis_id)


def test_mitigate_stores_the_before_after_table_and_its_patch_loads_on_the_base(api: Api, worker: None) -> None:
    job = _wait(api, api.post("/v1/analyses", json=SPEC).json()["id"])
    assert job["state"] == "SUCCEEDED", job
    summary = job["summary"]["mitigate"]
    assert summary["layer_source"] == "hallucination stage (training split)"
    assert summary["layers"] == job["summary"]["hallucination"]["layer_scores"]["ranking"][:1]

    metrics = api.get(f"/v1/analyses/{job['id']}/metrics", params={"stage": "mitigate"}).json()["items"]
    scopes = {m["scope"] for m in metrics}
    assert {"variant=base", "variant=eavss", "variant=random", "delta=eavss-base", "delta=eavss-random"} <= scopes
    acc = {m["scope"]: m for m in metrics if m["name"] == "accuracy"}
    assert acc["variant=base"]["n"] == acc["variant=eavss"]["n"] == summary["counts"]["test_answered"]

    answers = api.get(f"/v1/analyses/{job['id']}/answers",
                      params={"stage": "mitigate", "scope": "variant=eavss", "page_size": 1000}).json()["items"]
    assert len(answers) == summary["counts"]["test_answered"] and {a["split"] for a in answers} == {"test"}
    layers = api.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "mitigate"}).json()["items"]
    assert [r["layer"] for r in layers if r["values"]["tuned"] == 1.0] == summary["layers"]

    # A registry gate on the paired difference: the rule reads the stored metric and its interval.
    rules = ['metrics.mitigate."delta=eavss-base".accuracy.ci_low >= -1', "mitigation.eavss-base.accuracy.ci_low >= -1"]
    assert api.client.put("/v1/gates/mitigated", headers=api.headers(), json={"rules": rules}).status_code == 201
    verdict = api.post(f"/v1/analyses/{job['id']}/gate", params={"policy": "mitigated"}).json()
    delta = next(m for m in metrics if m["scope"] == "delta=eavss-base" and m["name"] == "accuracy")
    assert verdict["passed"] is True
    assert [r["observed"] for r in verdict["rules"]] == [delta["ci_low"], delta["ci_low"]]
    card = api.get(f"/v1/analyses/{job['id']}/artifacts/mitigation_card.md").text  # the patch's card has it
    assert "- mitigated@1: **pass** (failing rules: none)" in card and f"verdict `{verdict['id']}`" in card

    patch = api.get(f"/v1/analyses/{job['id']}/artifacts/mitigation.safetensors")
    assert patch.status_code == 200
    tensors, recipe, _ = read_patch(patch.content)
    assert recipe["layers"] == summary["layers"]
    assert all(f".{summary['layers'][0]}." in name for name in tensors)

    # The downloaded patch, applied to a fresh base, equals what the service loads for model.patch.
    fresh = load_model(ModelSpec(name="tiny-random-llama", device="cpu"), Settings(data_dir=api.settings.data_dir),
                       use_cache=False)
    apply_patch(fresh, patch.content)

    patched = {**SPEC, "model": {"name": "tiny-random-llama", "patch": {"analysis_id": job["id"]}},
               "stages": {"avss": {"plots": False}}, "dataset": {"rows": QA[:4], "limit": 4}}
    check = _wait(api, api.post("/v1/analyses", json=patched).json()["id"])
    assert check["state"] == "SUCCEEDED", check

    # A patch from an analysis that has none, or from another project, is refused at submit.
    no_patch = api.post("/v1/analyses", json={**patched, "model": {"name": "tiny-random-llama",
                                                                    "patch": {"analysis_id": check["id"]}}})
    assert no_patch.status_code == 422 and "model.patch.analysis_id" in no_patch.json()["detail"]
    other = api.post("/v1/analyses", json=patched, headers=api.headers(api.other_key))
    assert other.status_code == 422 and "no analysis" in other.json()["detail"]


def test_several_methods_in_one_analysis_and_model_patch_picks_one(api: Api, worker: None) -> None:
    mitigate = {**SPEC["stages"]["mitigate"], "method": ["steering", "dola"], "steering_strengths": [1.0],
                "eval_detectors": ["sequence_likelihood"]}
    spec = {**SPEC, "stages": {**SPEC["stages"], "mitigate": mitigate}}
    job = _wait(api, api.post("/v1/analyses", json=spec).json()["id"])
    assert job["state"] == "SUCCEEDED", (job["error"], job["warnings"])
    assert job["summary"]["mitigate"]["methods"] == ["steering", "dola"]
    metrics = api.get(f"/v1/analyses/{job['id']}/metrics", params={"stage": "mitigate"}).json()["items"]
    assert {"delta=steering_eavss-base", "delta=dola_eavss-dola_random"} <= {m["scope"] for m in metrics}
    # A gate reads a method's paired difference by its variant name.
    rules = ["mitigation.dola_eavss-base.accuracy.n >= 1"]
    assert api.client.put("/v1/gates/dola", headers=api.headers(), json={"rules": rules}).status_code == 201
    assert api.post(f"/v1/analyses/{job['id']}/gate", params={"policy": "dola"}).json()["passed"] is True

    check = {"model": {"name": "tiny-random-llama", "patch": {"analysis_id": job["id"]}},
             "stages": {"avss": {"plots": False}}, "dataset": {"rows": QA[:4], "limit": 4}}
    unnamed = api.post("/v1/analyses", json=check)
    assert unnamed.status_code == 422 and unnamed.json()["errors"][0]["field"] == "model.patch.method", unnamed.text
    assert "['dola', 'steering']" in unnamed.json()["detail"]
    absent = api.post("/v1/analyses", json={**check, "model": {**check["model"], "patch": {
        "analysis_id": job["id"], "method": "contrastive"}}})
    assert absent.status_code == 422 and "no patch of 'contrastive'" in absent.json()["detail"]
    named = {**check, "model": {**check["model"], "patch": {"analysis_id": job["id"], "method": "steering"}}}
    ran = _wait(api, api.post("/v1/analyses", json=named).json()["id"])
    assert ran["state"] == "SUCCEEDED", ran


def test_a_patch_path_outside_the_model_roots_is_refused_at_submit(api: Api) -> None:
    spec = {"model": {"name": "tiny-random-llama", "patch": {"path": "/etc/passwd"}},
            "dataset": {"rows": QA[:4], "limit": 4}, "stages": {"avss": {"plots": False}}}
    resp = api.post("/v1/analyses", json=spec)  # certain at submit (the worker refuses it too: tests/reliability)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "model.patch.path", resp.text
