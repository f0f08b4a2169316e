"""`GET /v1/catalog` and `layerscope catalog` name what a spec accepts, from the same tables the
worker loads from."""

from __future__ import annotations

from typer.testing import CliRunner

import cli.main
from app.schemas import AnalysisSpec, StagesSpec
from tests.api.conftest import Api
from tests.conftest import serve_in_thread
from worker.datasets import BUILTIN_DATASETS
from worker.modelzoo import BUILTIN_MODELS


def test_catalog_lists_builtins_stages_and_names(api: Api) -> None:
    resp = api.get("/v1/catalog")
    assert resp.status_code == 200, resp.text
    cat = resp.json()
    assert [m["name"] for m in cat["models"]] == list(BUILTIN_MODELS)
    assert {m["name"]: m["parameters"] for m in cat["models"]}["smollm2-135m"] == 134_515_008
    assert [d["name"] for d in cat["datasets"]] == list(BUILTIN_DATASETS)
    assert [s["name"] for s in cat["stages"]] == list(StagesSpec.model_fields)
    avss = next(s for s in cat["stages"] if s["name"] == "avss")
    assert avss["options"]["properties"]["prune_fraction"]["default"] == 0.25
    # every name listed is one a spec accepts
    for scorer in cat["scorers"]:
        AnalysisSpec.model_validate({"dataset": {"name": "chatterbot-conversations"},
                                     "stages": {"prune": {"scorers": [scorer]}}})
    assert "block_influence" in cat["scorers"] and "eavss_probe" in cat["detectors"]
    assert api.client.get("/v1/catalog").status_code == 401


def test_cli_catalog_prints_the_tables(api: Api) -> None:
    with serve_in_thread(api.client.app) as base:
        out = CliRunner().invoke(cli.main.app, ["catalog", "--server", base, "--key", api.key])
    assert out.exit_code == 0, out.output
    assert "smollm2-135m" in out.output and "chatterbot-trivia" in out.output
    assert "scorers: avss, gbis" in out.output
