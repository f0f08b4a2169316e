"""The layer scorers, one module each, registered here (docs/method.md section 3).

Each entry is a `Scorer` (worker.scoring.scorers.base) that says what it needs
(`needs_causal_lm`, `needs_gradients`, or `from_stage` when an earlier stage computes
its ranking), how the prune stage sizes its batches and passes its options, and
`score`, which returns a `ScoreTable` (higher = more important). The order here is
the prune stage's default order; `app.schemas.ScorerName` and `ALL_SCORERS` must list
the same names (tests/unit/test_registries.py checks).

Adding a scorer: a module with a `Scorer` subclass and one entry in `SCORERS` (its
options, if any, as fields of `app.schemas.PruneOptions` read in `Scorer.options`),
and its name in `ScorerName`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.scoring.scorers.angular_distance import AngularDistance
from worker.scoring.scorers.avss import Avss
from worker.scoring.scorers.base import Scorer, ScoreTable, random_scores
from worker.scoring.scorers.block_influence import BlockInfluence
from worker.scoring.scorers.cim import Cim
from worker.scoring.scorers.gbis import Gbis
from worker.scoring.scorers.lrp import Lrp
from worker.stage import JobFailed

SCORERS: dict[str, Scorer] = {
    s.name: s for s in (Avss(), Gbis(), Lrp(), Cim(), BlockInfluence(), AngularDistance())
}

__all__ = [
    "SCORERS",
    "ScoreTable",
    "Scorer",
    "compute_scores",
    "computed_scorers",
    "random_scores",
]


def computed_scorers() -> list[str]:
    """The scorers that compute their own ranking (all but those taken from a stage)."""
    return [name for name, s in SCORERS.items() if s.from_stage is None]


def compute_scores(
    name: str, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any
) -> ScoreTable:
    """Run the scorer `name` (one of `computed_scorers()`)."""
    scorer = SCORERS.get(name)
    if scorer is None or scorer.from_stage is not None:
        raise JobFailed(
            "scorer_unknown", f"unknown scorer {name!r}; known: {', '.join(computed_scorers())}"
        )
    return scorer.score(model, tokenizer, texts, **kw)
