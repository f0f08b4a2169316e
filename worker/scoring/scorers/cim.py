"""`cim` (contextual importance, leave-one-layer-out): for every block l, the model
without block l (skipped in place on the model, restored in `finally`) is run on
every context i; CIM_l = mean_i (NLL_i(without l) - NLL_i(full)), NLL_i the mean
next-token NLL of context i. Extras: `score_std` (spread over contexts) and
`hurt_fraction` (share of contexts whose loss rose). Costs L + 1 passes.
It removes one block at a time in place (`worker.modelzoo.surgery.pruned_view`,
restored in `finally`), so nothing else may use the model meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.lm.loss import next_token_targets, token_nll
from worker.modelzoo import adapter_for
from worker.modelzoo.adapters import ArchitectureAdapter
from worker.modelzoo.surgery import pruned_view
from worker.scoring.scorers.base import (
    Batch,
    Scorer,
    ScoreTable,
    ScoringTexts,
    require_causal,
    score_table,
    scoring_texts,
    setup,
)
from worker.stage import JobContext, JobFailed


def _per_example_nll(model: torch.nn.Module, data: ScoringTexts, batcher: AutoBatch, n: int) -> np.ndarray:
    """Mean next-token NLL per text (NaN without a target); batches back off on OOM."""
    out = np.full(n, np.nan)
    for _, (rows, per, has) in batcher.run(data.order, lambda rows: _batch_nll(model, data.batch(rows))):
        for row, i in enumerate(rows):
            if bool(has[row]):
                out[i] = float(per[row])
    return out


def _batch_nll(model: torch.nn.Module, batch: Batch) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    nll = token_nll(model, batch.ids, batch.mask)
    tmask = next_token_targets(batch.mask)
    per = nll.sum(1) / tmask.sum(1).clamp_min(1)
    has = tmask.sum(1) > 0
    return batch.rows, per.cpu(), has.cpu()


def cim(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    adapter: ArchitectureAdapter | None = None,
    max_tokens: int | None = 256,
    batch_size: int = 8,
    ctx: JobContext | None = None,
    progress_stage: str = "score:cim",
) -> ScoreTable:
    """Leave-one-layer-out LM-loss increase per context, averaged (modifies `model` while running)."""
    require_causal(model, "cim")
    started = time.perf_counter()
    blocks, ctx = setup(model, adapter, ctx)
    adapter = adapter if adapter is not None else adapter_for(model)
    data = scoring_texts(model, tokenizer, texts, max_tokens)
    batcher = AutoBatch("cim", model, batch_size)  # OOM back-off, see worker/lm/batching.py
    n_layers = len(blocks)
    ctx.progress(progress_stage, 0, n_layers + 1)
    with torch.inference_mode():
        base = _per_example_nll(model, data, batcher, len(texts))
        ctx.progress(progress_stage, 1, n_layers + 1)
        valid = np.isfinite(base)
        if not valid.any():
            raise JobFailed("dataset_invalid", "cim needs texts of at least 2 tokens")
        mean = np.zeros(n_layers)
        std = np.zeros(n_layers)
        hurt = np.zeros(n_layers)
        for layer in range(n_layers):
            ctx.check_cancelled()
            with pruned_view(model, [layer], adapter=adapter):
                skipped = _per_example_nll(model, data, batcher, len(texts))
            diff = (skipped - base)[valid]
            mean[layer] = float(diff.mean())
            std[layer] = float(diff.std())
            hurt[layer] = float((diff > 0).mean())
            ctx.progress(progress_stage, layer + 2, n_layers + 1)
    return score_table(
        "cim",
        mean,
        blocks,
        extra={"score_std": std.tolist(), "hurt_fraction": hurt.tolist()},
        details={
            "metric": "mean next-token NLL per context",
            "base_loss": float(base[valid].mean()),
            "contexts": int(valid.sum()),
        },
        seconds=time.perf_counter() - started,
    )


class Cim(Scorer):
    name = "cim"
    description = "leave-one-layer-out increase of the mean next-token NLL per context"
    needs_causal_lm = True

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        return cim(model, tokenizer, texts, **kw)
