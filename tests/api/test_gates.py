"""Gate policies and verdicts against a real database (Postgres and SQLite)."""

from __future__ import annotations

import copy
import json

import pytest
from sqlalchemy import select

from app.models import GateVerdict
from app.schemas import JobState
from tests.api.conftest import SPEC, Api
from tests.api.test_analyses import assert_problem, submit
from worker.service import jobstore
from worker.service.runner import run_job
from worker.stage import LayerRow, MetricRow, StageResult

RULES = [
    "retained_performance.perplexity >= 0.9",
    "hallucination.eavss_probe.ece <= 0.1",
    "layers.avss.warnings == 0",
]


def results() -> list[StageResult]:
    return [
        StageResult(
            stage="avss",
            layers=[LayerRow(i, f"model.layers.{i}", "avss", {"avss": 0.1 * i}) for i in range(4)],
            metrics=[MetricRow("avss", "prune_count", 1.0, n=4)],
            summary={"prune_layers": [0]},
        ),
        StageResult(
            stage="prune",
            metrics=[
                MetricRow("task=perplexity,scorer=avss", "retained_pct", 92.5, 90.5, 94.0, 64),
                MetricRow("task=perplexity,scorer=avss", "perplexity", 21.0, 19.5, 22.6, 64),
            ],
            warnings=["AVSS loses on perplexity"],
        ),
        StageResult(
            stage="hallucination",
            metrics=[MetricRow("detector=eavss_probe", "ece", 0.07, 0.04, 0.11, 120)],
        ),
    ]


def succeeded(api: Api, spec: dict | None = None, stages: list[StageResult] | None = None) -> str:
    job = submit(api, spec)
    token = jobstore.claim(api.sf, job["id"], "test-worker")
    for result in results() if stages is None else stages:
        jobstore.save_stage(api.sf, api.settings, job["id"], token, result)
    jobstore.finish(api.sf, job["id"], token, JobState.SUCCEEDED)
    return job["id"]


def create_policy(api: Api, name: str = "release", rules: list[str] | None = None) -> dict:
    resp = api.post("/v1/gates", json={"name": name, "rules": rules or RULES, "description": "ship it?"})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_policy_create_version_get_and_list(api: Api) -> None:
    first = create_policy(api)
    assert first["version"] == 1 and first["rules"] == RULES
    assert_problem(api.post("/v1/gates", json={"name": "release", "rules": RULES}), 409)

    resp = api.client.put("/v1/gates/release", headers=api.headers(),
                          json={"rules": [*RULES, "warnings <= 3"], "description": "ship it?"})
    assert resp.status_code == 201 and resp.json()["version"] == 2
    assert resp.headers["location"] == "/v1/gates/release?version=2"
    # The same rules again change nothing.
    again = api.client.put("/v1/gates/release", headers=api.headers(),
                           json={"rules": [*RULES, "warnings <= 3"], "description": "ship it?"})
    assert again.status_code == 200 and again.json()["version"] == 2
    # PUT creates a policy too.
    assert api.client.put("/v1/gates/other", headers=api.headers(), json={"rules": ["warnings == 0"]}).status_code == 201

    assert api.get("/v1/gates/release").json()["version"] == 2
    assert api.get("/v1/gates/release", params={"version": 1}).json()["rules"] == RULES
    assert [p["version"] for p in api.get("/v1/gates/release/versions").json()] == [1, 2]
    listed = api.get("/v1/gates").json()
    assert [(p["name"], p["version"]) for p in listed] == [("other", 1), ("release", 2)]
    assert_problem(api.get("/v1/gates/release", params={"version": 7}), 404)
    assert_problem(api.get("/v1/gates/nope"), 404)


