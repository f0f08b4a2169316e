"""Gate policies (`/v1/gates`) and verdicts (`POST /v1/analyses/{id}/gate`).

A policy is a named, versioned list of rules (the language is in `app/gates.py`).
Saving a changed rule list adds a version; old versions stay, and every verdict
records the version it used. Evaluating and storing a verdict (and re-writing the
analysis's standalone model cards with it) is `app/verdicts.py`, shared with the worker,
which evaluates a spec's `gate_policy` when the job succeeds.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.analyses import decode_created_cursor, encode_created_cursor
from app.api.guard import GuardedRoute
from app.auth import Principal, require
from app.deps import get_session
from app.gates import RuleIndexError, parse_rules
from app.models import Analysis, AnalysisLabel, GatePolicy, GateVerdict, utcnow
from app.problems import Problem
from app.registry import RegistryActions
from app.schemas import JobState, Strict
from app.verdicts import VerdictOut, evaluate_and_store, find_policy, labels_for, verdict_out

PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/problem+json": {}}}
    for code, desc in {
        401: "Missing or invalid API key",
        403: "The key lacks the needed scope",
        404: "No such policy, verdict or analysis in this key's project",
        422: "Invalid request (the body names the field or the rule)",
        400: "The body could not be read (e.g. JSON that is not UTF-8)",
        413: "Request body over the size limit",
        429: "Rate limit of this API key exceeded (see Retry-After)",
        503: "Database unavailable",
    }.items()
}
router = APIRouter(tags=["gates"], responses=PROBLEMS, route_class=GuardedRoute)
log = logging.getLogger("layerscope.gates")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
RESERVED = {"verdicts"}
PolicyName = Annotated[str, Path(pattern=NAME_PATTERN, description="Policy name.")]

CONFLICT = {"description": "Conflict", "content": {"application/problem+json": {}}}


# ------------------------------------------------------------------ models


class PolicyBody(Strict):
    rules: list[Annotated[str, Field(max_length=500)]] = Field(
        min_length=1, max_length=100,
        description="Rules `<path> <op> <threshold>`, e.g. `retained_performance.perplexity >= 0.9`.",
        examples=[["retained_performance.perplexity >= 0.9", "hallucination.eavss_probe.ece <= 0.1",
                   "layers.avss.warnings == 0"]],
    )
    description: str | None = Field(None, max_length=2000)
    registry: RegistryActions | None = Field(
        None,
        description=(
            "For analyses of a registered model version (`registry.mlflow` in the spec): an alias each verdict "
            "moves, e.g. `{\"alias_on_pass\": \"champion\"}`. Every verdict sets `layerscope.*` tags either way."
        ),
    )

    def actions(self) -> dict[str, Any] | None:
        return self.registry.model_dump(exclude_none=True) or None if self.registry else None


class PolicyCreate(PolicyBody):
    name: str = Field(pattern=NAME_PATTERN, description="Unique in the project; `verdicts` is reserved.")


class PolicyOut(BaseModel):
    name: str
    version: int
    rules: list[str]
    description: str | None
    registry: dict[str, Any] | None = Field(None, description="The policy's registry actions (aliases it moves).")
    created_at: dt.datetime
    links: dict[str, str]


class VerdictPage(BaseModel):
    items: list[VerdictOut]
    next_page_token: str | None


# ------------------------------------------------------------------ output


def policy_out(row: GatePolicy) -> PolicyOut:
    return PolicyOut(
        name=row.name, version=row.version, rules=list(row.rules), description=row.description,
        registry=row.registry_actions, created_at=row.created_at,
        links={"self": f"/v1/gates/{row.name}?version={row.version}", "versions": f"/v1/gates/{row.name}/versions"},
    )


# ------------------------------------------------------------------ policies


def _parse_or_422(rules: list[str]) -> None:
    try:
        parse_rules(rules)
    except RuleIndexError as exc:
        raise Problem(
            422, f"Invalid rule {exc.text!r}: {exc.message}",
            errors=[{"field": f"rules.{exc.index}", "message": exc.message, "rule": exc.text}],
        ) from None


def _add_version(session: Session, project: str, name: str, body: PolicyBody) -> tuple[GatePolicy, bool]:
    """A new version unless the latest already has these rules; returns (row, created)."""
    for _ in range(3):
        latest = find_policy(session, project, name)
        if (latest is not None and latest.rules == body.rules and latest.description == body.description
                and latest.registry_actions == body.actions()):
            return latest, False
        row = GatePolicy(
            id=str(uuid.uuid4()), project=project, name=name, version=(latest.version + 1) if latest else 1,
            rules=list(body.rules), description=body.description, registry_actions=body.actions(), created_at=utcnow(),
        )
        session.add(row)
        try:
            session.commit()
            return row, True
        except IntegrityError:  # another writer took this version number: read again
            session.rollback()
    raise Problem(409, f"Policy {name!r} is being changed concurrently; retry.")


@router.post(
    "/v1/gates", status_code=201, response_model=PolicyOut, summary="Create a gate policy (version 1)",
    description="Rules are parsed now: a bad rule is 422 naming it. An existing name is 409; PUT adds a version.",
    responses={409: CONFLICT},
)
def create_policy(
    body: PolicyCreate,
    response: Response,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
) -> PolicyOut:
    if body.name in RESERVED:
        raise Problem(422, f"name: {body.name!r} is reserved", errors=[{"field": "name", "message": "reserved"}])
    _parse_or_422(body.rules)
    exists = Problem(409, f"Policy {body.name!r} exists; PUT /v1/gates/{body.name} adds a new version.")
    if find_policy(session, principal.project, body.name) is not None:
        raise exists
    row = GatePolicy(
        id=str(uuid.uuid4()), project=principal.project, name=body.name, version=1, rules=list(body.rules),
        description=body.description, registry_actions=body.actions(), created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        raise exists from None
    response.headers["Location"] = f"/v1/gates/{row.name}"
    return policy_out(row)


@router.put(
    "/v1/gates/{name}", status_code=201, response_model=PolicyOut, summary="Save a new version of a policy",
    description=(
        "Creates the policy (version 1) or its next version; old versions are kept. The same rules, "
        "description and registry actions as the latest version change nothing and answer 200 with it."
    ),
    responses={200: {"description": "Unchanged: the latest version", "model": PolicyOut}},
)
def put_policy(
    name: PolicyName,
    body: PolicyBody,
    response: Response,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
) -> PolicyOut:
    if name in RESERVED:
        raise Problem(422, f"name: {name!r} is reserved", errors=[{"field": "name", "message": "reserved"}])
    _parse_or_422(body.rules)
    row, created = _add_version(session, principal.project, name, body)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/gates/{row.name}?version={row.version}"
    return policy_out(row)


@router.get("/v1/gates", response_model=list[PolicyOut], summary="List policies (latest versions)")
def list_policies(
    principal: Principal = Depends(require("read")), session: Session = Depends(get_session)
) -> list[PolicyOut]:
    latest = (
        select(GatePolicy.name, func.max(GatePolicy.version).label("version"))
        .where(GatePolicy.project == principal.project)
        .group_by(GatePolicy.name)
        .subquery()
    )
    rows = session.scalars(
        select(GatePolicy)
        .join(latest, and_(GatePolicy.name == latest.c.name, GatePolicy.version == latest.c.version))
        .where(GatePolicy.project == principal.project)
        .order_by(GatePolicy.name)
    )
    return [policy_out(r) for r in rows]


def _page(session: Session, query: Any, page_size: int, page_token: str | None) -> VerdictPage:
    if page_token:
        created, ident = decode_created_cursor(page_token)
        query = query.where(
            or_(GateVerdict.created_at < created, and_(GateVerdict.created_at == created, GateVerdict.id < ident))
        )
    rows = list(session.scalars(query.order_by(GateVerdict.created_at.desc(), GateVerdict.id.desc())
                                .limit(page_size + 1)))
    more, rows = len(rows) > page_size, rows[:page_size]
    labels = labels_for(session, list({r.analysis_id for r in rows}))
    return VerdictPage(items=[verdict_out(r, labels[r.analysis_id]) for r in rows],
                       next_page_token=encode_created_cursor(rows[-1]) if more else None)


# Declared before /v1/gates/{name} so that `verdicts` is never read as a policy name.
@router.get(
    "/v1/gates/verdicts", response_model=VerdictPage, summary="List verdicts by model, label and policy",
    description="Newest first. `label=key=value` is repeatable (all must match the analysis's labels).",
)
def list_verdicts(
    model: Annotated[str | None, Query(max_length=512)] = None,
    label: Annotated[list[str] | None, Query(description="`key=value` (repeatable).")] = None,
    policy: Annotated[str | None, Query(max_length=128)] = None,
    passed: bool | None = None,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str | None, Query(max_length=512)] = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> VerdictPage:
    query = select(GateVerdict).where(GateVerdict.project == principal.project)
    if model:
        query = query.where(GateVerdict.model_name == model)
    if policy:
        query = query.where(GateVerdict.policy_name == policy)
    if passed is not None:
        query = query.where(GateVerdict.passed == passed)
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Problem(422, f"label filter {item!r} must look like key=value.",
                          errors=[{"field": "label", "message": "expected key=value"}])
        query = query.where(GateVerdict.analysis_id.in_(
            select(AnalysisLabel.analysis_id).where(AnalysisLabel.key == key, AnalysisLabel.value == value)
        ))
    return _page(session, query, page_size, page_token)


@router.get("/v1/gates/verdicts/{verdict_id}", response_model=VerdictOut, summary="Get a verdict")
def get_verdict(
    verdict_id: str, principal: Principal = Depends(require("read")), session: Session = Depends(get_session)
) -> VerdictOut:
    row = session.get(GateVerdict, verdict_id)
    if row is None or row.project != principal.project:
        raise Problem(404, f"No verdict {verdict_id!r} in this project.")
    return verdict_out(row, labels_for(session, [row.analysis_id])[row.analysis_id])


@router.get("/v1/gates/{name}", response_model=PolicyOut, summary="Get a policy (latest or `?version=`)")
def get_policy(
    name: PolicyName,
    version: Annotated[int | None, Query(ge=1)] = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> PolicyOut:
    row = find_policy(session, principal.project, name, version)
    if row is None:
        which = f" version {version}" if version else ""
        raise Problem(404, f"No gate policy {name!r}{which} in this project.")
    return policy_out(row)


@router.get("/v1/gates/{name}/versions", response_model=list[PolicyOut], summary="Every version of a policy")
def list_versions(
    name: PolicyName, principal: Principal = Depends(require("read")), session: Session = Depends(get_session)
) -> list[PolicyOut]:
    rows = list(session.scalars(
        select(GatePolicy).where(GatePolicy.project == principal.project, GatePolicy.name == name)
        .order_by(GatePolicy.version)
    ))
    if not rows:
        raise Problem(404, f"No gate policy {name!r} in this project.")
    return [policy_out(r) for r in rows]


# ------------------------------------------------------------------ verdicts on an analysis


def _owned_analysis(session: Session, principal: Principal, analysis_id: str) -> Analysis:
    row = session.get(Analysis, analysis_id)
    if row is None or row.project != principal.project:
        raise Problem(404, f"No analysis {analysis_id!r} in this project.")
    return row


@router.post(
    "/v1/analyses/{analysis_id}/gate", status_code=201, response_model=VerdictOut,
    summary="Evaluate a gate policy on an analysis",
    description=(
        "Evaluates the policy (latest version, or `version`) on the analysis's stored results and stores the "
        "verdict. Every rule is reported with its observed value, threshold and interval; a rule whose data is "
        "missing fails. The analysis must be SUCCEEDED (409 otherwise). The analysis's standalone model-card "
        "artifacts (`mitigation_card*.md`, `<export>.card.md`) are re-written with every verdict stored for it."
    ),
    tags=["gates"], responses={409: CONFLICT},
)
def gate_analysis(
    analysis_id: str,
    response: Response,
    policy: Annotated[str, Query(pattern=NAME_PATTERN, description="Policy name.")],
    version: Annotated[int | None, Query(ge=1)] = None,
    principal: Principal = Depends(require("submit")),
    session: Session = Depends(get_session),
) -> VerdictOut:
    analysis = _owned_analysis(session, principal, analysis_id)
    if analysis.state != JobState.SUCCEEDED.value:
        raise Problem(409, f"The analysis is {analysis.state}; a gate needs a SUCCEEDED analysis.",
                      state=analysis.state)
    row = find_policy(session, principal.project, policy, version)
    if row is None:
        which = f" version {version}" if version else ""
        raise Problem(404, f"No gate policy {policy!r}{which} in this project.")
    verdict = evaluate_and_store(session, analysis, policy, row, "api")
    session.commit()
    response.headers["Location"] = f"/v1/gates/verdicts/{verdict.id}"
    return verdict_out(verdict, labels_for(session, [analysis.id])[analysis.id])


@router.get(
    "/v1/analyses/{analysis_id}/verdicts", response_model=VerdictPage, summary="Gate verdicts of an analysis",
    tags=["gates"],
)
def analysis_verdicts(
    analysis_id: str,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str | None, Query(max_length=512)] = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> VerdictPage:
    analysis = _owned_analysis(session, principal, analysis_id)
    query = select(GateVerdict).where(GateVerdict.analysis_id == analysis.id)
    return _page(session, query, page_size, page_token)
