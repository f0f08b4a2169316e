"""The two similarity scorers' shared pass: cos(block input, block output) per real token,
averaged; the base model only (no LM head), as the profiler does."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.lm.hooks import block_hooks
from worker.lm.model import forward_callable
from worker.modelzoo.adapters import ArchitectureAdapter
from worker.scoring.scorers.base import ScoreTable, score_table, scoring_texts, setup
from worker.stage import JobContext


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.float(), y.float()
    num = (x * y).sum(-1)
    den = x.norm(dim=-1) * y.norm(dim=-1)
    return (num / den.clamp_min(1e-12)).clamp(-1.0, 1.0)


def similarity_scorer(
    name: str,
    per_token: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    positions: Literal["all", "last"],
    adapter: ArchitectureAdapter | None,
    max_tokens: int | None,
    batch_size: int,
    ctx: JobContext | None,
    progress_stage: str,
) -> ScoreTable:
    started = time.perf_counter()
    blocks, ctx = setup(model, adapter, ctx)
    data = scoring_texts(model, tokenizer, texts, max_tokens)
    batcher = AutoBatch(name, model, batch_size)  # OOM back-off, see worker/lm/batching.py
    sums = np.zeros(len(blocks))
    counts = np.zeros(len(blocks))
    inputs: dict[int, torch.Tensor] = {}
    select: dict[str, torch.Tensor] = {}
    part: dict[str, np.ndarray] = {}  # the batch being run; added to sums/counts once it completed

    def pre(i: int, x: torch.Tensor) -> None:
        inputs[i] = x

    def post(i: int, y: torch.Tensor) -> None:
        x = inputs.pop(i)
        values = per_token(_cos(x, y))  # [batch, pos]
        sel = select["mask"]
        part["sums"][i] += float(values[sel].double().sum())
        part["counts"][i] += float(sel.sum())

    run = forward_callable(model, blocks)  # the base model: no LM head needed

    def run_batch(rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ctx.check_cancelled()
        batch = data.batch(rows)
        inputs.clear()
        part.update(sums=np.zeros(len(blocks)), counts=np.zeros(len(blocks)))
        mask = batch.mask.bool()
        if positions == "last":
            last = mask.sum(1) - 1
            sel = torch.zeros_like(mask)
            sel[torch.arange(mask.shape[0], device=mask.device), last] = True
            select["mask"] = sel
        else:
            select["mask"] = mask
        run(batch.ids, batch.mask)
        return part["sums"], part["counts"]

    ctx.progress(progress_stage, 0, len(data.order))
    with torch.inference_mode(), block_hooks(blocks, pre, post):
        for _, (batch_sums, batch_counts) in batcher.run(data.order, run_batch):
            sums += batch_sums
            counts += batch_counts
            ctx.progress(progress_stage, *batcher.progress)
    inputs.clear()
    scores = sums / np.maximum(counts, 1)
    return score_table(
        name,
        scores,
        blocks,
        details={"positions": positions, "tokens": int(counts[0]), "texts": len(texts)},
        seconds=time.perf_counter() - started,
    )