def test_bad_rule_is_422_naming_the_rule(api: Api) -> None:
    bad = [RULES[0], "hallucination.eavss_probe.ece ~ 0.1"]
    body = assert_problem(api.post("/v1/gates", json={"name": "bad", "rules": bad}), 422)
    assert "hallucination.eavss_probe.ece ~ 0.1" in body["detail"]
    assert body["errors"][0]["field"] == "rules.1"
    body = assert_problem(api.client.put("/v1/gates/bad", headers=api.headers(),
                                         json={"rules": ["speed.avss > 1"]}), 422)
    assert "unknown path root 'speed'" in body["detail"]
    assert_problem(api.post("/v1/gates", json={"name": "x", "rules": []}), 422)
    assert_problem(api.post("/v1/gates", json={"name": "x", "rules": RULES, "colour": 1}), 422)
    assert_problem(api.post("/v1/gates", json={"name": "verdicts", "rules": RULES}), 422)
    assert_problem(api.post("/v1/gates", json={"name": "has space", "rules": RULES}), 422)
    assert api.get("/v1/gates").json() == []


def test_scopes_and_project_isolation(api: Api) -> None:
    create_policy(api)
    analysis = succeeded(api)
    read = api.headers(api.read_key)
    other = api.headers(api.other_key)
    assert api.client.get("/v1/gates/release", headers=read).status_code == 200
    assert_problem(api.client.post("/v1/gates", headers=read, json={"name": "r", "rules": RULES}), 403)
    assert_problem(api.client.put("/v1/gates/release", headers=read, json={"rules": RULES}), 403)
    assert_problem(api.client.post(f"/v1/analyses/{analysis}/gate", headers=read, params={"policy": "release"}), 403)
    # Another project sees neither the policy nor the analysis nor its verdicts.
    assert_problem(api.client.get("/v1/gates/release", headers=other), 404)
    assert api.client.get("/v1/gates", headers=other).json() == []
    assert_problem(api.client.post(f"/v1/analyses/{analysis}/gate", headers=other, params={"policy": "release"}), 404)
    verdict = api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release"}).json()
    assert_problem(api.client.get(f"/v1/analyses/{analysis}/verdicts", headers=other), 404)
    assert_problem(api.client.get(f"/v1/gates/verdicts/{verdict['id']}", headers=other), 404)
    assert api.client.get("/v1/gates/verdicts", headers=other).json()["items"] == []


def test_gate_passes_with_every_rule_observed_threshold_and_interval(api: Api) -> None:
    create_policy(api)
    analysis = succeeded(api)
    resp = api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release"})
    assert resp.status_code == 201, resp.text
    verdict = resp.json()
    assert verdict["passed"] is True and verdict["verdict"] == "pass"
    assert verdict["policy"] == "release" and verdict["policy_version"] == 1 and verdict["trigger"] == "api"
    assert verdict["model"] == SPEC["model"]["name"] and verdict["labels"] == {"team": "research"}
    rules = {r["rule"]: r for r in verdict["rules"]}
    assert rules[RULES[0]]["observed"] == 0.925 and rules[RULES[0]]["threshold"] == 0.9
    # retained performance carries its paired interval (as a fraction) and N into the verdict
    kept = rules[RULES[0]]
    assert (kept["ci_low"], kept["ci_high"], kept["n"]) == (pytest.approx(0.905), pytest.approx(0.94), 64)
    ece = rules[RULES[1]]
    assert (ece["observed"], ece["ci_low"], ece["ci_high"], ece["n"]) == (0.07, 0.04, 0.11, 120)
    assert rules[RULES[2]]["observed"] == 0 and rules[RULES[2]]["passed"]
    assert resp.headers["location"] == f"/v1/gates/verdicts/{verdict['id']}"
    assert api.get(resp.headers["location"]).json() == verdict


