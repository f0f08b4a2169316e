"""`block_influence` (ShortGPT, Men et al. 2024): BI_l = mean over real tokens of
1 - cos(x_l, y_l), x_l / y_l the block input / output at that token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from worker.modelzoo.adapters import ArchitectureAdapter
from worker.scoring.scorers.base import Scorer, ScoreTable
from worker.scoring.scorers.similarity import similarity_scorer
from worker.stage import JobContext


def block_influence(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    positions: Literal["all", "last"] = "all",
    adapter: ArchitectureAdapter | None = None,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "score:block_influence",
) -> ScoreTable:
    """ShortGPT block influence: mean over real tokens of 1 - cos(block input, block output)."""
    return similarity_scorer(
        "block_influence",
        lambda cos: 1.0 - cos,
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


class BlockInfluence(Scorer):
    name = "block_influence"
    description = "ShortGPT block influence: mean over real tokens of 1 - cos(block input, block output)"

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        return block_influence(model, tokenizer, texts, **kw)
