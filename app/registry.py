"""Model registries, the API-side half: what a gate policy does in a registry, and the registry outbox.

An analysis whose spec names `registry.mlflow` (a registered model version) reports to it:
- on success, one `run` update: the analysis's per-layer tables, metrics (each interval as
  separate metrics) and plots logged to an MLflow run linked to the version;
- per gate verdict, one `verdict` update: `layerscope.*` tags on the version and, when the
  policy's `registry` actions say so, an alias moved to it (e.g. `champion` only on pass).

Updates are rows (`registry_updates`), stored in the transaction that causes them (the job's end,
a verdict), so none is lost; the workers' sweeper applies them (`worker/service/registry.py`) and
retries a failed one with backoff. Nothing here imports MLflow: the API process only writes rows.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field
from sqlalchemy.orm import Session

from app.models import Analysis, RegistryUpdate, utcnow
from app.schemas import ALIAS_NAME, MlflowVersionRef, Strict

RUN, VERDICT = "run", "verdict"
UPDATED_EVENT, FAILED_EVENT = "registry.updated", "registry.failed"


class RegistryActions(Strict):
    """What a verdict of this policy does in the model registry, besides its tags."""

    alias_on_pass: str | None = Field(
        None, pattern=ALIAS_NAME,
        description="Move this alias (e.g. `champion`) to the analysed version when the verdict passes.",
    )
    alias_on_fail: str | None = Field(
        None, pattern=ALIAS_NAME,
        description="Move this alias (e.g. `rejected`) to the analysed version when the verdict fails.",
    )


def mlflow_target(spec: dict[str, Any] | None) -> MlflowVersionRef | None:
    """The registered version a stored spec reports to, or None."""
    ref = ((spec or {}).get("registry") or {}).get("mlflow")
    return MlflowVersionRef.model_validate(ref) if ref else None


def enqueue_update(session: Session, analysis: Analysis, kind: str, verdict_id: str | None = None) -> bool:
    """Store a pending update for `analysis`'s registry target in the caller's transaction (False: none).

    The `run` update is once per analysis (its dedupe key); a second emission raises IntegrityError at flush."""
    if mlflow_target(analysis.spec) is None:
        return False
    now = utcnow()
    session.add(RegistryUpdate(
        id=str(uuid.uuid4()), project=analysis.project, analysis_id=analysis.id, target="mlflow", kind=kind,
        verdict_id=verdict_id, dedupe_key=f"run:{analysis.id}" if kind == RUN else None, state="pending",
        attempts=0, next_attempt_at=now, last_error=None, result={}, created_at=now,
    ))
    session.flush()
    return True
