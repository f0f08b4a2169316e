"""Model cards: the provenance every model the service exports carries (a README.md with YAML front matter).

One function, `write_model_card(folder, ...)`, for every export path (the pruned model of the
`prune` stage; healed and patched models use it too). The card names the base model and its
revision, the analysis id and its spec, the removed or tuned layers, the per-layer scores, the
retained metrics with their 95% intervals and N, and the gate verdicts. It is written into the
exported folder before it is packed, so the card travels with the weights; the front matter is
the machine-readable copy (`layerscope:` block; `base_model`, `tags`, `library_name` as the
Hugging Face Hub reads them), the body the same for people.

A verdict is stored after the export was written: when the analysis succeeds (the spec's
`gate_policy`) or later (`POST /v1/analyses/{id}/gate`, as often as asked). So each export also
gets a standalone card artifact with the same text: `<archive stem>.card.md` beside the archive
(`pruned-model-avss.card.md` beside `pruned-model-avss.tar.gz`, `healed-model-avss.card.md`),
and the patch's card is the artifact `mitigation_card.md` (`mitigation_card-<method>.md` per
method when the analysis compared several). Every time a verdict is stored
(`app.verdicts.evaluate_and_store`, in the transaction that stores it) each standalone card of
the analysis is re-rendered from its own front matter with every verdict stored for the analysis
so far (`app.modelcard.render_model_card`, pure). The card packed inside an archive is never
re-packed (archives can be GBs): it keeps saying the verdicts are pending and names where they
are (`layerscope.card_artifact`, `GET /v1/analyses/{id}/verdicts`, the version's
`layerscope.gate.*` tags in MLflow). `write_model_card` called again with `verdicts` (e.g. on an
extracted folder before `push_to_hub`) writes them in.

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

from app.modelcard import (
    CARD_NAME,
    PENDING,
    card_artifact_name,
    parse_front_matter,
    render_model_card,
    verdict_entry,
)
from app.schemas import HubPush
from worker.stage import ArtifactFile


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
    card_artifact: str | None = None,
) -> Path:
    """Write `folder/README.md` and return its path.

    `kind`: what the folder holds (`pruned`, `healed`, `patched`). `scores`: per scorer, layer ->
    score (higher = more important). `metrics`: the retained metrics, `MetricRow`s or dicts with
    stage, scope, name, value, ci_low, ci_high, n. `verdicts`: the gate verdicts as the API gives
    them (`VerdictOut` as a dict); None means not evaluated yet (pending). `extra`: more keys for
    the `layerscope` block (e.g. a healing recipe). `card_artifact`: the analysis's standalone card
    artifact that the verdicts are written into once evaluated (`app.modelcard.card_artifact_name`
    of the export; `mitigation_card.md` for a patch); the card names it. The text is
    `app.modelcard.render_model_card` of the front matter."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metric_rows = [_metric(m) for m in metrics]
    verdict_rows = [verdict_entry(v) for v in verdicts] if verdicts is not None else None
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
        "gate_verdicts": verdict_rows if verdict_rows is not None else PENDING,
        "card_artifact": card_artifact,
        "notes": list(notes),
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
    path = folder / CARD_NAME
    path.write_text(render_model_card(front))
    return path


def read_model_card(folder: str | Path) -> dict[str, Any]:
    """The front matter of `folder/README.md` (what `write_model_card` wrote)."""
    return parse_front_matter((Path(folder) / CARD_NAME).read_text())


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


def push_export(folder: str | Path, push: HubPush, warnings: list[str]) -> str | None:
    """`push_to_hub` for a stage's export (`prune.push_to_hub`, `prune.heal.push_to_hub`): the
    commit URL, or None with the reason in `warnings` (no token, no network, the hub refused);
    an upload never fails the analysis that made the model."""
    try:
        return push_to_hub(folder, push.repo_id, private=push.private)
    except Exception as exc:  # noqa: BLE001 - any hub failure is a warning, never a lost analysis
        warnings.append(f"push_to_hub to {push.repo_id} skipped: {type(exc).__name__}: {exc}")
        return None


def write_export_card(
    folder: str | Path, provenance: Provenance, archive: str, push: HubPush | None, warnings: list[str],
    **card: Any,
) -> ArtifactFile:
    """The card of an exported folder about to be packed as `archive` (`write_model_card` with
    `card`): written into the folder, naming its standalone copy; the folder, now complete,
    uploaded when `push` is given (`push_export`); returns the standalone copy, the artifact
    `<archive stem>.card.md` that the verdicts are written into later."""
    name = card_artifact_name(archive)
    path = write_model_card(folder, provenance, card_artifact=name, **card)
    if push is not None:
        push_export(folder, push, warnings)
    return ArtifactFile(name, "text/markdown", path.read_bytes())


def card_json(folder: str | Path) -> str:
    """The front matter as JSON (for logs and the registry)."""
    return json.dumps(read_model_card(folder), sort_keys=True, default=str)
