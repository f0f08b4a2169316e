"""`gbis` (gradient-based importance, Saarela & Jauhiainen 2021): the task loss is
the causal LM loss (sum of next-token NLL over real targets);
GBIS_l = mean over real tokens and hidden units of |dLoss/dy_l * y_l|
(gradient x activation of the block output). The gradient is taken with
`torch.autograd.grad` w.r.t. the block outputs only (no parameter gradients are
accumulated; the model is not modified).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.lm.hooks import block_hooks
from worker.lm.loss import token_nll
from worker.modelzoo.adapters import ArchitectureAdapter
from worker.scoring.scorers.base import (
    Scorer,
    ScoreTable,
    embeddings_require_grad,
    frozen_parameters,
    require_causal,
    score_table,
    scoring_texts,
    setup,
)
from worker.stage import JobContext


def gbis(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    adapter: ArchitectureAdapter | None = None,
    max_tokens: int | None = 256,
    batch_size: int = 4,
    ctx: JobContext | None = None,
    progress_stage: str = "score:gbis",
) -> ScoreTable:
    """Gradient x activation: mean |dLM-loss/dy_l * y_l| over real tokens and units."""
    require_causal(model, "gbis")
    started = time.perf_counter()
    blocks, ctx = setup(model, adapter, ctx)
    data = scoring_texts(model, tokenizer, texts, max_tokens)
    batcher = AutoBatch("gbis", model, batch_size)  # OOM back-off, see worker/lm/batching.py
    sums = np.zeros(len(blocks))
    tokens = 0.0
    outputs: dict[int, torch.Tensor] = {}

    def post(i: int, y: torch.Tensor) -> None:
        outputs[i] = y

    def run_batch(rows: list[int]) -> tuple[np.ndarray, float]:
        ctx.check_cancelled()
        batch = data.batch(rows)
        outputs.clear()
        try:
            loss = token_nll(model, batch.ids, batch.mask).sum()
            ys = [outputs[i] for i in range(len(blocks))]
            grads = torch.autograd.grad(loss, ys, allow_unused=True)
        finally:
            outputs.clear()
        part = np.zeros(len(blocks))
        mask = batch.mask.bool()
        for i, (y, g) in enumerate(zip(ys, grads, strict=True)):
            if g is None:
                continue
            per_token = (g.float() * y.detach().float()).abs().mean(-1)
            part[i] = float(per_token[mask].double().sum())
        return part, float(mask.sum())

    ctx.progress(progress_stage, 0, len(data.order))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        frozen_parameters(model),
        embeddings_require_grad(model),
        block_hooks(blocks, None, post),
    ):
        for _, (part, n_tokens) in batcher.run(data.order, run_batch):
            sums += part
            tokens += n_tokens
            ctx.progress(progress_stage, *batcher.progress)
    return score_table(
        "gbis",
        sums / max(tokens, 1.0),
        blocks,
        details={"objective": "causal LM loss (sum of next-token NLL)", "tokens": int(tokens)},
        seconds=time.perf_counter() - started,
    )


class Gbis(Scorer):
    name = "gbis"
    description = "gradient x activation of each block output on the causal LM loss"
    needs_causal_lm = True
    needs_gradients = True

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        return gbis(model, tokenizer, texts, **kw)
