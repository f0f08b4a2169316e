"""`GET /v1/analyses/{id}/leaderboard`: the hallucination stage's detector leaderboard as stored by the
worker (`jobstore.save_stage`), typed; a 404 problem when there is none. The leaderboard's content is
tested where it is computed (tests/unit/test_hallucination_stage.py::test_leaderboard)."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.test_analyses import assert_problem
from tests.api.test_answers import stored
from worker.stage import StageResult


def _cell(v: float | None, lo: float | None = None, hi: float | None = None) -> dict:
    return {"value": v, "ci_low": lo, "ci_high": hi, "n": 40}


def _row(rank: int, det: str, auc: float, ref: list[str], toolkit: bool, vs_length, vs_toolkit) -> dict:  # noqa: ANN001
    return {"rank": rank, "detector": det, "toolkit": toolkit, "reference": ref,
            "metrics": {"auroc": _cell(auc, auc - 0.1, auc + 0.1), "ece": _cell(0.1), "brier": _cell(0.2),
                        "acc@50": _cell(0.5), "cov@50": None},
            "vs_length": vs_length, "vs_toolkit": vs_toolkit}


BOARD = {
    "split": "test", "n": 40, "sorted_by": "auroc", "metrics": ["auroc", "ece", "brier", "acc@50", "cov@50"],
    "length_baseline": "length", "best_toolkit": "perplexity", "toolkit_estimators": ["perplexity"],
    "comparison": "AUROC difference, paired bootstrap 95% interval",
    "rows": [
        _row(1, "eavss_probe", 0.8, [], False,
             {"reference": "length", "auroc_difference": _cell(0.2, 0.05, 0.35), "verdict": "better"},
             {"reference": "perplexity", "auroc_difference": _cell(0.05, -0.05, 0.15), "verdict": "not_distinguishable"}),
        _row(2, "perplexity", 0.75, ["toolkit"], True,
             {"reference": "length", "auroc_difference": _cell(0.15, 0.01, 0.3), "verdict": "better"}, None),
        _row(3, "length", 0.6, ["length"], False, None,
             {"reference": "perplexity", "auroc_difference": _cell(-0.15, -0.3, -0.01), "verdict": "worse"}),
    ],
}


def test_leaderboard_is_served_typed(api: Api) -> None:
    analysis_id, _ = stored(api, [StageResult(stage="hallucination", summary={"leaderboard": BOARD})])
    resp = api.get(f"/v1/analyses/{analysis_id}/leaderboard")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["analysis_id"] == analysis_id and body["best_toolkit"] == "perplexity"
    assert [r["detector"] for r in body["rows"]] == ["eavss_probe", "perplexity", "length"]
    assert body["rows"][0]["vs_toolkit"]["verdict"] == "not_distinguishable"
    assert body["rows"][0]["metrics"]["cov@50"] is None
    links = api.get(f"/v1/analyses/{analysis_id}").json()["links"]
    assert links["leaderboard"] == f"/v1/analyses/{analysis_id}/leaderboard"
    schema = api.get("/openapi.json").json()
    op = schema["paths"]["/v1/analyses/{analysis_id}/leaderboard"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Leaderboard")
    verdict = schema["components"]["schemas"]["LeaderboardComparison"]["properties"]["verdict"]
    assert "not_distinguishable" in str(verdict)


def test_no_leaderboard_is_a_404_problem(api: Api) -> None:
    analysis_id, _ = stored(api, [StageResult(stage="hallucination", summary={"table": {}})])
    assert "leaderboard" in assert_problem(api.get(f"/v1/analyses/{analysis_id}/leaderboard"), 404)["detail"]
    assert_problem(api.get("/v1/analyses/nope/leaderboard"), 404)
