"""Gate verdicts as a service: find a policy, evaluate it on an analysis and store the
verdict (with its `gate.verdict` event, for an analysis of a registered model version its
registry update: `app/registry.py`, and the analysis's standalone model cards re-written with
it: `app/modelcard.py`). Shared by the gate routes (`app/api/gates.py`) and the worker, which
evaluates a spec's `gate_policy` when the job succeeds; the rule language itself is
`app/gates.py` (pure: nothing here writes through it).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.events import enqueue_event
from app.gates import LayerRecord, MetricRecord, RuleError, Snapshot, evaluate, parse_rules
from app.modelcard import is_card_artifact, parse_front_matter, render_model_card
from app.models import Analysis, AnalysisLabel, Artifact, GatePolicy, GateVerdict, LayerScore, Metric, utcnow
from app.registry import VERDICT, enqueue_update

log = logging.getLogger("layerscope.gates")


class RuleResultOut(BaseModel):
    rule: str
    source: str = Field(description="The path the rule read (aliases expanded).")
    op: str
    threshold: float | str
    observed: float | str | None = Field(description="null when the data is missing; the rule then fails.")
    ci_low: float | None
    ci_high: float | None
    n: int | None
    passed: bool
    reason: str | None


class VerdictOut(BaseModel):
    id: str
    analysis_id: str
    model: str
    labels: dict[str, str]
    policy: str
    policy_version: int | None
    passed: bool
    verdict: Literal["pass", "fail"]
    rules: list[RuleResultOut]
    error: str | None = Field(description="Why no rule could be evaluated (e.g. the spec named an unknown policy).")
    trigger: Literal["api", "spec"]
    created_at: dt.datetime
    links: dict[str, str]


def labels_for(session: Session, ids: list[str]) -> dict[str, dict[str, str]]:
    """Labels of each analysis id (every id present, possibly with none)."""
    out: dict[str, dict[str, str]] = {i: {} for i in ids}
    if ids:
        for lab in session.scalars(select(AnalysisLabel).where(AnalysisLabel.analysis_id.in_(ids))):
            out[lab.analysis_id][lab.key] = lab.value
    return out


def find_policy(session: Session, project: str, name: str, version: int | None = None) -> GatePolicy | None:
    query = select(GatePolicy).where(GatePolicy.project == project, GatePolicy.name == name)
    if version is not None:
        query = query.where(GatePolicy.version == version)
    return session.scalar(query.order_by(GatePolicy.version.desc()).limit(1))


def load_snapshot(session: Session, analysis: Analysis) -> Snapshot:
    metrics = [
        MetricRecord(m.stage, m.scope, m.name, m.value, m.ci_low, m.ci_high, m.n)
        for m in session.scalars(select(Metric).where(Metric.analysis_id == analysis.id))
    ]
    layers = [
        LayerRecord(r.stage, r.scorer, r.layer, r.values or {})
        for r in session.scalars(select(LayerScore).where(LayerScore.analysis_id == analysis.id))
    ]
    return Snapshot(metrics, layers, list(analysis.warnings or []), dict(analysis.summary or {}))


def verdict_out(row: GateVerdict, labels: dict[str, str]) -> VerdictOut:
    return VerdictOut(
        id=row.id, analysis_id=row.analysis_id, model=row.model_name, labels=labels, policy=row.policy_name,
        policy_version=row.policy_version, passed=row.passed, verdict="pass" if row.passed else "fail",
        rules=[RuleResultOut(**r) for r in row.results], error=row.error, trigger=row.trigger,  # type: ignore[arg-type]
        created_at=row.created_at,
        links={"self": f"/v1/gates/verdicts/{row.id}", "analysis": f"/v1/analyses/{row.analysis_id}"},
    )


def evaluate_and_store(
    session: Session,
    analysis: Analysis,
    policy_name: str,
    policy: GatePolicy | None,
    trigger: str,
    error: str | None = None,
) -> GateVerdict:
    """Evaluate, store the verdict and its `gate.verdict` event in the caller's transaction (not committed)."""
    passed, stored = False, []
    if policy is not None and error is None:
        try:
            rules = parse_rules(policy.rules)
        except RuleError as exc:  # stored under an older rule language
            error = f"policy {policy_name!r} version {policy.version} no longer parses: {exc}"
        else:
            try:
                passed, results = evaluate(rules, load_snapshot(session, analysis))
                stored = [r.as_dict() for r in results]
            except Exception as exc:  # a failing verdict that says why, rather than none
                log.exception("gate %s on %s could not be evaluated", policy_name, analysis.id)
                error = f"internal error evaluating the policy: {type(exc).__name__}: {exc}"
    else:
        passed, stored = False, []
        error = error or f"no gate policy {policy_name!r} in this project"
    row = GateVerdict(
        id=str(uuid.uuid4()), project=analysis.project, analysis_id=analysis.id, model_name=analysis.model_name,
        policy_name=policy_name, policy_version=policy.version if policy else None, passed=passed, results=stored,
        error=error, trigger=trigger, created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    out = verdict_out(row, labels_for(session, [analysis.id])[analysis.id])
    enqueue_event(session, analysis.project, "gate.verdict", out.model_dump(mode="json"), analysis_id=analysis.id)
    enqueue_update(session, analysis, VERDICT, verdict_id=row.id)  # tags (and an alias) on a registered version
    refresh_cards(session, analysis)
    return row


def _card_entry(row: GateVerdict) -> dict[str, Any]:
    return {
        "id": row.id, "policy": row.policy_name, "policy_version": row.policy_version, "passed": row.passed,
        "verdict": "pass" if row.passed else "fail", "rules": list(row.results or []), "error": row.error,
        "trigger": row.trigger, "created_at": row.created_at.isoformat() if row.created_at else None,
    }


def refresh_cards(session: Session, analysis: Analysis) -> list[str]:
    """Re-render the analysis's standalone model-card artifacts (`mitigation_card*.md`, `*.card.md`)
    with every verdict stored for it, in the caller's transaction; returns the names re-written.

    The card rows are locked first, so two verdicts stored at once re-write them one after the
    other, the second with both (a verdict is never left off). A card that cannot be re-written
    (no front matter, kept in the artifact store rather than its row) is left as it was with a
    logged warning: the verdict is stored either way."""
    markdown = list(session.scalars(
        select(Artifact)
        .where(Artifact.analysis_id == analysis.id, Artifact.name.endswith(".md", autoescape=True))
        .order_by(Artifact.name)
        .with_for_update()
    ))
    cards = [a for a in markdown if is_card_artifact(a.name)]
    if not cards:
        return []
    verdicts = [_card_entry(v) for v in session.scalars(
        select(GateVerdict).where(GateVerdict.analysis_id == analysis.id)
        .order_by(GateVerdict.created_at, GateVerdict.id)
    )]
    done = []
    for art in cards:
        try:
            if art.content is None:
                raise ValueError("it is kept in the artifact store, not in its row")
            old = bytes(art.content).decode("utf-8")
            front = parse_front_matter(old)
            if "notes" not in front["layerscope"]:  # written before the notes were in the front matter
                front["layerscope"]["notes"] = [line[6:] for line in old.splitlines() if line.startswith("Note: ")]
            text = render_model_card(front, verdicts)
        except Exception as exc:  # a card never costs a verdict
            log.warning("model card %s of analysis %s not re-written with its %d verdicts: %s",
                        art.name, analysis.id, len(verdicts), exc)
            continue
        data = text.encode("utf-8")
        art.content, art.size = data, len(data)
        done.append(art.name)
    return done


def split_policy_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name@version`, as a spec's `gate_policy` names it."""
    name, sep, version = ref.partition("@")
    return name, (int(version) if sep and version.isdigit() else None)