def test_gate_fails_on_missing_data_and_uses_the_version_asked_for(api: Api) -> None:
    create_policy(api)
    api.client.put("/v1/gates/release", headers=api.headers(),
                   json={"rules": [*RULES, "metrics.eval.task=mmlu.accuracy >= 0.5", "layers.prune.warnings == 0"]})
    analysis = succeeded(api)
    verdict = api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release"}).json()
    assert verdict["passed"] is False and verdict["policy_version"] == 2
    missing, prune_warnings = verdict["rules"][3], verdict["rules"][4]
    assert missing["observed"] is None and missing["passed"] is False
    assert "missing data" in missing["reason"] and "eval" in missing["reason"]
    assert prune_warnings["observed"] == 1 and not prune_warnings["passed"]
    old = api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release", "version": 1}).json()
    assert old["passed"] is True and old["policy_version"] == 1

    # An analysis without the hallucination stage fails that rule rather than passing it silently.
    partial = succeeded(api, stages=results()[:2])
    verdict = api.post(f"/v1/analyses/{partial}/gate", params={"policy": "release", "version": 1}).json()
    by_rule = {r["rule"]: r for r in verdict["rules"]}
    assert verdict["passed"] is False and by_rule[RULES[1]]["observed"] is None
    assert "hallucination" in by_rule[RULES[1]]["reason"]


