"""Baseline layer scorers (docs/method.md section 3), each giving the same per-layer table.

Every scorer returns a `ScoreTable`: one `score` per block, **higher = more
important**, so rankings from different scorers compare directly.
`ScoreTable.order()` is the ranking (least important first, ties by the lower
layer index, as the avss stage), `ScoreTable.layer_rows()` the `LayerRow`s
(`score`, `rank` with 1 = lowest score = first pruning candidate as in the avss
stage's table, and scorer-specific extras).

All scorers hook the adapter's blocks (forward pre-hooks for the block input,
forward hooks for the block output; removed in `finally`), run batched over the
scoring texts (truncated to `max_tokens`, padded on the right), count only real
tokens (attention mask), report progress and check cancellation per batch. The two
similarity scorers run the base model only (no LM head), as the profiler does.
"Block input" is the hidden state a block receives, "block output" the one it
returns (first element of a tuple output).

- `block_influence` (ShortGPT, Men et al. 2024): BI_l = mean over real tokens of
  1 - cos(x_l, y_l), x_l / y_l the block input / output at that token.
- `angular_distance` (Gromov et al. 2024, "The unreasonable ineffectiveness of
  the deeper layers"): d_l = arccos(cos(x_l, y_l)) / pi for a span of n = 1 block.
  `positions="last"` (default, as Gromov et al., who compare the last token's
  representations) uses each text's last real token; `positions="all"` averages
  over every real token. A higher distance = the block changes its input more =
  more important.
- `gbis` (gradient-based importance, Saarela & Jauhiainen 2021): the task loss is
  the causal LM loss (sum of next-token NLL over real targets);
  GBIS_l = mean over real tokens and hidden units of |dLoss/dy_l * y_l|
  (gradient x activation of the block output). The gradient is taken with
  `torch.autograd.grad` w.r.t. the block outputs only (no parameter gradients are
  accumulated; the model is not modified).
- `lrp` (layer-wise relevance propagation, epsilon rule; appendix G, eq. 48-52).
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
- `cim` (contextual importance, leave-one-layer-out): for every block l, the model
  without block l (skipped in place on the model, restored in `finally`) is run on
  every context i; CIM_l = mean_i (NLL_i(without l) - NLL_i(full)), NLL_i the mean
  next-token NLL of context i. Extras: `score_std` (spread over contexts) and
  `hurt_fraction` (share of contexts whose loss rose). Costs L + 1 passes.
  **It modifies the model in place while it runs**: pass a private copy when the
  model is shared (the `prune` stage does).
- `random`: a random permutation of the layers (seeded): `random_scores(L, seed)`.

`gbis`, `lrp` and `cim` need a causal LM (the LM loss is the task loss); on an
encoder they fail with `JobFailed("scorer_unsupported")`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from worker.evaluation.tasks import encode_texts, is_causal_lm, model_device, pad_batch
from worker.lm.batching import AutoBatch
from worker.modelzoo import adapter_for
from worker.modelzoo.adapters import ArchitectureAdapter, BlockInfo
from worker.profiler.profiler import forward_callable
from worker.scoring.agreement import pruning_order, ranks_from_order
from worker.stage import JobContext, JobFailed, LayerRow, finite_or_none

__all__ = [
    "BASELINE_SCORERS",
    "ScoreTable",
    "angular_distance",
    "block_influence",
    "cim",
    "compute_scores",
    "gbis",
    "lrp",
    "random_scores",
]


@dataclass
class ScoreTable:
    """Per-layer scores of one scorer (higher = more important)."""

    scorer: str
    scores: list[float]
    block_names: list[str]
    extra: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def order(self) -> list[int]:
        """The ranking: layer indices least important first (first pruning candidate first)."""
        return pruning_order(self.scores)

    def ranks(self) -> list[int]:
        return ranks_from_order(self.order())

    def layer_rows(self) -> list[LayerRow]:
        ranks = self.ranks()
        rows = []
        for i, score in enumerate(self.scores):
            values: dict[str, float | None] = {"score": finite_or_none(score), "rank": float(ranks[i])}
            for key, col in self.extra.items():
                values[key] = finite_or_none(col[i])
            rows.append(LayerRow(layer=i, block_name=self.block_names[i], scorer=self.scorer, values=values))
        return rows


def _table(scorer: str, raw: np.ndarray, blocks: Sequence[BlockInfo], **kw: Any) -> ScoreTable:
    scores = np.asarray(raw, dtype=np.float64)
    warnings = list(kw.pop("warnings", []))
    bad = ~np.isfinite(scores)
    if bad.any():
        warnings.append(
            f"{scorer}: layers {np.flatnonzero(bad).tolist()} gave a non-finite score; ranked as least important"
        )
        floor = scores[~bad].min() - 1.0 if (~bad).any() else 0.0
        scores = np.where(bad, floor, scores)
    return ScoreTable(
        scorer=scorer, scores=scores.tolist(), block_names=[b.name for b in blocks], warnings=warnings, **kw
    )


# ------------------------------------------------------------------ plumbing


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    if hasattr(value, "to_tuple"):
        return _first_tensor(value.to_tuple())
    return None


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


@contextmanager
def _hooks(
    blocks: Sequence[BlockInfo],
    pre: Callable[[int, torch.Tensor], None] | None = None,
    post: Callable[[int, torch.Tensor], Any] | None = None,
) -> Iterator[None]:
    """pre(i, block_input) and post(i, block_output) on every block; removed in finally."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_pre(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _block_input(args, kwargs)
            if x is None:
                raise JobFailed("scorer_failed", f"could not read the input hidden state of block {i}")
            assert pre is not None
            pre(i, x)

        return hook

    def make_post(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            y = _first_tensor(output)
            if y is None:
                raise JobFailed("scorer_failed", f"could not read the output hidden state of block {i}")
            assert post is not None
            post(i, y)

        return hook

    try:
        for i, block in enumerate(blocks):
            if pre is not None:
                handles.append(block.module.register_forward_pre_hook(make_pre(i), with_kwargs=True))
            if post is not None:
                handles.append(block.module.register_forward_hook(make_post(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    rows: list[int]


@dataclass
class _Texts:
    """The scoring texts, tokenized once, longest first; `batch(rows)` pads rows onto the device."""

    encoded: list[list[int]]
    order: list[int]
    pad: int
    device: torch.device

    def batch(self, rows: Sequence[int]) -> _Batch:
        ids, mask = pad_batch([self.encoded[i] for i in rows], self.pad)
        return _Batch(ids.to(self.device), mask.to(self.device), list(rows))


def _texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int | None) -> _Texts:
    encoded = encode_texts(tokenizer, texts, max_tokens)
    keep = [i for i, e in enumerate(encoded) if len(e) > 0]
    if not keep:
        raise JobFailed("dataset_invalid", "no text to score layers on (every example is empty)")
    order = sorted(keep, key=lambda i: (-len(encoded[i]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _Texts(encoded, order, int(pad), model_device(model))


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad while a gradient scorer runs (restored after): the gradients
    wanted are w.r.t. activations only, and a parameter that requires grad makes autograd keep
    every linear layer's input for a weight gradient nobody reads."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _setup(
    model: torch.nn.Module, adapter: ArchitectureAdapter | None, ctx: JobContext | None
) -> tuple[list[BlockInfo], JobContext]:
    adapter = adapter if adapter is not None else adapter_for(model)
    return adapter.blocks(model), (ctx if ctx is not None else JobContext())


def _require_causal(model: torch.nn.Module, scorer: str) -> None:
    if not is_causal_lm(model):
        raise JobFailed(
            "scorer_unsupported",
            f"scorer {scorer!r} uses the causal LM loss as its task loss; {type(model).__name__} is not a causal "
            "LM. Use block_influence or angular_distance for encoders.",
        )


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.float(), y.float()
    num = (x * y).sum(-1)
    den = x.norm(dim=-1) * y.norm(dim=-1)
    return (num / den.clamp_min(1e-12)).clamp(-1.0, 1.0)


# ------------------------------------------------------- similarity scorers


def _similarity_scorer(
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
    blocks, ctx = _setup(model, adapter, ctx)
    data = _texts(model, tokenizer, texts, max_tokens)
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

    ctx.progress(progress_stage, 0, batcher.total_for(data.order))
    with torch.inference_mode(), _hooks(blocks, pre, post):
        for _, (batch_sums, batch_counts) in batcher.run(data.order, run_batch):
            sums += batch_sums
            counts += batch_counts
            ctx.progress(progress_stage, batcher.done, batcher.total)
    inputs.clear()
    scores = sums / np.maximum(counts, 1)
    return _table(
        name,
        scores,
        blocks,
        details={"positions": positions, "tokens": int(counts[0]), "texts": len(texts)},
        seconds=time.perf_counter() - started,
    )


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
    return _similarity_scorer(
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
    return _similarity_scorer(
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


# ----------------------------------------------------------- gradient scorers


@contextmanager
def _embeddings_require_grad(model: torch.nn.Module) -> Iterator[None]:
    """Make the input embeddings a graph leaf when the parameters do not require grad, so
    block outputs are always differentiable (the model's parameters are left untouched)."""
    emb = model.get_input_embeddings()

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None

    handle = emb.register_forward_hook(hook) if emb is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _targets(batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token targets [B, T-1], their mask) on real tokens."""
    tmask = batch.mask[:, 1:].bool() & batch.mask[:, :-1].bool()
    return batch.ids[:, 1:], tmask


def _lm_loss_sum(model: torch.nn.Module, batch: _Batch) -> torch.Tensor:
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits[:, :-1].float()
    targets, tmask = _targets(batch)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    return (nll * tmask).sum()


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
    _require_causal(model, "gbis")
    started = time.perf_counter()
    blocks, ctx = _setup(model, adapter, ctx)
    data = _texts(model, tokenizer, texts, max_tokens)
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
            loss = _lm_loss_sum(model, batch)
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

    ctx.progress(progress_stage, 0, batcher.total_for(data.order))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _frozen_parameters(model),
        _embeddings_require_grad(model),
        _hooks(blocks, None, post),
    ):
        for _, (part, n_tokens) in batcher.run(data.order, run_batch):
            sums += part
            tokens += n_tokens
            ctx.progress(progress_stage, batcher.done, batcher.total)
    return _table(
        "gbis",
        sums / max(tokens, 1.0),
        blocks,
        details={"objective": "causal LM loss (sum of next-token NLL)", "tokens": int(tokens)},
        seconds=time.perf_counter() - started,
    )


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
    _require_causal(model, "lrp")
    if not epsilon > 0:
        raise ValueError("epsilon must be > 0")
    started = time.perf_counter()
    blocks, ctx = _setup(model, adapter, ctx)
    data = _texts(model, tokenizer, texts, max_tokens)
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
            targets, tmask = _targets(batch)
            start = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * tmask).sum()
            del logits
            ys = [outputs[i] for i in range(len(blocks))]
            xs = [inputs[i] for i in range(len(blocks))]
            grads = torch.autograd.grad(start, ys, allow_unused=True)
        finally:
            inputs.clear()
            outputs.clear()
        part, part_signed = np.zeros(len(blocks)), np.zeros(len(blocks))
        mask = batch.mask.bool()
        for i, (y, g) in enumerate(zip(ys, grads, strict=True)):
            if g is None:
                continue
            update = y.detach().float() - xs[i].float()
            relevance = (update * g.float()).sum(-1)  # [batch, pos]
            part[i] = float(relevance[mask].abs().double().sum())
            part_signed[i] = float(relevance[mask].double().sum())
        return part, part_signed, float(mask.sum())

    ctx.progress(progress_stage, 0, batcher.total_for(data.order))
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _frozen_parameters(model),
        _embeddings_require_grad(model),
        _epsilon_rule(model, epsilon) as n_linear,
        _hooks(blocks, pre, post),
    ):
        for _, (part, part_signed, n_tokens) in batcher.run(data.order, run_batch):
            sums += part
            signed += part_signed
            tokens += n_tokens
            ctx.progress(progress_stage, batcher.done, batcher.total)
    denom = max(tokens, 1.0)
    return _table(
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


# -------------------------------------------------------------------- CIM


def _per_example_nll(model: torch.nn.Module, data: _Texts, batcher: AutoBatch, n: int) -> np.ndarray:
    """Mean next-token NLL per text (NaN without a target); batches back off on OOM."""
    out = np.full(n, np.nan)
    for _, (rows, per, has) in batcher.run(data.order, lambda rows: _batch_nll(model, data.batch(rows))):
        for row, i in enumerate(rows):
            if bool(has[row]):
                out[i] = float(per[row])
    return out


def _batch_nll(model: torch.nn.Module, batch: _Batch) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits[:, :-1].float()
    targets, tmask = _targets(batch)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    per = (nll * tmask).sum(1) / tmask.sum(1).clamp_min(1)
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
    from worker.pruning import pruned_view

    _require_causal(model, "cim")
    started = time.perf_counter()
    blocks, ctx = _setup(model, adapter, ctx)
    adapter = adapter if adapter is not None else adapter_for(model)
    data = _texts(model, tokenizer, texts, max_tokens)
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
    return _table(
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


# ------------------------------------------------------------------ random


def random_scores(n_layers: int, seed: int, block_names: Sequence[str] | None = None) -> ScoreTable:
    """A random ranking: scores are a seeded random permutation of 0..L-1."""
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_layers).astype(np.float64)
    names = list(block_names) if block_names is not None else [str(i) for i in range(n_layers)]
    return ScoreTable(scorer="random", scores=scores.tolist(), block_names=names, details={"seed": seed})


BASELINE_SCORERS: dict[str, Callable[..., ScoreTable]] = {
    "block_influence": block_influence,
    "angular_distance": angular_distance,
    "gbis": gbis,
    "lrp": lrp,
    "cim": cim,
}


def compute_scores(
    name: str, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any
) -> ScoreTable:
    """Run the baseline scorer `name` (one of `BASELINE_SCORERS`)."""
    try:
        fn = BASELINE_SCORERS[name]
    except KeyError:
        raise JobFailed(
            "scorer_unknown", f"unknown scorer {name!r}; known: {', '.join(BASELINE_SCORERS)}"
        ) from None
    return fn(model, tokenizer, texts, **kw)
