"""The analysis resource: submit, read, list, cancel, delete, and the result tables."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.guard import GuardedRoute
from app.api.precheck import check_submit
from app.artifact_store import StoreError, store_for
from app.auth import Principal, require
from app.config import Settings
from app.db import rowcount
from app.deps import get_session, get_settings_dep
from app.layervalues import typed
from app.models import Analysis, AnalysisLabel, Artifact, LayerScore, Metric, utcnow
from app.problems import Problem
from app.routing import route
from app.schemas import (
    PATCH_ARTIFACT,
    AnalysisOut,
    AnalysisPage,
    AnalysisSpec,
    ArtifactList,
    ArtifactOut,
    JobError,
    JobState,
    LayerRowOut,
    LayerTable,
    Leaderboard,
    MetricOut,
    MetricTable,
    PatchSpec,
    Progress,
    patch_artifact_method,
)
from app.verdicts import labels_for

log = logging.getLogger("layerscope.api")
router = APIRouter(prefix="/v1/analyses", tags=["analyses"], route_class=GuardedRoute)

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/problem+json": {}}}
    for code, desc in {
        401: "Missing or invalid API key",
        403: "The key lacks the needed scope",
        404: "No such analysis in this key's project",
        422: "Invalid request (the body names the field)",
        400: "The body could not be read (e.g. JSON that is not UTF-8)",
        413: "Request body over the size limit",
        429: "Rate limit of this API key exceeded (see Retry-After)",
        503: "Database unavailable",
    }.items()
}
FINISHED = [s.value for s in JobState if s.finished]

Format = Literal["json", "csv"]
T = TypeVar("T")


def spec_hash(spec: AnalysisSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


LIST_ROWS = 3  # inline dataset rows per spec in a list answer (`view=brief`)
FULL_VIEW_PAGE = 20  # most analyses per page with `view=full`


def brief_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The stored spec with each inline `rows` list (the dataset, the qa and perplexity datasets) cut to
    its first LIST_ROWS rows, and whether anything was cut. A list page carried 200 specs of up to
    8 MB each (31.7 MB measured); the single-analysis route and `view=full` give them whole."""
    cut = False

    def trim(dataset: Any) -> Any:
        nonlocal cut
        if isinstance(dataset, dict) and isinstance(dataset.get("rows"), list) and len(dataset["rows"]) > LIST_ROWS:
            cut = True
            return {**dataset, "rows": dataset["rows"][:LIST_ROWS]}
        return dataset

    out = {**spec, "dataset": trim(spec.get("dataset"))}
    stages = dict(spec.get("stages") or {})
    for stage, key in (("prune", "qa_dataset"), ("prune", "perplexity_dataset"), ("mitigate", "perplexity_dataset")):
        if isinstance(stages.get(stage), dict) and stages[stage].get(key) is not None:
            stages[stage] = {**stages[stage], key: trim(stages[stage][key])}
    out["stages"] = stages
    return out, cut


def to_out(row: Analysis, labels: dict[str, str], *, brief: bool = False) -> AnalysisOut:
    base = f"/v1/analyses/{row.id}"
    spec, cut = brief_spec(row.spec) if brief else (row.spec, False)
    return AnalysisOut(
        id=row.id,
        state=JobState(row.state),
        spec=AnalysisSpec.from_stored(spec),
        spec_rows_cut=cut,
        labels=labels,
        progress=Progress(stage=row.progress_stage, done=row.progress_done, total=row.progress_total),
        attempt=row.attempt,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        error=JobError(type=row.error_type, detail=row.error_detail or "") if row.error_type else None,
        warnings=list(row.warnings or []),
        summary=dict(row.summary or {}),
        links={
            "self": base,
            "layers": f"{base}/layers",
            "metrics": f"{base}/metrics",
            "artifacts": f"{base}/artifacts",
            "answers": f"{base}/answers",
            "leaderboard": f"{base}/leaderboard",
            "cancel": f"{base}/cancel",
        },
    )


def _get_owned(session: Session, principal: Principal, analysis_id: str) -> Analysis:
    row = session.get(Analysis, analysis_id)
    # Another project's analysis is indistinguishable from a missing one.
    if row is None or row.project != principal.project:
        raise Problem(404, f"No analysis {analysis_id!r} in this project.")
    return row


