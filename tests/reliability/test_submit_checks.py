"""Specs that can only fail are refused at submit when the check is cheap and certain (issue 19, low).

Before, every one of these was accepted with 201 and failed only in the worker (or, for a number
as text, an invisible text or a revision on a built-in, ran and gave something else than asked:
"5" analysed as text, null results without a warning, the revision ignored). Now each is a 422
naming the field, and the worker refuses the same spec when it gets one past the API (a job
stored under another configuration), through the real runner and pipeline.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.catalog import BUILTIN_DATASETS, BUILTIN_MODELS
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis
from app.schemas import JobState
from tests.api.test_analyses import assert_problem
from tests.conftest import make_settings, store_analysis
from worker.service.runner import run_job

BASE: dict[str, Any] = {
    "model": {"name": "tiny-random-llama", "device": "cpu"},
    "dataset": {"rows": [{"text": "hello world"}, {"text": "a second text"}], "limit": 2},
    "stages": {"avss": {"plots": False}},
}
QA_ROWS = [{"question": "Capital of France?", "answer": "Paris"}, {"question": "Two plus two?", "answer": "four"}]


def with_(**changes: Any) -> dict:
    """BASE with dotted-path changes (`model__revision="v1"`, `dataset={...}`)."""
    spec = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return spec


# (spec, the field the 422 names, a word its message must hold)
REFUSED: list[tuple[dict, str, str]] = [
    (with_(model={"name": "tiny-random-mistral"}), "model.name", "tiny-random-llama"),
    (with_(model={"name": "smollm2 135m"}), "model.name", "smollm2-135m"),
    (with_(model={"name": "smollm-135m"}), "model.name", "did you mean 'smollm2-135m'?"),  # a bare near miss
    (with_(model={"name": "tiny-random-lama"}), "model.name", "did you mean 'tiny-random-llama'?"),
    (with_(model={"name": "!!"}), "model.name", "built-ins"),
    (with_(model={"name": "smollm2-135m", "revision": "main"}), "model.revision", "hub ids only"),
    (with_(model={"name": "tiny-random-llama", "revision": "v2"}), "model.revision", "hub ids only"),
    (with_(model={"name": "./my-model", "revision": "v2"}), "model.revision", "hub ids only"),
    (with_(dataset={"name": "chatterbot-trivial"}), "dataset.name", "chatterbot-trivia"),
    (with_(dataset={"name": "sciq"}), "dataset.name", "chatterbot-conversations"),
    (with_(stages={"prune": {"qa_dataset": {"name": "nope"}, "tasks": ["qa"]}}), "stages.prune.qa_dataset.name",
     "built-ins"),
    (with_(stages={"mitigate": {"perplexity_dataset": {"name": "wiki"}}}),
     "stages.mitigate.perplexity_dataset.name", "built-ins"),
    (with_(dataset={"rows": [{"text": 5}, {"text": "ok"}], "limit": 2}), "dataset.rows.0.text", "a number"),
    (with_(dataset={"rows": [{"text": "ok"}, {"text": True}], "limit": 2}), "dataset.rows.1.text", "a boolean"),
    (with_(dataset={"rows": [{"text": {"nested": "x"}}], "limit": 1}), "dataset.rows.0.text", "an object"),
    (with_(dataset={"rows": [{"question": 3.5, "answer": "x"}], "limit": 1}), "dataset.rows.0.question", "a number"),
    (with_(dataset={"rows": [{"question": "q?", "answer": True}], "limit": 1}), "dataset.rows.0.answer", "a boolean"),
    (with_(dataset={"rows": [{"question": "q?", "answer": ["a", {"b": 1}]}], "limit": 1}), "dataset.rows.0.answer",
     "a list"),
    (with_(dataset={"rows": [{"content": 7}], "fields": {"text": "content"}, "limit": 1}),
     "dataset.rows.0.content", "a number"),
    (with_(dataset={"rows": [{"text": "\u200b\u200b"}], "limit": 1}), "dataset.rows.0.text", "no visible character"),
    (with_(dataset={"rows": [{"text": "ok"}, {"text": "\u200d\ufeff\u2060"}], "limit": 2}), "dataset.rows.1.text",
     "no visible character"),
    (with_(model={"name": "tiny-random-llama", "patch": {"path": "/etc/x.safetensors"}}), "model.patch.path",
     "disabled"),
]


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> tuple[TestClient, Any, Any, dict[str, str]]:
    settings = make_settings(sqlite_url, tmp_path, rate_limit_per_minute=0)  # no model roots
    sf = session_factory(settings.resolved_database_url)
    with session_scope(sf) as s:
        key = create_key(s, settings, "checks", "k", ["read", "submit"])
    return TestClient(create_app(settings)), settings, sf, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("spec", "field", "says"), REFUSED, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(REFUSED)])
def test_a_spec_that_can_only_fail_is_422_at_submit(api: tuple, spec: dict, field: str, says: str) -> None:
    client, _, sf, auth = api
    body = assert_problem(client.post("/v1/analyses", json=spec, headers=auth), 422)
    assert field in [e["field"] for e in body["errors"]] and says in body["detail"], body
    with sf() as s:
        assert s.query(Analysis).count() == 0


def test_the_refusals_name_the_valid_built_ins(api: tuple) -> None:
    client, _, _, auth = api
    body = assert_problem(client.post("/v1/analyses", json=with_(model={"name": "tiny-random-t5"}), headers=auth), 422)
    assert all(name in body["detail"] for name in BUILTIN_MODELS), body
    body = assert_problem(client.post("/v1/analyses", json=with_(dataset={"name": "x"}), headers=auth), 422)
    assert all(name in body["detail"] for name in BUILTIN_DATASETS), body


def test_misspelt_stages_options_and_choices_say_what_they_should_be(api: tuple) -> None:
    """An unknown key names the closest valid one and lists them all; a wrong choice its closest value."""
    client, _, _, auth = api
    cases = [
        ({**BASE, "stages": {"avs": {}}}, "stages.avs",
         "unknown stage 'avs' (did you mean 'avss'?); valid stages here: profile, avss, prune, hallucination, mitigate"),
        ({**BASE, "stages": {"avss": {"prune_fractio": 0.2}}}, "stages.avss.prune_fractio",
         "(did you mean 'prune_fraction'?)"),
        ({**BASE, "stages": {"hallucination": {"detectors": ["lenght"]}}}, "stages.hallucination.detectors.0",
         "(did you mean 'length'?)"),
        ({**BASE, "stages": {"prune": {"scorers": ["gibs"]}}}, "stages.prune.scorers.0", "(did you mean 'gbis'?)"),
        ({**{k: v for k, v in BASE.items() if k != "dataset"}, "datset": BASE["dataset"]}, "datset",
         "unknown field 'datset' (did you mean 'dataset'?); valid fields here: model, dataset, stages"),
        ({**BASE, "dataset": {**BASE["dataset"], "rows_": []}}, "dataset.rows_", "(did you mean 'rows'?)"),
    ]
    for spec, field, says in cases:
        body = assert_problem(client.post("/v1/analyses", json=spec, headers=auth), 422)
        messages = {e["field"]: e["message"] for e in body["errors"]}
        assert field in messages and says in messages[field], (field, body)
    # Nothing close: the valid names only.
    body = assert_problem(client.post("/v1/analyses", json={**BASE, "stages": {"zzz": {}}}, headers=auth), 422)
    assert body["errors"][0]["message"].startswith("unknown stage 'zzz'; valid stages here: profile, avss")


def test_what_is_not_certain_at_submit_is_accepted(api: tuple, tmp_path: Path) -> None:
    """A hub id (maybe reachable from the worker), with model roots a relative name (maybe a folder
    under a root on the worker's disk), a revision on a hub id, an answer list, a text with a
    zero-width joiner inside an emoji."""
    client, settings, _, auth = api
    (tmp_path / "models").mkdir()
    rooted = TestClient(create_app(settings.model_copy(update={"model_roots": [tmp_path / "models"]})))
    for name in ("models-mirror/org/name", "smollm2 135m", "my model v2"):
        resp = rooted.post("/v1/analyses", json=with_(model={"name": name}), headers=auth)
        assert resp.status_code == 201, (name, resp.text)
    for spec in (
        with_(model={"name": "HuggingFaceTB/SmolLM2-135M", "revision": "main"}),
        with_(model={"name": "gpt2"}),
        with_(dataset={"rows": [{"question": "q?", "answer": ["Paris", "paris"]}], "limit": 1}),
        with_(dataset={"rows": [{"question": "Legs of a spider?", "answer": 8}, {"question": "q", "answer": [1969, "1969"]}],
                       "limit": 2}),
        with_(dataset={"rows": [{"text": "family \U0001f468\u200d\U0001f469"}, {"text": "  padded  "}], "limit": 2}),
    ):
        resp = client.post("/v1/analyses", json=spec, headers=auth)
        assert resp.status_code == 201, (spec["model"], spec["dataset"], resp.text)


@pytest.mark.parametrize(
    ("spec", "error_type", "says"),
    [
        (with_(dataset={"rows": [{"text": "ok"}, {"text": 5}], "limit": 2}), "dataset_invalid", "row 1"),
        (with_(dataset={"rows": [{"text": "\u200b"}], "limit": 1}), "dataset_invalid", "no visible character"),
        (with_(model={"name": "tiny-random-llama", "device": "cpu", "revision": "v2"}), "revision_not_supported",
         "hub ids only"),
    ],
)
def test_the_worker_refuses_the_same_past_the_api(api: tuple, spec: dict, error_type: str, says: str) -> None:
    _, settings, sf, _ = api
    analysis_id = store_analysis(sf, "checks", spec)
    run_job(analysis_id, sf, settings, "reliability-worker")
    with sf() as s:
        row = s.get(Analysis, analysis_id)
    assert (row.state, row.error_type) == (JobState.FAILED.value, error_type), row.error_detail
    assert says in row.error_detail, row.error_detail


def test_a_data_file_with_a_number_as_text_names_the_file_and_line(sqlite_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    settings = make_settings(sqlite_url, tmp_path, data_roots=[data])
    sf = session_factory(settings.resolved_database_url)
    analysis_id = store_analysis(sf, "checks", with_(dataset={"path": "numbers.jsonl", "limit": 2}))
    run_job(analysis_id, sf, settings, "reliability-worker")
    with sf() as s:
        row = s.get(Analysis, analysis_id)
    assert (row.state, row.error_type) == (JobState.FAILED.value, "dataset_invalid"), row.error_detail
    assert "numbers.jsonl" in row.error_detail and "line 2" in row.error_detail and "a number" in row.error_detail


def test_a_project_of_its_own(api: tuple) -> None:
    """The checks read only the spec and the server's configuration: another project's key sees the same."""
    client, settings, sf, _ = api
    with session_scope(sf) as s:
        other = create_key(s, settings, f"other-{uuid.uuid4().hex[:6]}", "k", ["submit"])
    body = assert_problem(client.post("/v1/analyses", json=REFUSED[0][0], headers={"Authorization": f"Bearer {other}"}), 422)
    assert body["errors"][0]["field"] == "model.name"
