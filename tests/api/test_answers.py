"""The per-answer table (`GET /v1/analyses/{id}/answers`) against a real database (Postgres and SQLite).

Rows get there the way a worker puts them there: `jobstore.save_stage` with a StageResult's answers.
"""

from __future__ import annotations

import csv
import io
import math

from sqlalchemy import func, select

from app.api.analyses import encode_cursor
from app.models import Answer
from app.schemas import JobState
from tests.api.conftest import Api
from tests.api.test_analyses import assert_problem, submit
from worker.service import jobstore
from worker.stage import AnswerRecord, MetricRow, StageResult

N_HALL = 23
VARIANTS = ("variant=base", "variant=eavss")


def record(i: int, scope: str = "", **kw) -> AnswerRecord:  # noqa: ANN003
    values = dict(
        id=i, split="train" if i < 13 else "test", question=f"What is item {i}?", gold=[f"thing{i}", f"alias{i}"],
        answer=f"thing{i}" if i % 3 == 0 else "no idea", correct=i % 3 == 0, rule="exact" if i % 3 == 0 else None,
        n_tokens=2 + i % 4, stop="newline", scope=scope,
        confidence={"eavss_probe": i / N_HALL, "length": math.nan if i == 5 else (math.inf if i == 6 else 0.5)},
        verbalized_reply="80%" if i >= 13 else None, samples=[f"s{i}", "t"] if i >= 13 else None, meta={"row": i},
    )
    values.update(kw)
    return AnswerRecord(**values)  # type: ignore[arg-type]


def stages() -> list[StageResult]:
    return [
        StageResult(stage="hallucination", answers=[record(i) for i in range(N_HALL)],
                    metrics=[MetricRow("detector=eavss_probe", "ece", 0.1)]),
        StageResult(stage="mitigate", answers=[record(i, scope=v) for v in VARIANTS for i in range(4)]),
    ]


def stored(api: Api, results: list[StageResult] | None = None) -> tuple[str, str]:
    """A finished analysis whose stages were saved by the worker's own code; (id, claim token)."""
    job = submit(api)
    token = jobstore.claim(api.sf, job["id"], "test-worker")
    assert token
    for result in stages() if results is None else results:
        jobstore.save_stage(api.sf, api.settings, job["id"], token, result)
    jobstore.finish(api.sf, job["id"], token, JobState.SUCCEEDED)
    return job["id"], token


def rows(api: Api, analysis_id: str, **params) -> list[dict]:  # noqa: ANN003
    resp = api.get(f"/v1/analyses/{analysis_id}/answers", params={"page_size": 1000, **params})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["analysis_id"] == analysis_id and body["next_page_token"] is None
    return body["items"]


def all_pages(api: Api, analysis_id: str, page_size: int, **params) -> tuple[list[dict], int]:  # noqa: ANN003
    items: list[dict] = []
    token: str | None = None
    pages = 0
    while True:
        query = {"page_size": page_size, **params, **({"page_token": token} if token else {})}
        resp = api.get(f"/v1/analyses/{analysis_id}/answers", params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["items"]) <= page_size
        items += body["items"]
        pages += 1
        token = body["next_page_token"]
        if token is None:
            return items, pages


def stored_count(api: Api, analysis_id: str) -> int:
    with api.sf() as s:
        return s.scalar(select(func.count()).select_from(Answer).where(Answer.analysis_id == analysis_id)) or 0


def test_rows_fields_and_link(api: Api) -> None:
    analysis_id, _ = stored(api)
    assert api.get(f"/v1/analyses/{analysis_id}").json()["links"]["answers"] == f"/v1/analyses/{analysis_id}/answers"
    items = rows(api, analysis_id)
    assert len(items) == N_HALL + 2 * 4
    # (stage, scope, id) order
    assert [(r["stage"], r["scope"], r["id"]) for r in items] == sorted((r["stage"], r["scope"], r["id"]) for r in items)
    by_id = {r["id"]: r for r in items if r["stage"] == "hallucination"}
    r = by_id[15]
    assert r == {
        "stage": "hallucination", "scope": "", "id": 15, "split": "test", "question": "What is item 15?",
        "gold": ["thing15", "alias15"], "answer": "thing15", "correct": True, "rule": "exact", "n_tokens": 5,
        "stop": "newline", "confidence": {"eavss_probe": 15 / N_HALL, "length": 0.5}, "verbalized_reply": "80%",
        "samples": ["s15", "t"], "meta": {"row": 15},
    }
    assert by_id[1]["rule"] is None and by_id[1]["samples"] is None and by_id[1]["verbalized_reply"] is None
    # Non-finite confidences are stored as null (JSON has no NaN/inf).
    assert by_id[5]["confidence"]["length"] is None and by_id[6]["confidence"]["length"] is None
    assert by_id[5]["confidence"]["eavss_probe"] == 5 / N_HALL