def _one_out(session: Session, row: Analysis) -> AnalysisOut:
    return to_out(row, labels_for(session, [row.id])[row.id])


@router.post(
    "",
    status_code=201,
    response_model=AnalysisOut,
    summary="Submit an analysis",
    description=(
        "Stores the job and queues it on the `cpu` or `gpu` worker queue (the decision and its reason are in "
        "`summary.routing`; see README, queue routing). Answers 201 with `Location`. With an `Idempotency-Key` header, "
        "a repeat of the same body returns the existing job with 200; the same key with another body is 422."
    ),
    responses={200: {"description": "Existing job for this Idempotency-Key", "model": AnalysisOut}, **PROBLEM_RESPONSES},
)
def submit_analysis(
    spec: AnalysisSpec,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255, min_length=1)] = None,
    principal: Principal = Depends(require("submit")),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings_dep),
) -> AnalysisOut:
    if spec.model.trust_remote_code and spec.model.name not in settings.trust_remote_code_allowlist:
        raise Problem(
            422,
            f"model.trust_remote_code: {spec.model.name!r} is not on this server's trust_remote_code "
            "allow-list (LAYERSCOPE_TRUST_REMOTE_CODE_ALLOWLIST); running its code is refused.",
            errors=[{"field": "model.trust_remote_code", "message": "not allow-listed"}],
        )
    if spec.model.patch is not None and spec.model.patch.analysis_id is not None:
        _check_patch_source(session, principal, spec.model.patch)
    check_submit(spec, settings)
    digest = spec_hash(spec)
    routing = route(spec.model, settings)

    def existing_for_key() -> AnalysisOut | None:
        row = session.scalar(
            select(Analysis).where(Analysis.project == principal.project, Analysis.idempotency_key == idempotency_key)
        )
        if row is None:
            return None
        if row.spec_hash != digest:
            raise Problem(
                422,
                "This Idempotency-Key was already used with a different body; use a new key for a new job.",
                errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}],
            )
        response.status_code = 200
        response.headers["Location"] = f"/v1/analyses/{row.id}"
        return _one_out(session, row)

    if idempotency_key and (found := existing_for_key()):
        return found

    row = Analysis(
        id=str(uuid.uuid4()),
        project=principal.project,
        state=JobState.QUEUED.value,
        spec=spec.model_dump(mode="json"),
        spec_hash=digest,
        idempotency_key=idempotency_key,
        model_name=spec.model.name,
        progress_done=0,
        progress_total=0,
        attempt=0,
        warnings=[],
        summary={"routing": routing.as_summary()},
        created_at=utcnow(),
        # Marked sent in the insert's commit, before the send: a NULL here is what the sweeper
        # sends, and one committed NULL raced the sweeper into a second message for the job.
        enqueued_at=utcnow(),
    )
    session.add(row)
    session.add_all(AnalysisLabel(analysis_id=row.id, key=k, value=v) for k, v in spec.labels.items())
    try:
        session.commit()
    except IntegrityError:
        # Lost a race with the same Idempotency-Key: the unique constraint decides.
        session.rollback()
        if idempotency_key and (found := existing_for_key()):
            return found
        raise

    if not request.app.state.enqueuer.enqueue(row.id, routing.queue):
        # Broker down: the sweeper sends it at once; a crash before this line leaves the mark,
        # and the sweeper re-sends after requeue_after.
        session.execute(update(Analysis).where(Analysis.id == row.id).values(enqueued_at=None))
        session.commit()
    response.headers["Location"] = f"/v1/analyses/{row.id}"
    return _one_out(session, row)


