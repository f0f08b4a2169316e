"""`lrp` (layer-wise relevance propagation, epsilon rule; appendix G, eq. 48-52).
**An approximation, documented as such.** Relevance starts at the logit of the
true next token at every real target position (sum over positions, eq. 48). It
is propagated with the gradient x input formulation of LRP: every `nn.Linear`
(and GPT-2's `Conv1D`), the LM head included, applies the epsilon rule (eq. 49)
R_i = x_i * sum_j w_ij R_j / (z_j + eps * sign(z_j)), implemented by scaling the
gradient through each linear output by z / (z + eps * sign(z)) (forward values
unchanged); every other operation (norms, activation functions, the attention
softmax and the attention's value mixing) passes the plain gradient, i.e. the
LRP-0 / gradient x input rule, *not* the conservative LayerNorm and attention
rules of Ali et al. 2022, so relevance is only approximately conserved. The
relevance reaching block l is the share of its residual update: with
y_l = x_l + u_l (u_l = y_l - x_l, the block's contribution to the residual
stream), the LRP-0 rule for the sum gives R(u_l) = u_l * g~(y_l), g~ the
modified gradient at the block output. LRP_l = mean over real tokens of
|sum over hidden units of R(u_l)|. It differs from GBIS in the objective (target
logit vs loss), the propagation (epsilon-stabilized linears), the tensor (the
block's update vs its whole output) and the aggregation (signed relevance summed
per token before |.|).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.lm.hooks import block_hooks
from worker.lm.loss import next_token_targets
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

if TYPE_CHECKING:
    from app.schemas import PruneOptions

def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


@contextmanager
def _epsilon_rule(model: torch.nn.Module, eps: float) -> Iterator[int]:
    """Scale the gradient through every linear output z by z / (z + eps sign(z))."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], z: Any) -> Any:
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            return None
        zd = z.detach()
        sign = torch.where(zd >= 0, 1.0, -1.0).to(zd.dtype)
        s = zd / (zd + eps * sign)
        return z * s + (z * (1 - s)).detach()

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_linear(m)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def _relevance(
    ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], mask: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per block: |sum over units of R(u_l)| and the signed sum, summed over real tokens."""
    part, part_signed = np.zeros(len(ys)), np.zeros(len(ys))
    for i, (y, g) in enumerate(zip(ys, grads, strict=True)):
        if g is None:
            continue
        update = y.detach().float() - xs[i].float()
        relevance = (update * g.float()).sum(-1)  # [batch, pos]
        part[i] = float(relevance[mask].abs().double().sum())
        part_signed[i] = float(relevance[mask].double().sum())
    return part, part_signed


def lrp(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    epsilon: float = 1e-2,
    adapter: ArchitectureAdapter | None = None,
    max_tokens: int | None = 256,
    batch_size: int = 4,
    ctx: JobContext | None = None,
    progress_stage: str = "score:lrp",
) -> ScoreTable:
    """Epsilon-rule relevance of each block's residual update (see module doc: an approximation)."""
    require_causal(model, "lrp")
    if not epsilon > 0:
        raise ValueError("epsilon must be > 0")
    started = time.perf_counter()
    blocks, ctx = setup(model, adapter, ctx)
    data = scoring_texts(model, tokenizer, texts, max_tokens)
    batcher = AutoBatch("lrp", model, batch_size)  # OOM back-off, see worker/lm/batching.py
    sums = np.zeros(len(blocks))
    signed = np.zeros(len(blocks))
    tokens = 0.0
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre(i: int, x: torch.Tensor) -> None:
        inputs[i] = x.detach()

    def post(i: int, y: torch.Tensor) -> None:
        outputs[i] = y

    def run_batch(rows: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        ctx.check_cancelled()
        batch = data.batch(rows)
        inputs.clear()
        outputs.clear()
        try:
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits[:, :-1]
            targets, tmask = batch.ids[:, 1:], next_token_targets(batch.mask)
            start = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * tmask).sum()
            del logits
            ys = [outputs[i] for i in range(len(blocks))]
            xs = [inputs[i] for i in range(len(blocks))]
            grads = torch.autograd.grad(start, ys, allow_unused=True)
        finally:
            inputs.clear()
            outputs.clear()
        mask = batch.mask.bool()
        return (*_relevance(ys, xs, grads, mask), float(mask.sum()))

    ctx.progress(progress_stage, 0, len(data.order))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        frozen_parameters(model),
        embeddings_require_grad(model),
        _epsilon_rule(model, epsilon) as n_linear,
        block_hooks(blocks, pre, post),
    ):
        for _, (part, part_signed, n_tokens) in batcher.run(data.order, run_batch):
            sums += part
            signed += part_signed
            tokens += n_tokens
            ctx.progress(progress_stage, *batcher.progress)
    denom = max(tokens, 1.0)
    return score_table(
        "lrp",
        sums / denom,
        blocks,
        extra={"signed_relevance": (signed / denom).tolist()},
        details={
            "rule": "epsilon on linear layers, gradient x input elsewhere (approximation)",
            "epsilon": epsilon,
            "start": "logit of the true next token, summed over real positions",
            "linear_layers": n_linear,
            "tokens": int(tokens),
        },
        seconds=time.perf_counter() - started,
    )


class Lrp(Scorer):
    name = "lrp"
    description = (
        "epsilon rule on linear layers, gradient x input elsewhere; relevance of each block's residual "
        "update (approximation, see worker/scoring/scorers/lrp.py)"
    )
    needs_causal_lm = True
    needs_gradients = True

    def options(self, prune: PruneOptions) -> dict[str, Any]:
        return {"epsilon": prune.lrp_epsilon}

    def score(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> ScoreTable:
        return lrp(model, tokenizer, texts, **kw)