def test_gate_needs_a_succeeded_analysis_and_a_known_policy(api: Api) -> None:
    create_policy(api)
    queued = submit(api)["id"]
    body = assert_problem(api.post(f"/v1/analyses/{queued}/gate", params={"policy": "release"}), 409)
    assert "QUEUED" in body["detail"]
    failed = submit(api)["id"]
    token = jobstore.claim(api.sf, failed, "w")
    jobstore.finish(api.sf, failed, token, JobState.FAILED, "internal_error", "boom")
    assert_problem(api.post(f"/v1/analyses/{failed}/gate", params={"policy": "release"}), 409)
    analysis = succeeded(api)
    assert_problem(api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "nope"}), 404)
    assert_problem(api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release", "version": 3}), 404)
    assert_problem(api.post(f"/v1/analyses/{analysis}/gate"), 422)
    assert_problem(api.post("/v1/analyses/missing/gate", params={"policy": "release"}), 404)


def test_verdicts_are_listed_per_analysis_model_label_and_policy(api: Api) -> None:
    create_policy(api)
    create_policy(api, "strict", ["hallucination.eavss_probe.ece <= 0.01"])
    spec_b = copy.deepcopy(SPEC)
    spec_b["model"]["name"] = "tiny-random-gpt2"
    spec_b["labels"] = {"team": "search", "candidate": "v7"}
    a, b = succeeded(api), succeeded(api, spec_b)
    v1 = api.post(f"/v1/analyses/{a}/gate", params={"policy": "release"}).json()
    v2 = api.post(f"/v1/analyses/{a}/gate", params={"policy": "strict"}).json()
    v3 = api.post(f"/v1/analyses/{b}/gate", params={"policy": "release"}).json()
    assert (v1["passed"], v2["passed"], v3["passed"]) == (True, False, True)

    def ids(**params) -> list[str]:  # noqa: ANN003
        return [v["id"] for v in api.get("/v1/gates/verdicts", params=params).json()["items"]]

    assert ids() == [v3["id"], v2["id"], v1["id"]]
    assert ids(model="tiny-random-gpt2") == [v3["id"]]
    assert ids(label="candidate=v7") == [v3["id"]]
    assert ids(label="team=research", policy="release") == [v1["id"]]
    assert ids(passed="false") == [v2["id"]]
    assert [v["id"] for v in api.get(f"/v1/analyses/{a}/verdicts").json()["items"]] == [v2["id"], v1["id"]]
    page = api.get("/v1/gates/verdicts", params={"page_size": 2}).json()
    assert len(page["items"]) == 2 and page["next_page_token"]
    rest = api.get("/v1/gates/verdicts", params={"page_size": 2, "page_token": page["next_page_token"]}).json()
    assert [v["id"] for v in rest["items"]] == [v1["id"]] and rest["next_page_token"] is None
    assert_problem(api.get("/v1/gates/verdicts", params={"label": "novalue"}), 422)
    assert_problem(api.get("/v1/gates/verdicts", params={"page_token": "garbage!"}), 422)
    # Deleting the analysis removes its verdicts.
    assert api.delete(f"/v1/analyses/{a}").status_code == 204
    assert ids() == [v3["id"]]


def _run(api: Api, spec: dict) -> str:
    job = submit(api, spec)["id"]

    def pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
        for result in results():
            save(result)

    assert run_job(job, api.sf, api.settings, "w1", pipeline) == JobState.SUCCEEDED
    return job


def test_spec_gate_policy_is_evaluated_when_the_job_succeeds(api: Api) -> None:
    create_policy(api)
    api.client.put("/v1/gates/release", headers=api.headers(), json={"rules": ["warnings == 0"]})
    spec = {**copy.deepcopy(SPEC), "gate_policy": "release@1"}
    job = _run(api, spec)
    items = api.get(f"/v1/analyses/{job}/verdicts").json()["items"]
    assert len(items) == 1
    assert items[0]["trigger"] == "spec" and items[0]["policy_version"] == 1 and items[0]["passed"] is True

    latest = _run(api, {**copy.deepcopy(SPEC), "gate_policy": "release"})
    verdict = api.get(f"/v1/analyses/{latest}/verdicts").json()["items"][0]
    assert verdict["policy_version"] == 2 and verdict["passed"] is False  # one prune warning

    unknown = _run(api, {**copy.deepcopy(SPEC), "gate_policy": "nope"})
    verdict = api.get(f"/v1/analyses/{unknown}/verdicts").json()["items"][0]
    assert verdict["passed"] is False and verdict["rules"] == [] and "nope" in verdict["error"]
    assert_problem(api.post("/v1/analyses", json={**SPEC, "gate_policy": "bad name!"}), 422)
    # Evaluated once: a second end-of-job hook (a redelivery, the sweep) adds nothing.
    from worker.service.webhooks import emit_missed, on_finished

    assert on_finished(api.sf, api.settings, job, JobState.SUCCEEDED) is False
    emit_missed(api.sf, api.settings)
    with api.sf() as s:
        assert len(list(s.scalars(select(GateVerdict).where(GateVerdict.analysis_id == job)))) == 1


def test_verdicts_are_written_into_the_standalone_model_cards(api: Api, tmp_path, caplog) -> None:  # noqa: ANN001
    """The spec's verdict and a later one reach the export's standalone card (downloaded through the
    API); a card that cannot be re-written costs no verdict and leaves the analysis SUCCEEDED."""
    from app.modelcard import parse_front_matter
    from worker.modelcard import Provenance, write_model_card
    from worker.stage import ArtifactFile

    create_policy(api, "strict", ["hallucination.eavss_probe.ece <= 0.01", "layers.avss.warnings == 0"])
    create_policy(api)
    job = submit(api, {**copy.deepcopy(SPEC), "gate_policy": "strict"})["id"]
    card = write_model_card(tmp_path, Provenance("tiny-random-llama", analysis_id=job, spec={"gate_policy": "strict"}),
                            kind="pruned", removed_layers=[0], card_artifact="pruned-model-avss.card.md").read_bytes()
    stages = results()
    stages[1].artifacts = [  # the prune stage's export, its standalone card, and a card that does not parse
        ArtifactFile("pruned-model-avss.tar.gz", "application/gzip", b"an archive"),
        ArtifactFile("pruned-model-avss.card.md", "text/markdown", card),
        ArtifactFile("broken.card.md", "text/markdown", b"no front matter"),
    ]

    def pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
        for result in stages:
            save(result)

    with caplog.at_level("WARNING", logger="layerscope.gates"):
        assert run_job(job, api.sf, api.settings, "w1", pipeline) == JobState.SUCCEEDED
    assert "model card broken.card.md" in caplog.text

    def downloaded() -> tuple[list[dict], str]:
        resp = api.get(f"/v1/analyses/{job}/artifacts/pruned-model-avss.card.md")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/markdown")
        return parse_front_matter(resp.text)["layerscope"]["gate_verdicts"], resp.text

    (spec_verdict,), text = downloaded()
    assert spec_verdict["verdict"] == "fail" and (spec_verdict["policy"], spec_verdict["policy_version"]) == ("strict", 1)
    assert spec_verdict["failing_rules"] == ["hallucination.eavss_probe.ece <= 0.01"] and spec_verdict["trigger"] == "spec"
    assert "- strict@1: **fail** (failing rules: hallucination.eavss_probe.ece <= 0.01)" in text and "Pending" not in text
    assert spec_verdict["id"] == api.get(f"/v1/analyses/{job}/verdicts").json()["items"][0]["id"]

    later = api.post(f"/v1/analyses/{job}/gate", params={"policy": "release"})  # re-gating re-writes the card
    assert later.status_code == 201 and later.json()["passed"] is True
    verdicts, text = downloaded()
    assert [(v["policy"], v["verdict"], v["id"]) for v in verdicts] == [
        ("strict", "fail", spec_verdict["id"]), ("release", "pass", later.json()["id"])]
    assert "- release@1: **pass** (failing rules: none)" in text
    listed = {a["name"]: a["size"] for a in api.get(f"/v1/analyses/{job}/artifacts").json()["items"]}
    assert listed["pruned-model-avss.card.md"] == len(text.encode())
    assert api.get(f"/v1/analyses/{job}/artifacts/broken.card.md").content == b"no front matter"
    assert api.get(f"/v1/analyses/{job}/artifacts/pruned-model-avss.tar.gz").content == b"an archive"


# ------------------------------------------------------------------ `layerscope gate` against a live server


@pytest.fixture
def live_server(api: Api):  # noqa: ANN201
    """The API on a real port (uvicorn in a thread) over the test's database."""
    from app.main import create_app
    from tests.conftest import serve_in_thread

    with serve_in_thread(create_app(api.settings)) as url:
        yield url


def test_cli_gate_exit_codes_for_ci(api: Api, live_server: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    create_policy(api)
    create_policy(api, "strict", ["hallucination.eavss_probe.ece <= 0.01", "metrics.eval.x.y >= 1"])
    analysis = succeeded(api)
    runner = CliRunner()

    def gate(*args: str, key: str | None = None):  # noqa: ANN202
        return runner.invoke(app, ["gate", *args, "--server", live_server, "--key", key or api.key])

    ok = gate(analysis, "--policy", "release")
    assert ok.exit_code == 0, ok.output
    assert "PASS: policy release v1" in ok.stdout and "3/3 rules pass" in ok.stdout
    assert "retained_performance.perplexity >= 0.9" in ok.stdout and "[0.04, 0.11]" in ok.stdout
    assert "[0.905, 0.94]" in ok.stdout  # the retained rule's interval, not `-`

    failed = gate(analysis, "--policy", "strict")
    assert failed.exit_code == 1, failed.output
    assert "FAIL: policy strict v1" in failed.stdout and "missing data" in failed.stdout

    as_json = gate(analysis, "--policy", "release", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["verdict"] == "pass"

    queued = submit(api)["id"]
    not_finished = gate(queued, "--policy", "release")
    assert not_finished.exit_code == 2 and "QUEUED" in not_finished.stderr
    assert gate(analysis, "--policy", "nope").exit_code == 2
    assert gate(analysis, "--policy", "release", key=api.read_key).exit_code == 2  # 403
    unreachable = runner.invoke(app, ["gate", analysis, "--policy", "release", "--server", "http://127.0.0.1:9",
                                      "--key", api.key])
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.stderr