def test_filters(api: Api) -> None:
    analysis_id, _ = stored(api)
    hall = [record(i) for i in range(N_HALL)]
    assert len(rows(api, analysis_id, stage="hallucination")) == N_HALL
    assert len(rows(api, analysis_id, stage="mitigate")) == 8
    assert rows(api, analysis_id, stage="prune") == []
    eavss = rows(api, analysis_id, scope="variant=eavss")
    assert len(eavss) == 4 and {r["scope"] for r in eavss} == {"variant=eavss"}
    assert len(rows(api, analysis_id, stage="hallucination", scope="")) == N_HALL
    test_rows = rows(api, analysis_id, stage="hallucination", split="test")
    assert [r["id"] for r in test_rows] == [a.id for a in hall if a.split == "test"]
    wrong = rows(api, analysis_id, stage="hallucination", correct="false")
    assert [r["id"] for r in wrong] == [a.id for a in hall if not a.correct]
    assert all(not r["correct"] for r in wrong)
    both = rows(api, analysis_id, stage="hallucination", split="train", correct="true")
    assert [r["id"] for r in both] == [a.id for a in hall if a.split == "train" and a.correct]
    # mitigate's ids 0..3 are all train: correct ones in both variants
    assert len(rows(api, analysis_id, split="train", correct=True, stage="mitigate")) == 2 * 2


def test_paging_returns_every_row_once(api: Api) -> None:
    analysis_id, _ = stored(api)
    everything = rows(api, analysis_id)
    for size in (1, 4, 7, len(everything), len(everything) + 1):
        paged, pages = all_pages(api, analysis_id, size)
        assert paged == everything, size
        assert pages == math.ceil(len(everything) / size), size
    # Paging under a filter stays inside the filter, across the stage/scope boundaries.
    paged, _ = all_pages(api, analysis_id, 3, correct="false")
    assert paged == rows(api, analysis_id, correct="false")
    paged, _ = all_pages(api, analysis_id, 3, scope="variant=base")
    assert [r["id"] for r in paged] == [0, 1, 2, 3]


def test_csv(api: Api) -> None:
    analysis_id, _ = stored(api)
    base = f"/v1/analyses/{analysis_id}/answers"
    resp = api.get(base, params={"format": "csv", "stage": "hallucination", "split": "test", "page_size": 1000})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    assert "next-page-token" not in resp.headers
    reader = csv.DictReader(io.StringIO(resp.text))
    assert reader.fieldnames == [
        "stage", "scope", "id", "split", "question", "gold", "answer", "correct", "rule", "n_tokens", "stop",
        "confidence_eavss_probe", "confidence_length", "verbalized_reply", "samples", "meta",
    ]
    got = list(reader)
    assert [int(r["id"]) for r in got] == list(range(13, N_HALL))
    first = got[0]
    assert first["split"] == "test" and first["gold"] == "thing13; alias13" and first["correct"] == "0"
    assert first["rule"] == "" and first["samples"] == '["s13", "t"]' and first["meta"] == '{"row": 13}'
    assert float(first["confidence_eavss_probe"]) == 13 / N_HALL

    # A page of CSV: the next page's token comes in a header, the next page has the rest.
    resp = api.get(base, params={"format": "csv", "page_size": 10})
    token = resp.headers["next-page-token"]
    first_page = list(csv.DictReader(io.StringIO(resp.text)))
    second = api.get(base, params={"format": "csv", "page_size": 10, "page_token": token})
    ids = [(r["stage"], r["scope"], r["id"]) for r in first_page + list(csv.DictReader(io.StringIO(second.text)))]
    assert len(ids) == 20 == len(set(ids))
    assert ids == [(r["stage"], r["scope"], str(r["id"])) for r in rows(api, analysis_id)][:20]

    # The Python client (and `layerscope answers --csv`) follows the pages: one header, every row, filters kept.
    from layerscope import Client

    whole = api.get(base, params={"format": "csv", "page_size": 1000, "split": "test"}).text
    sdk = Client("http://testserver", api.key)
    sdk.http = api.client  # the in-process app (TestClient is an httpx.Client)
    api.client.headers["Authorization"] = f"Bearer {api.key}"
    try:
        assert sdk.answers_csv(analysis_id, page_size=4, split="test") == whole and whole.count("\r\n") > 5
    finally:
        del api.client.headers["Authorization"]

    # The documented CSV operation answers the same, with the same filters and paging.
    dot = api.get(f"{base}.csv", params={"page_size": 10, "page_token": token})
    assert dot.headers["content-type"].startswith("text/csv") and dot.text == second.text
    assert api.get(f"{base}.csv", params={"page_size": 10}).headers["next-page-token"] == token