def _check_patch_source(session: Session, principal: Principal, patch: PatchSpec) -> None:
    """`model.patch.analysis_id` must name a succeeded analysis of this project with a patch
    (of `model.patch.method` when its mitigate stage compared several)."""
    analysis_id, method = patch.analysis_id, patch.method
    field = "model.patch.analysis_id"
    source = session.get(Analysis, analysis_id)
    if source is None or source.project != principal.project:
        raise Problem(422, f"{field}: no analysis {analysis_id!r} in this project.",
                      errors=[{"field": field, "message": "not found"}])
    patches = set(session.scalars(
        select(Artifact.name).where(Artifact.analysis_id == analysis_id, Artifact.name.like("mitigation%.safetensors"))
    ))
    per_method = sorted(m for n in patches if (m := patch_artifact_method(n)) is not None)
    wanted = set(patch.artifact_names())
    if source.state == JobState.SUCCEEDED.value and not wanted & patches and per_method:
        mfield = "model.patch.method"
        raise Problem(
            422,
            f"{mfield}: analysis {analysis_id} compared several mitigation methods; "
            + (f"it has no patch of {method!r}; " if method else "")
            + f"name one of {per_method} in {mfield}.",
            errors=[{"field": mfield, "message": f"one of {per_method}"}],
        )
    if source.state != JobState.SUCCEEDED.value or not wanted & patches:
        raise Problem(
            422,
            f"{field}: analysis {analysis_id} ({source.state}) has no {PATCH_ARTIFACT}; a patch comes from a "
            "succeeded analysis with a mitigate stage.",
            errors=[{"field": field, "message": "no mitigation patch"}],
        )


