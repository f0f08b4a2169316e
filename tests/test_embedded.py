"""Embedded mode: SQLite and the in-process worker run the same pipeline as the Celery workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import make_settings, wait_for_analysis
from worker.service.embedded import EmbeddedWorker


def test_embedded_mode_runs_a_real_analysis_end_to_end(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, auth_disabled=True)
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.session_factory, settings, app.state.enqueuer)
    worker.start()
    try:
        client = TestClient(app)
        rows = [{"text": f"line {i} about layers and activations"} for i in range(6)]
        spec = {
            "model": {"name": "tiny-random-llama"},
            "dataset": {"rows": rows, "limit": 6, "max_tokens": 32},
            "stages": {"avss": {"plots": True}},
        }
        job = wait_for_analysis(client.get, client.post("/v1/analyses", json=spec).json()["id"], timeout=120)
        assert job["state"] == "SUCCEEDED", job
        layers = client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "avss"}).json()["items"]
        assert len(layers) == 4
        ranks = sorted(r["values"]["rank"] for r in layers)
        assert ranks == [1, 2, 3, 4]  # rank 1 = lowest AVSS = first pruning candidate
        arts = {a["name"] for a in client.get(f"/v1/analyses/{job['id']}/artifacts").json()["items"]}
        assert any(n.endswith(".png") for n in arts) and any(n.endswith(".svg") for n in arts)
    finally:
        worker.stop()
        worker.join(timeout=10)


@pytest.mark.slow
def test_avss_on_the_real_smollm2_through_the_api_gives_30_layers(sqlite_url: str, tmp_path: Path) -> None:
    # The converted-weights cache is shared with `make demo` so the GGUF is converted once per machine.
    settings = make_settings(sqlite_url, tmp_path, auth_disabled=True).model_copy(
        update={"data_dir": Path(".layerscope")}
    )
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.session_factory, settings, app.state.enqueuer)
    worker.start()
    try:
        client = TestClient(app)
        spec = {
            "model": {"name": "smollm2-135m"},
            "dataset": {"name": "chatterbot-conversations", "limit": 8, "max_tokens": 32},
            "stages": {"avss": {"plots": False}},
        }
        job = wait_for_analysis(client.get, client.post("/v1/analyses", json=spec).json()["id"], timeout=600)
        assert job["state"] == "SUCCEEDED", job
        layers = client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "avss"}).json()["items"]
        assert [r["layer"] for r in layers] == list(range(30))
        assert all(r["block_name"] == f"model.layers.{r['layer']}" for r in layers)
        assert all(r["values"]["avss"] is not None and r["values"]["variance"] > 0 for r in layers)
        assert len(job["summary"]["avss"]["prune_layers"]) == 7  # floor(0.25 x 30)
    finally:
        worker.stop()
        worker.join(timeout=10)
