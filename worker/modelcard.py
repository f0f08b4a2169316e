"""Model cards: the provenance every model the service exports carries (a README.md with YAML front matter).

One function, `write_model_card(folder, ...)`, for every export path (the pruned model of the
`prune` stage; healed and patched models use it too). The card names the base model and its
revision, the analysis id and its spec, the removed or tuned layers, the per-layer scores, the
retained metrics with their 95% intervals and N, and the gate verdicts. It is written into the
exported folder before it is packed, so the card travels with the weights; the front matter is
the machine-readable copy (`layerscope:` block; `base_model`, `tags`, `library_name` as the
Hugging Face Hub reads them), the body the same for people.

A verdict is evaluated when the analysis succeeds, after its export was written: the card then
says the verdicts are pending and where they will be (`GET /v1/analyses/{id}/verdicts`, and the
version's `layerscope.gate.*` tags in MLflow); `write_model_card` called again with `verdicts`
(e.g. before `push_to_hub`) writes them in.

`push_to_hub(folder, repo_id, token=...)` uploads a folder with its card to the Hugging Face Hub.
It is off unless asked for, needs a token and network, and no test calls it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"


@dataclass
class Provenance:
    """Where an exported model comes from: the analysed base model and the analysis."""

    base_model: str
    revision: str | None = None
    source: str | None = None  # what the worker loaded, e.g. "hub:org/x@main", "mlflow:models:/m/3"
    analysis_id: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: Any, loaded: Any = None, analysis_id: str | None = None) -> Provenance:
        """From an `AnalysisSpec` (and the `LoadedModel`, for its source)."""
        model = spec.model
        return cls(
            base_model=model.mlflow or model.name, revision=model.revision,
            source=getattr(loaded, "source", None), analysis_id=analysis_id,
            spec=spec.model_dump(mode="json", exclude_none=True),
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metric(m: Any) -> dict[str, Any]:
    """A metric as the card stores it (a `MetricRow`, or a dict of the same fields)."""
    get = m.get if isinstance(m, Mapping) else lambda k, d=None: getattr(m, k, d)
    return {
        "stage": get("stage", None), "scope": get("scope", ""), "name": get("name"),
        "value": _finite(get("value")), "ci_low": _finite(get("ci_low", None)),
        "ci_high": _finite(get("ci_high", None)), "n": get("n", None),
    }


def _verdict(v: Mapping[str, Any]) -> dict[str, Any]:
    failing = [r["rule"] for r in v.get("rules", []) if not r.get("passed")]
    return {
        "policy": v.get("policy"), "policy_version": v.get("policy_version"),
        "verdict": v.get("verdict") or ("pass" if v.get("passed") else "fail"),
        "failing_rules": failing, "error": v.get("error"), "id": v.get("id"),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_model_card(
    folder: str | Path,
    provenance: Provenance,
    *,
    kind: str,
    removed_layers: Sequence[int] | None = None,
    tuned_layers: Sequence[int] | None = None,
    scores: Mapping[str, Mapping[int, float | None]] | None = None,
    metrics: Sequence[Any] = (),
    verdicts: Sequence[Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `folder/README.md` and return its path.

    `kind`: what the folder holds (`pruned`, `healed`, `patched`). `scores`: per scorer, layer ->
    score (higher = more important). `metrics`: the retained metrics, `MetricRow`s or dicts with
    stage, scope, name, value, ci_low, ci_high, n. `verdicts`: the gate verdicts as the API gives
    them (`VerdictOut` as a dict); None means not evaluated yet (pending). `extra`: more keys for
    the `layerscope` block (e.g. a healing recipe)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metric_rows = [_metric(m) for m in metrics]
    verdict_rows = [_verdict(v) for v in verdicts] if verdicts is not None else None
    block: dict[str, Any] = {
        "kind": kind,
        "base_model": provenance.base_model,
        "base_model_revision": provenance.revision,
        "base_model_source": provenance.source,
        "analysis_id": provenance.analysis_id,
        "spec": provenance.spec,
        "removed_layers": sorted(int(i) for i in removed_layers) if removed_layers is not None else None,
        "tuned_layers": sorted(int(i) for i in tuned_layers) if tuned_layers is not None else None,
        "scores": {k: {int(i): _finite(v) for i, v in sorted(t.items())} for k, t in (scores or {}).items()},
        "metrics": metric_rows,
        "gate_verdicts": verdict_rows if verdict_rows is not None else "pending",
    }
    block.update(dict(extra or {}))
    front: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["layerscope", kind],
        "base_model": provenance.base_model,
        "layerscope": block,
    }
    if provenance.revision:
        front["base_model_revision"] = provenance.revision
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {provenance.base_model}, {kind} by layerscope", ""]
    rev = f" (revision `{provenance.revision}`)" if provenance.revision else ""
    lines.append(f"Base model: `{provenance.base_model}`{rev}" + (f", loaded as `{provenance.source}`." if
                                                                 provenance.source else "."))
    if provenance.analysis_id:
        lines.append(f"Analysis: `{provenance.analysis_id}` (`GET /v1/analyses/{provenance.analysis_id}`); "
                     "its spec is in the front matter.")
    lines.append("")
    if removed_layers is not None:
        lines += [f"Removed layers: {', '.join(map(str, block['removed_layers'])) or 'none'}.", ""]
    if tuned_layers is not None:
        lines += [f"Tuned layers: {', '.join(map(str, block['tuned_layers'])) or 'none'}.", ""]
    if metric_rows:
        lines += ["| stage | scope | metric | value | 95% interval | N |", "|---|---|---|---|---|---|"]
        for m in metric_rows:
            ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]" if m["ci_low"] is not None else "–"
            lines.append(f"| {m['stage'] or ''} | {m['scope']} | {m['name']} | {_fmt(m['value'])} | {ci} | "
                         f"{_fmt(m['n'])} |")
        lines.append("")
    if block["scores"]:
        lines += ["Per-layer scores (higher = more important):", ""]
        for name, table in block["scores"].items():
            lines.append(f"- {name}: " + ", ".join(f"{i}: {_fmt(v)}" for i, v in table.items()))
        lines.append("")
    lines.append("## Gate verdicts")
    lines.append("")
    if verdict_rows is None:
        where = (f"`GET /v1/analyses/{provenance.analysis_id}/verdicts`" if provenance.analysis_id
                 else "the analysis's verdicts")
        lines.append(f"Pending when this model was exported: a verdict is evaluated when the analysis succeeds; see {where}"
                     " (and, for a registered model version, its `layerscope.gate.*` tags in MLflow).")
    elif not verdict_rows:
        lines.append("No gate policy was evaluated.")
    else:
        for v in verdict_rows:
            failing = "; ".join(v["failing_rules"]) or "none"
            lines.append(f"- {v['policy']}@{v['policy_version']}: **{v['verdict']}** (failing rules: {failing})")
    lines.append("")
    lines += [f"Note: {n}" for n in notes]
    path = folder / CARD_NAME
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def read_model_card(folder: str | Path) -> dict[str, Any]:
    """The front matter of `folder/README.md` (what `write_model_card` wrote)."""
    text = (Path(folder) / CARD_NAME).read_text()
    if not text.startswith("---\n"):
        raise ValueError("no front matter")
    end = text.index("\n---\n", 4)
    return dict(yaml.safe_load(text[4:end]) or {})


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = True) -> str:
    """Upload `folder` (weights and card) to the Hugging Face Hub; returns the commit URL.

    Off by default: nothing in the service calls it unless asked. Needs a token (argument or
    HF_TOKEN) and network; fails with the hub's error otherwise."""
    import os

    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face token (HF_TOKEN)")
    if not (Path(folder) / CARD_NAME).is_file():
        raise RuntimeError(f"{folder} has no {CARD_NAME}: write_model_card first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="layerscope export")
    return str(getattr(info, "commit_url", info))


def card_json(folder: str | Path) -> str:
    """The front matter as JSON (for logs and the registry)."""
    return json.dumps(read_model_card(folder), sort_keys=True, default=str)