def test_other_project_missing_and_auth(api: Api) -> None:
    analysis_id, _ = stored(api)
    base = f"/v1/analyses/{analysis_id}/answers"
    assert_problem(api.client.get(base, headers=api.headers(api.other_key)), 404)
    assert_problem(api.get("/v1/analyses/00000000-0000-0000-0000-000000000000/answers"), 404)
    assert_problem(api.client.get(base), 401)
    assert api.client.get(base, headers=api.headers(api.read_key)).status_code == 200


def test_invalid_params_are_422_problems(api: Api) -> None:
    analysis_id, _ = stored(api)
    base = f"/v1/analyses/{analysis_id}/answers"
    body = assert_problem(api.get(base, params={"page_token": "not-a-token"}), 422)
    assert body["errors"][0]["field"] == "page_token"
    for forged in (encode_cursor(["hallucination", "", "7"]), encode_cursor(["hallucination", 1, 7]),
                   encode_cursor(["hallucination", ""]), encode_cursor({"a": 1}), encode_cursor([None, "", 2**40]),
                   encode_cursor(["hallucination", "", True])):
        assert_problem(api.get(base, params={"page_token": forged}), 422)
    for params in ({"split": "dev"}, {"correct": "maybe"}, {"page_size": 0}, {"page_size": 1001},
                   {"format": "xml"}, {"stage": "s" * 33}, {"stage": "a\x00b"}, {"scope": "\x00"}):
        body = assert_problem(api.get(base, params=params), 422)
        assert body["errors"], params
    # A token from one filter still pages another one (it is just a position), never an error.
    token = api.get(base, params={"page_size": 2}).json()["next_page_token"]
    assert api.get(base, params={"page_token": token, "split": "test"}).status_code == 200


def test_second_save_overwrites_and_many_answers(api: Api) -> None:
    n = 1234  # more than one INSERT chunk
    many = [record(i % N_HALL, id=i, question=f"q{i}") for i in range(n)]
    analysis_id, _ = stored(api, [StageResult(stage="hallucination", answers=many)])
    assert stored_count(api, analysis_id) == n
    paged, pages = all_pages(api, analysis_id, 1000)
    assert pages == 2 and [r["id"] for r in paged] == list(range(n))

    # The job is redelivered (same claim) and saves the stage again, with one answer changed:
    # the rows are overwritten, never duplicated.
    job = submit(api)
    token = jobstore.claim(api.sf, job["id"], "test-worker")
    assert token
    first = [record(i) for i in range(N_HALL)]
    jobstore.save_stage(api.sf, api.settings, job["id"], token, StageResult(stage="hallucination", answers=first))
    again = [record(i, answer="changed", correct=False, rule=None) if i == 0 else record(i) for i in range(N_HALL)]
    jobstore.save_stage(api.sf, api.settings, job["id"], token, StageResult(stage="hallucination", answers=again))
    assert stored_count(api, job["id"]) == N_HALL
    got = {r["id"]: r for r in rows(api, job["id"])}
    assert got[0]["answer"] == "changed" and got[0]["correct"] is False and got[0]["rule"] is None
    # A stage without answers leaves them alone.
    jobstore.save_stage(api.sf, api.settings, job["id"], token, StageResult(stage="hallucination"))
    assert stored_count(api, job["id"]) == N_HALL


def test_duplicates_in_one_result_and_odd_text(api: Api) -> None:
    """One StageResult naming the same (scope, id) twice keeps the last; NUL characters (refused by
    Postgres text and JSONB) are replaced, so such a row never fails the whole stage."""
    answers = [record(0), record(0, answer="last"), record(1, question="nul\x00here", meta={"k\x00": "v\x00"})]
    analysis_id, _ = stored(api, [StageResult(stage="hallucination", answers=answers)])
    got = rows(api, analysis_id)
    assert [r["id"] for r in got] == [0, 1]
    assert got[0]["answer"] == "last"
    assert got[1]["question"] == "nul\ufffdhere" and got[1]["meta"] == {"k\ufffd": "v\ufffd"}


def test_deleting_the_analysis_deletes_its_answers(api: Api) -> None:
    analysis_id, _ = stored(api)
    assert stored_count(api, analysis_id) == N_HALL + 8
    assert api.delete(f"/v1/analyses/{analysis_id}").status_code == 204
    assert stored_count(api, analysis_id) == 0
    assert_problem(api.get(f"/v1/analyses/{analysis_id}/answers"), 404)