def encode_cursor(values: Sequence[Any]) -> str:
    """An opaque `page_token`: the sort key of the last row of a page (JSON, base64url)."""
    raw = json.dumps(list(values)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, parse: Callable[[list[Any]], T]) -> T:
    """The sort key of an `encode_cursor` token, checked by `parse` (which raises on anything
    unexpected); a token this API did not issue is a 422 naming `page_token`."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values = json.loads(raw)
        if not isinstance(values, list):
            raise ValueError("not a list")
        return parse(values)
    except Exception:
        raise Problem(
            422, "page_token is not a token this API issued; start again without it.",
            errors=[{"field": "page_token", "message": "invalid"}],
        ) from None


def encode_created_cursor(row: Any) -> str:
    """The page token after `row` of a list ordered by (created_at, id), newest first."""
    return encode_cursor([row.created_at.isoformat(), row.id])


def _parse_created_cursor(values: list[Any]) -> tuple[dt.datetime, str]:
    created, ident = values
    if not (isinstance(created, str) and isinstance(ident, str)) or "\x00" in ident:
        raise ValueError("not a (created_at, id) cursor")
    return dt.datetime.fromisoformat(created), ident


def decode_created_cursor(token: str) -> tuple[dt.datetime, str]:
    """(created_at, id) of an `encode_created_cursor` token; a 422 Problem for anything else."""
    return decode_cursor(token, _parse_created_cursor)


@router.get(
    "", response_model=AnalysisPage, summary="List analyses", responses=PROBLEM_RESPONSES,
    description=(
        f"Newest first. With `view=brief` (the default) each spec's inline dataset rows are cut to the first "
        f"{LIST_ROWS} (`spec_rows_cut` says so); `GET /v1/analyses/{{id}}` or `view=full` (at most "
        f"{FULL_VIEW_PAGE} per page) gives them whole."
    ),
)
def list_analyses(
    request: Request,
    state: Annotated[list[JobState] | None, Query(description="Filter by state (repeatable).")] = None,
    model: Annotated[str | None, Query(max_length=512, description="Filter by model name.")] = None,
    label: Annotated[
        list[str] | None, Query(description="Filter by label `key=value` (repeatable, all must match).")
    ] = None,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    page_token: Annotated[str | None, Query(max_length=512)] = None,
    view: Annotated[
        Literal["brief", "full"],
        Query(description=f"`brief`: inline dataset rows cut to {LIST_ROWS} per spec; `full`: whole specs, "
              f"at most {FULL_VIEW_PAGE} per page (a larger page_size gives {FULL_VIEW_PAGE} and a next_page_token)."),
    ] = "brief",
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> AnalysisPage:
    if view == "full":  # whole specs (each up to the body limit): fewer per page, the rest on the next
        page_size = min(page_size, FULL_VIEW_PAGE)
    query = select(Analysis).where(Analysis.project == principal.project)
    if state:
        query = query.where(Analysis.state.in_([s.value for s in state]))
    if model:
        query = query.where(Analysis.model_name == model)
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Problem(422, f"label filter {item!r} must look like key=value.",
                          errors=[{"field": "label", "message": "expected key=value"}])
        query = query.where(
            Analysis.id.in_(select(AnalysisLabel.analysis_id).where(AnalysisLabel.key == key, AnalysisLabel.value == value))
        )
    if page_token:
        created, ident = decode_created_cursor(page_token)
        query = query.where(
            or_(Analysis.created_at < created, and_(Analysis.created_at == created, Analysis.id < ident))
        )
    rows = list(session.scalars(query.order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(page_size + 1)))
    more = len(rows) > page_size
    rows = rows[:page_size]
    labels = labels_for(session, [r.id for r in rows])
    return AnalysisPage(
        items=[to_out(r, labels[r.id], brief=view == "brief") for r in rows],
        next_page_token=encode_created_cursor(rows[-1]) if more else None,
    )


@router.get("/{analysis_id}", response_model=AnalysisOut, summary="Get an analysis", responses=PROBLEM_RESPONSES)
def get_analysis(
    analysis_id: str,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> AnalysisOut:
    # The status poll, the hottest route: the row and its labels in one query, without ORM objects.
    rows = session.execute(
        select(Analysis.__table__, AnalysisLabel.key.label("label_key"), AnalysisLabel.value.label("label_value"))
        .outerjoin(AnalysisLabel, AnalysisLabel.analysis_id == Analysis.id)
        .where(Analysis.id == analysis_id, Analysis.project == principal.project)
    ).all()
    if not rows:  # another project's analysis is indistinguishable from a missing one
        raise Problem(404, f"No analysis {analysis_id!r} in this project.")
    return to_out(rows[0], {r.label_key: r.label_value for r in rows if r.label_key is not None})  # type: ignore[arg-type]


@router.post(
    "/{analysis_id}/cancel",
    response_model=AnalysisOut,
    status_code=202,
    summary="Cancel an analysis",
    description=(
        "A queued job ends CANCELLED at once; a running one goes to CANCELLING and its worker stops "
        "between batches. Cancelling a finished job is 409."
    ),
    responses={409: {"description": "Already finished", "content": {"application/problem+json": {}}}, **PROBLEM_RESPONSES},
)
def cancel_analysis(
    analysis_id: str,
    principal: Principal = Depends(require("submit")),
    session: Session = Depends(get_session),
) -> AnalysisOut:
    row = _get_owned(session, principal, analysis_id)
    now = utcnow()
    # Conditional updates: a worker may claim the job between our read and our write.
    done = rowcount(session.execute(
        update(Analysis)
        .where(Analysis.id == row.id, Analysis.state == JobState.QUEUED.value)
        .values(state=JobState.CANCELLED.value, finished_at=now)
    ))
    if not done:
        session.execute(
            update(Analysis)
            .where(Analysis.id == row.id, Analysis.state == JobState.RUNNING.value)
            .values(state=JobState.CANCELLING.value)
        )
    session.commit()
    session.refresh(row)
    if row.state in FINISHED and row.state != JobState.CANCELLED.value:
        raise Problem(409, f"The analysis already ended {row.state}; there is nothing to cancel.")
    return _one_out(session, row)


@router.delete(
    "/{analysis_id}",
    status_code=204,
    summary="Delete a finished analysis and its results",
    responses={409: {"description": "Not finished yet", "content": {"application/problem+json": {}}}, **PROBLEM_RESPONSES},
)
def delete_analysis(
    analysis_id: str,
    principal: Principal = Depends(require("submit")),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    row = _get_owned(session, principal, analysis_id)
    paths = [p for p in session.scalars(select(Artifact.path).where(Artifact.analysis_id == row.id)) if p]
    deleted = rowcount(session.execute(
        delete(Analysis).where(Analysis.id == row.id, Analysis.state.in_(FINISHED))
    ))
    if not deleted:
        session.rollback()
        raise Problem(409, f"The analysis is {row.state}; cancel it and wait for it to end before deleting.")
    session.commit()
    store = store_for(settings)
    for key in paths:
        try:
            store.delete(key)
        except StoreError as exc:  # the analysis is gone; a leftover object is only space
            log.warning("artifact %s not deleted from the store: %s", key, exc)
    return Response(status_code=204)


def _csv_response(header: list[str], rows: list[list[Any]]) -> Response:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else int(v) if isinstance(v, bool) else v for v in r] for r in rows)
    return Response(buf.getvalue(), media_type="text/csv")


def csv_responses(description: str, headers: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """The responses of a CSV operation: 200 is `text/csv` text (a generated client returns it as a
    string), errors are problem+json as everywhere."""
    ok: dict[str, Any] = {"description": description, "content": {"text/csv": {"schema": {"type": "string"}}}}
    if headers:
        ok["headers"] = headers
    return {200: ok, **PROBLEM_RESPONSES}


# `?format=csv` on a JSON route still answers CSV (curl, pandas, the dashboard's links) but is not
# in the OpenAPI document: a client generated from it would parse the CSV as JSON. The `.csv`
# operations are the documented way.
FormatQuery = Annotated[Format, Query(include_in_schema=False)]


def _layer_items(
    session: Session, principal: Principal, analysis_id: str, stage: str | None, scorer: str | None
) -> tuple[Analysis, list[LayerRowOut]]:
    row = _get_owned(session, principal, analysis_id)
    query = select(LayerScore).where(LayerScore.analysis_id == row.id)
    if stage:
        query = query.where(LayerScore.stage == stage)
    if scorer:
        query = query.where(LayerScore.scorer == scorer)
    rows = list(session.scalars(query.order_by(LayerScore.stage, LayerScore.scorer, LayerScore.layer)))
    return row, [
        LayerRowOut(stage=r.stage, scorer=r.scorer, layer=r.layer, block_name=r.block_name, values=typed(r.values or {}))
        for r in rows
    ]


def _layers_csv(items: list[LayerRowOut]) -> Response:
    keys = sorted({k for r in items for k in r.values})
    return _csv_response(
        ["stage", "scorer", "layer", "block_name", *keys],
        [[r.stage, r.scorer, r.layer, r.block_name, *(r.values.get(k) for k in keys)] for r in items],
    )


@router.get(
    "/{analysis_id}/leaderboard",
    response_model=Leaderboard,
    summary="Hallucination detectors ranked, with reference rows",
    description="Every detector of the hallucination stage sorted by test AUROC, with AUROC, ECE, Brier, acc@q and "
    "cov@p (bootstrap 95% intervals, N), and each one's AUROC difference (paired interval) against the length-only "
    "baseline and the best toolkit estimator. 404 when the analysis has no finished hallucination stage with a "
    "leaderboard.",
    responses=PROBLEM_RESPONSES,
)
def get_leaderboard(
    analysis_id: str,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Any:
    row = _get_owned(session, principal, analysis_id)
    stage = (row.summary or {}).get("hallucination")
    board = stage.get("leaderboard") if isinstance(stage, dict) else None
    if not isinstance(board, dict):
        raise Problem(404, f"Analysis {analysis_id!r} has no detector leaderboard: no finished hallucination stage "
                      "(or one from before leaderboards were kept).")
    return Leaderboard.model_validate({**board, "analysis_id": row.id})


StageQuery = Annotated[str | None, Query(max_length=32, description="Only this stage's rows.")]
ScorerQuery = Annotated[str | None, Query(max_length=64, description="Only this scorer's rows.")]


@router.get(
    "/{analysis_id}/layers",
    response_model=LayerTable,
    summary="Per-layer statistics and scores",
    description="One row per (stage, scorer, layer). The same table as CSV: `GET .../layers.csv`.",
    responses=PROBLEM_RESPONSES,
)
def get_layers(
    analysis_id: str,
    stage: StageQuery = None,
    scorer: ScorerQuery = None,
    format: FormatQuery = "json",
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Any:
    row, items = _layer_items(session, principal, analysis_id, stage, scorer)
    if format == "csv":
        return _layers_csv(items)
    return LayerTable(analysis_id=row.id, items=items)


@router.get(
    "/{analysis_id}/layers.csv",
    response_class=Response,
    summary="Per-layer statistics and scores as CSV",
    description="The rows of `GET .../layers` as CSV: one column per value, flags as 1/0, empty where null.",
    responses=csv_responses("The per-layer table as CSV"),
)
def get_layers_csv(
    analysis_id: str,
    stage: StageQuery = None,
    scorer: ScorerQuery = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Response:
    return _layers_csv(_layer_items(session, principal, analysis_id, stage, scorer)[1])


METRIC_COLUMNS = ["stage", "scope", "name", "value", "ci_low", "ci_high", "n"]


def _metric_items(
    session: Session, principal: Principal, analysis_id: str, stage: str | None
) -> tuple[Analysis, list[MetricOut]]:
    row = _get_owned(session, principal, analysis_id)
    query = select(Metric).where(Metric.analysis_id == row.id)
    if stage:
        query = query.where(Metric.stage == stage)
    return row, [
        MetricOut(stage=m.stage, scope=m.scope, name=m.name, value=m.value, ci_low=m.ci_low, ci_high=m.ci_high, n=m.n)
        for m in session.scalars(query.order_by(Metric.stage, Metric.scope, Metric.name))
    ]


def _metrics_csv(items: list[MetricOut]) -> Response:
    return _csv_response(METRIC_COLUMNS, [[getattr(m, c) for c in METRIC_COLUMNS] for m in items])


@router.get(
    "/{analysis_id}/metrics",
    response_model=MetricTable,
    summary="Evaluation metrics with confidence intervals",
    description="The same table as CSV: `GET .../metrics.csv`.",
    responses=PROBLEM_RESPONSES,
)
def get_metrics(
    analysis_id: str,
    stage: StageQuery = None,
    format: FormatQuery = "json",
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Any:
    row, items = _metric_items(session, principal, analysis_id, stage)
    if format == "csv":
        return _metrics_csv(items)
    return MetricTable(analysis_id=row.id, items=items)


@router.get(
    "/{analysis_id}/metrics.csv",
    response_class=Response,
    summary="Evaluation metrics as CSV",
    description=f"The rows of `GET .../metrics` as CSV, columns {', '.join(METRIC_COLUMNS)}.",
    responses=csv_responses("The metrics table as CSV"),
)
def get_metrics_csv(
    analysis_id: str,
    stage: StageQuery = None,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> Response:
    return _metrics_csv(_metric_items(session, principal, analysis_id, stage)[1])


@router.get(
    "/{analysis_id}/artifacts", response_model=ArtifactList, summary="Files the analysis produced",
    responses=PROBLEM_RESPONSES,
)
def list_artifacts(
    analysis_id: str,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
) -> ArtifactList:
    row = _get_owned(session, principal, analysis_id)
    arts = session.execute(
        select(Artifact.name, Artifact.stage, Artifact.media_type, Artifact.size, Artifact.created_at)
        .where(Artifact.analysis_id == row.id)
        .order_by(Artifact.name)
    ).all()
    return ArtifactList(
        analysis_id=row.id,
        items=[
            ArtifactOut(
                name=a.name, stage=a.stage, media_type=a.media_type, size=a.size, created_at=a.created_at,
                download_url=f"/v1/analyses/{row.id}/artifacts/{a.name}",
            )
            for a in arts
        ],
    )


@router.get(
    "/{analysis_id}/artifacts/{name}",
    summary="Download an artifact",
    description="Small artifacts come from the database, large ones (over 16 MB) stream from the artifact "
    "store (LAYERSCOPE_ARTIFACT_STORE: a shared directory or S3).",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        **PROBLEM_RESPONSES,
        503: {"description": "Database or artifact store unavailable", "content": {"application/problem+json": {}}},
    },
)
def download_artifact(
    analysis_id: str,
    name: str,
    principal: Principal = Depends(require("read")),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings_dep),
) -> Response:
    row = _get_owned(session, principal, analysis_id)
    art = session.get(Artifact, (row.id, name))
    if art is None:
        raise Problem(404, f"No artifact {name!r} in analysis {row.id}.")
    headers = {"Content-Disposition": f'attachment; filename="{Path(name).name}"'}
    if art.content is not None:
        return Response(art.content, media_type=art.media_type, headers=headers)
    store = store_for(settings)
    path = store.local_path(art.path or "")
    if path is not None:
        return FileResponse(path, media_type=art.media_type, filename=Path(name).name)
    try:
        chunks = store.chunks(art.path) if art.path else None
    except StoreError as exc:
        log.warning("artifact %s/%s: %s", row.id, name, exc)
        raise Problem(503, "The artifact store is unreachable; try again later.") from None
    if chunks is None:
        raise Problem(404, f"Artifact {name!r} is recorded but its file is gone from the artifact store.")
    return StreamingResponse(chunks, media_type=art.media_type, headers={**headers, "Content-Length": str(art.size)})
