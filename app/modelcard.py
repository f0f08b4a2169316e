"""Model cards, the pure part: render a card (a README.md with YAML front matter) from its front
matter and the gate verdicts, and read the front matter back. No torch and no worker here: the
worker writes cards into its exports (`worker/modelcard.py`), and whoever stores a verdict, the
API's gate route or the worker at the end of a job (`app/verdicts.py`), re-renders the analysis's
standalone card artifacts with it.

A card's body is a function of its front matter alone (`render_model_card`), so a stored card is
re-written from what it says, with only its `layerscope.gate_verdicts` replaced. The standalone
card artifacts are `mitigation_card.md` (the mitigate stage's patch; `mitigation_card-<method>.md`
per method when it compared several) and `<export>.card.md` next to each exported archive
(`pruned-model-avss.card.md` beside `pruned-model-avss.tar.gz`); the card packed inside an archive
is written once, before the verdicts exist, and names its standalone card
(`layerscope.card_artifact`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CARD_NAME = "README.md"  # the card's file name inside an exported folder
PATCH_CARD = "mitigation_card.md"  # the mitigate stage's card (the patch has no folder of its own);
# `mitigation_card-<method>.md` per method when the analysis compared several
CARD_SUFFIX = ".card.md"  # the standalone card of an exported archive: `<archive stem>.card.md`
PENDING = "pending"


def card_artifact_name(export: str) -> str:
    """The standalone card artifact of export artifact `export` (`x.tar.gz` -> `x.card.md`)."""
    for ext in (".tar.gz", ".tgz", ".tar", ".zip", ".safetensors"):
        if export.endswith(ext):
            return export[: -len(ext)] + CARD_SUFFIX
    return export + CARD_SUFFIX


def is_card_artifact(name: str) -> bool:
    """Whether artifact `name` is a standalone model card (re-written with each verdict)."""
    return name.endswith(CARD_SUFFIX) or (name.startswith(PATCH_CARD.removesuffix(".md")) and name.endswith(".md"))


def verdict_entry(v: Mapping[str, Any]) -> dict[str, Any]:
    """A verdict as a card stores it, from the API's `VerdictOut` (as a dict) or from a card's own
    entry (idempotent): policy, version, pass/fail, the failing rules, error, id, trigger, time."""
    if "failing_rules" in v:
        failing = [str(r) for r in v.get("failing_rules") or []]
    else:
        failing = [str(r["rule"]) for r in v.get("rules") or [] if not r.get("passed")]
    created = v.get("created_at")
    return {
        "policy": v.get("policy"), "policy_version": v.get("policy_version"),
        "verdict": v.get("verdict") or ("pass" if v.get("passed") else "fail"),
        "failing_rules": failing, "error": v.get("error"), "id": v.get("id"),
        "trigger": v.get("trigger"),
        "created_at": created.isoformat() if isinstance(created, dt.datetime) else created,
    }


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def parse_front_matter(text: str) -> dict[str, Any]:
    """The front matter of a card's text; ValueError when it has none."""
    if not text.startswith("---\n"):
        raise ValueError("no front matter")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("the front matter does not end")
    front = yaml.safe_load(text[4:end])
    if not isinstance(front, dict) or not isinstance(front.get("layerscope"), dict):
        raise ValueError("no layerscope block in the front matter")
    return front


def _pending(block: Mapping[str, Any]) -> str:
    aid = block.get("analysis_id")
    where = f"`GET /v1/analyses/{aid}/verdicts`" if aid else "the analysis's verdicts"
    policy = (block.get("spec") or {}).get("gate_policy")
    if policy:
        text = (f"Pending when this model was exported: the spec's gate policy `{policy}` is evaluated when the "
                "analysis succeeds")
    else:
        text = ("None when this model was exported: the spec names no gate policy (one can be evaluated later, "
                f"`POST /v1/analyses/{aid or '{id}'}/gate`)")
    text += (f"; see {where} (and, for a registered model version, its `layerscope.gate.*` tags in MLflow).")
    card = block.get("card_artifact")
    if card:
        text += (f" The service writes every verdict into this analysis's artifact `{card}`"
                 + (f" (`GET /v1/analyses/{aid}/artifacts/{card}`)" if aid else "")
                 + "; a card packed inside an exported archive keeps this text.")
    return text


def render_model_card(front: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The card's text (front matter and body) from its front matter; `verdicts` (as the API gives
    them, or card entries), when given, replace `layerscope.gate_verdicts`. Pure: the same front
    matter and verdicts give the same text, and rendering a rendered card's front matter again
    gives it back."""
    front = dict(front)
    block: dict[str, Any] = dict(front.get("layerscope") or {})
    if verdicts is not None:
        block["gate_verdicts"] = [verdict_entry(v) for v in verdicts]
    front["layerscope"] = block
    kind = block.get("kind")
    base = block.get("base_model") or front.get("base_model")
    revision, source, aid = block.get("base_model_revision"), block.get("base_model_source"), block.get("analysis_id")
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {base}, {kind} by layerscope", ""]
    rev = f" (revision `{revision}`)" if revision else ""
    lines.append(f"Base model: `{base}`{rev}" + (f", loaded as `{source}`." if source else "."))
    if aid:
        lines.append(f"Analysis: `{aid}` (`GET /v1/analyses/{aid}`); its spec is in the front matter.")
    lines.append("")
    if block.get("removed_layers") is not None:
        lines += [f"Removed layers: {', '.join(map(str, block['removed_layers'])) or 'none'}.", ""]
    if block.get("tuned_layers") is not None:
        lines += [f"Tuned layers: {', '.join(map(str, block['tuned_layers'])) or 'none'}.", ""]
    metrics = block.get("metrics") or []
    if metrics:
        lines += ["| stage | scope | metric | value | 95% interval | N |", "|---|---|---|---|---|---|"]
        for m in metrics:
            ci = f"[{fmt(m.get('ci_low'))}, {fmt(m.get('ci_high'))}]" if m.get("ci_low") is not None else "–"
            lines.append(f"| {m.get('stage') or ''} | {m.get('scope', '')} | {m.get('name')} | {fmt(m.get('value'))} "
                         f"| {ci} | {fmt(m.get('n'))} |")
        lines.append("")
    scores = block.get("scores") or {}
    if scores:
        lines += ["Per-layer scores (higher = more important):", ""]
        for name, table in scores.items():
            lines.append(f"- {name}: " + ", ".join(f"{i}: {fmt(v)}" for i, v in table.items()))
        lines.append("")
    lines += ["## Gate verdicts", ""]
    rows = block.get("gate_verdicts", PENDING)
    if not isinstance(rows, list):
        lines.append(_pending(block))
    elif not rows:
        lines.append("No gate policy was evaluated.")
    else:
        for v in rows:
            failing = "; ".join(v.get("failing_rules") or []) or "none"
            line = f"- {v.get('policy')}@{v.get('policy_version')}: **{v.get('verdict')}** (failing rules: {failing})"
            if v.get("error"):
                line += f"; error: {v['error']}"
            if v.get("id"):
                line += f"; verdict `{v['id']}`" + (f" ({v['trigger']}, {v['created_at']})" if v.get("trigger") else "")
            lines.append(line)
        if aid:
            lines += ["", f"Every verdict stored for the analysis when this card was written; the current list is "
                          f"`GET /v1/analyses/{aid}/verdicts`."]
    lines.append("")
    lines += [f"Note: {n}" for n in block.get("notes") or []]
    return "\n".join(lines).rstrip() + "\n"
