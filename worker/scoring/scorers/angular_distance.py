"""`angular_distance` (Gromov et al. 2024, "The unreasonable ineffectiveness of
the deeper layers"): d_l = arccos(cos(x_l, y_l)) / pi for a span of n = 1 block.
`positions="last"` (default, as Gromov et al., who compare the last token's
representations) uses each text's last real token; `positions="all"` averages
over every real token. A higher distance = the block changes its input more =
more important.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from worker.modelzoo.adapters import ArchitectureAdapter
from worker.scoring.scorers.base import Scorer, ScoreTable
from worker.scoring.scorers.similarity import similarity_scorer
from worker.stage import JobContext

if TYPE_CHECKING:
    from app.schemas import PruneOptions

def angular_distance(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    positions: Literal["all", "last"] = "last",
    adapter: ArchitectureAdapter | None = None,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "score:angular_distance",
) -> ScoreTable:
    """Gromov et al. angular distance arccos(cos)/pi between block input and output (n = 1)."""
    return similarity_scorer(
        "angular_distance",
        lambda cos: torch.arccos(cos) / math.pi,
        model,
        tokenizer,
        texts,
        positions=positions,
        adapter=adapter,
        max_tokens=max_tokens,
        batch_size=batch_size,
        ctx=ctx,
        progress_stage=progress_stage,
    )


class AngularDistance(Scorer):
    name = "angular_distance"
    description = "Gromov et al. angular distance arccos(cos)/pi between block input and output (n = 1)"

    def options(self, prune: PruneOptions) -> dict[str, Any]:
        return {"positions": prune.angular_positions}

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        return angular_distance(model, tokenizer, texts, **kw)
