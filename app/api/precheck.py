"""Checks at submit that are cheap and certain, so a spec that can only fail is a 422 now.

The worker checks the same again (its settings may differ from the API's); these only refuse
what no worker of this server would run:

- `stages.hallucination.judge.name`: a judge the operator configured (`LAYERSCOPE_JUDGES`).
"""

from __future__ import annotations

from app.config import Settings, unknown_judge
from app.problems import Problem
from app.schemas import AnalysisSpec


def check_submit(spec: AnalysisSpec, settings: Settings) -> None:
    """Raise a 422 Problem naming every field (in spec order) that no worker here could run."""
    errors: list[dict[str, str]] = []
    hallucination = spec.stages.hallucination
    if hallucination is not None and hallucination.judge is not None:
        name = hallucination.judge.name
        if name not in settings.judges:
            errors.append({"field": "stages.hallucination.judge.name", "message": unknown_judge(name, settings.judges),
                           "type": "judge_not_configured"})
    if errors:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, f"Invalid request: {detail}", errors=errors)
