"""The per-answer table of an analysis: one row per question a stage answered, filtered and paged."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.api.analyses import (
    PROBLEM_RESPONSES,
    FormatQuery,
    _csv_response,
    _get_owned,
    csv_responses,
    decode_cursor,
    encode_cursor,
)
from app.auth import Principal, require
from app.deps import get_session
from app.models import Answer

router = APIRouter(prefix="/v1/analyses", tags=["analyses"])

NEXT_PAGE_HEADER = "Next-Page-Token"
NO_NUL = r"^[^\x00]*$"  # Postgres text cannot hold NUL: such a filter is a 422, not a database error


class AnswerOut(BaseModel):
    """One answered question: what the model said, whether it was right, how confident each detector was."""

    stage: str = Field(description="The stage that asked the question (`hallucination`, `mitigate`).")
    scope: str = Field(description='What the answer belongs to inside the stage, e.g. `variant=eavss`; "" when one set.')
    id: int = Field(description="The answer's number in its stage and scope (as in `answers.jsonl`).")
    split: str = Field(description="`train` (the probes learn from it) or `test` (the metrics are computed on it).")
    question: str
    gold: list[str] = Field(description="The accepted answers (aliases).")
    answer: str = Field(description="The model's greedy answer.")
    correct: bool
    rule: str | None = Field(description="The correctness rule that accepted the answer; null when it is wrong.")
    n_tokens: int = Field(description="Answer length in tokens.")
    stop: str = Field(description="Why generation stopped: `newline`, `eos` or `max_tokens`.")
    confidence: dict[str, float | None] = Field(
        description="Each detector's confidence that the answer is correct (null where it has none)."
    )
    verbalized_reply: str | None = Field(description="The model's reply when asked for its confidence (test split).")
    samples: list[str] | None = Field(description="The sampled answers of self-consistency (test split).")
    meta: dict[str, Any] = Field(description="The dataset row's `meta`.")


class AnswerPage(BaseModel):
    analysis_id: str
    items: list[AnswerOut]
    next_page_token: str | None


def _parse_cursor(values: list[Any]) -> tuple[str, str, int]:
    stage, scope, answer_id = values
    if not (isinstance(stage, str) and isinstance(scope, str) and type(answer_id) is int):
        raise ValueError("wrong types")
    if "\x00" in stage + scope or abs(answer_id) >= 2**31:
        raise ValueError("out of range")
    return stage, scope, answer_id


def _out(a: Answer) -> AnswerOut:
    return AnswerOut(
        stage=a.stage, scope=a.scope, id=a.answer_id, split=a.split, question=a.question, gold=list(a.gold or []),
        answer=a.answer, correct=a.correct, rule=a.rule, n_tokens=a.n_tokens, stop=a.stop,
        confidence=dict(a.confidence or {}), verbalized_reply=a.verbalized_reply, samples=a.samples,
        meta=dict(a.meta or {}),
    )


def _csv(items: list[AnswerOut], next_token: str | None) -> Response:
    detectors = sorted({d for a in items for d in a.confidence})
    head = ["stage", "scope", "id", "split", "question", "gold", "answer", "correct", "rule", "n_tokens", "stop"]
    response = _csv_response(
        [*head, *(f"confidence_{d}" for d in detectors), "verbalized_reply", "samples", "meta"],
        [
            [
                a.stage, a.scope, a.id, a.split, a.question, "; ".join(a.gold), a.answer, int(a.correct), a.rule,
                a.n_tokens, a.stop, *(a.confidence.get(d) for d in detectors), a.verbalized_reply,
                None if a.samples is None else json.dumps(a.samples, ensure_ascii=False),
                json.dumps(a.meta, ensure_ascii=False),
            ]
            for a in items
        ],
    )
    if next_token:
        response.headers[NEXT_PAGE_HEADER] = next_token
    return response


def _page(
    session: Session, principal: Principal, analysis_id: str, stage: str | None, scope: str | None,
    split: str | None, correct: bool | None, page_size: int, page_token: str | None,
) -> tuple[str, list[AnswerOut], str | None]:
    """(analysis id, one page of answers, the next page's token or None)."""
    row = _get_owned(session, principal, analysis_id)
    query = select(Answer).where(Answer.analysis_id == row.id)
    if stage is not None:
        query = query.where(Answer.stage == stage)
    if scope is not None:
        query = query.where(Answer.scope == scope)
    if split is not None:
        query = query.where(Answer.split == split)
    if correct is not None:
        query = query.where(Answer.correct == correct)
    if page_token:
        after_stage, after_scope, after_id = decode_cursor(page_token, _parse_cursor)
        query = query.where(
            or_(
                Answer.stage > after_stage,
                and_(Answer.stage == after_stage, Answer.scope > after_scope),
                and_(Answer.stage == after_stage, Answer.scope == after_scope, Answer.answer_id > after_id),
            )
        )
    rows = list(session.scalars(query.order_by(Answer.stage, Answer.scope, Answer.answer_id).limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    next_token = encode_cursor([rows[-1].stage, rows[-1].scope, rows[-1].answer_id]) if more else None
    return row.id, [_out(a) for a in rows], next_token


StageFilter = Annotated[str | None, Query(max_length=32, pattern=NO_NUL, description="Only this stage's answers.")]
ScopeFilter = Annotated[
    str | None, Query(max_length=255, pattern=NO_NUL, description="Only this scope (e.g. `variant=base`).")
]
SplitFilter = Annotated[Literal["train", "test"] | None, Query(description="Only this split.")]
CorrectFilter = Annotated[bool | None, Query(description="Only correct (true) or only wrong (false) answers.")]
PageSize = Annotated[int, Query(ge=1, le=1000)]
PageToken = Annotated[str | None, Query(max_length=8192)]


@router.get(
    "/{analysis_id}/answers",
    response_model=AnswerPage,
    summary="Per-answer table: every question a stage answered",
    description=(
        "One row per answered question of the `hallucination` stage (and of `mitigate`, one `scope` per model "
        "variant): the question, its gold aliases, the model's answer, whether a correctness rule accepted it "
        "(and which), its length and why generation stopped, each detector's confidence (null where it has "
        "none), the verbalized-confidence reply and self-consistency samples (test split). Filter by `stage`, "
        "`scope`, `split` and `correct`; rows come in (stage, scope, id) order, at most `page_size` at a time, "
        "with `next_page_token` for the next page. The same page as CSV: `GET .../answers.csv`."
    ),
    responses=PROBLEM_RESPONSES,
)
def list_answers(
    analysis_id: str,
    stage: StageFilter = None,
    scope: ScopeFilter = None,
    split: SplitFilter = None,
    correct: CorrectFilter = None,
    page_size: PageSize = 100,
    page_token: PageToken = None,
    format: FormatQuery = "json",
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Any:
    ident, items, next_token = _page(session, principal, analysis_id, stage, scope, split, correct, page_size,
                                     page_token)
    if format == "csv":
        return _csv(items, next_token)
    return AnswerPage(analysis_id=ident, items=items, next_page_token=next_token)


@router.get(
    "/{analysis_id}/answers.csv",
    response_class=Response,
    summary="Per-answer table as CSV",
    description=(
        "The page of `GET .../answers` as CSV (same filters and paging): one `confidence_<detector>` column per "
        "detector, `correct` as 1/0, `samples` and `meta` as JSON, and the next page's token in the "
        f"`{NEXT_PAGE_HEADER}` header."
    ),
    responses=csv_responses("One page of answers as CSV", headers={
        NEXT_PAGE_HEADER: {"description": "The token of the next page, when there is one", "schema": {"type": "string"}},
    }),
)
def list_answers_csv(
    analysis_id: str,
    stage: StageFilter = None,
    scope: ScopeFilter = None,
    split: SplitFilter = None,
    correct: CorrectFilter = None,
    page_size: PageSize = 100,
    page_token: PageToken = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Response:
    _, items, next_token = _page(session, principal, analysis_id, stage, scope, split, correct, page_size, page_token)
    return _csv(items, next_token)
