"""Contrastive fine-tuning of chosen blocks (docs/method.md section 7).

Every training question gives one candidate group: the positive `Question: q\\nAnswer: gold`
and negatives `Question: q\\nAnswer: wrong` (the model's own hallucinated answer, when it
gave one, and answers sampled from other questions). At each tuned block's output:

- anchor a = the question tokens of the positive sequence, pooled;
- candidate c_j = the answer tokens of candidate j, pooled;
- InfoNCE = -log softmax_j(cos(a, c_j) / tau)[positive], averaged over questions and
  tuned blocks **(choice: docs/method.md does not name the anchor; the question is what the
  model holds when it commits to an answer)**;

Pooling (`MitigateOptions.pooling`): `unflagged_mean` (default) averages the positions whose
hidden state is not a massive activation: a position is flagged at a block when its largest
|h| exceeds `MASSIVE_RATIO` (100, the profiler's and the avss stage's rule,
`worker.scoring.avss.massive_activation_layers`) times the median |h| of the batch's real
tokens at that block. In SmolLM2 the first token carries such an activation at blocks
11-27; averaged in, it makes every pooled vector point the same way, the cosines all
near 1 and InfoNCE stays at chance (measured: 1.607 -> 1.590 with 5 candidates, chance
ln 5 = 1.609). `last_token` takes the last question token (the anchor: the `:` of
`Answer:`) and the last answer token; `mean` is the plain mean (before the repair). A
span whose every position is flagged falls back to its last position.
- plus `lm_weight` x the mean token cross-entropy of the gold answer given the question,
  so the model keeps generating.

Only the tuned blocks' parameters get gradients (everything else has requires_grad off
for the duration and is left bit-identical).

Precision: in a bfloat16/float16 model an AdamW update of ~learning_rate (5e-5) is below half
the spacing of any |w| >= 2^-6 and rounds away, so the optimizer works on float32 master
copies of the tuned parameters (its state is float32 too): each step copies the model's
gradient into the master, steps there and writes the master back rounded to the model's
dtype, so updates accumulate as in float32. The forward runs in the model's dtype under
autocast; the model (and the patch made from it) keeps its dtype. A float32 model trains
exactly as before (no copies, no autocast). Early stopping keeps the weights of the epoch
with the lowest validation loss, counting the untouched weights as epoch 0: when no epoch
beats them the tuned weights are the base weights, and the report says so.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.lm.model import model_device
from worker.lm.tokens import pad_id
from worker.mitigation.patch import block_parameters, restore, snapshot
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from app.schemas import MitigateOptions
    from worker.modelzoo import LoadedModel

__all__ = [
    "CandidateGroup", "TrainReport", "candidate_prefix", "encode_groups", "group_losses", "infonce_diagnostic", "massive_positions",
    "pool", "train_blocks",
]


@dataclass
class CandidateGroup:
    question: str
    positive: str
    negatives: list[str]


@dataclass
class TrainReport:
    layers: list[int]
    epochs_run: int
    steps: int
    best_epoch: int  # 0: no epoch beat the untouched weights, which were kept
    initial_val_loss: float
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train/val losses
    stopped_early: bool = False
    seconds: float = 0.0
    diagnostic: dict[str, Any] = field(default_factory=dict)  # `infonce_diagnostic`

    def to_dict(self) -> dict[str, Any]:
        return {
            "diagnostic": self.diagnostic,
            "layers": self.layers,
            "epochs_run": self.epochs_run,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "initial_val_loss": _round(self.initial_val_loss),
            "best_val_loss": _round(self.best_val_loss),
            "history": [{k: _round(v) for k, v in h.items()} for h in self.history],
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
        }


def _round(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def candidate_prefix(question: str) -> str:
    return f"Question: {' '.join(question.split())}\nAnswer:"


@dataclass
class _Encoded:
    ids: torch.Tensor  # [S, T]
    mask: torch.Tensor  # [S, T]
    question: torch.Tensor  # [S, T] bool: question tokens
    answer: torch.Tensor  # [S, T] bool: answer tokens
    groups: list[list[int]]  # rows of each group, positive first


def encode_groups(tokenizer: Any, groups: Sequence[CandidateGroup], max_tokens: int) -> _Encoded:
    """Every candidate of `groups` as `Question: q\\nAnswer: a`, padded; positives first in each group."""
    rows: list[tuple[list[int], int]] = []
    members: list[list[int]] = []
    for g in groups:
        prefix = candidate_prefix(g.question)
        n_prefix = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])
        texts = [f"{prefix} {' '.join(a.split())}" for a in [g.positive, *g.negatives]]
        encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
        mine = []
        for ids in encoded:
            ids = list(ids)[:max_tokens]
            if len(ids) <= n_prefix:
                raise JobFailed(
                    "sequence_too_long",
                    f"question {g.question[:80]!r} leaves no room for an answer within mitigate.max_tokens="
                    f"{max_tokens}; raise max_tokens",
                )
            mine.append(len(rows))
            rows.append((ids, n_prefix))
        members.append(mine)
    width = max(len(ids) for ids, _ in rows)
    pad = pad_id(tokenizer)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    question = torch.zeros((len(rows), width), dtype=torch.bool)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, n_prefix) in enumerate(rows):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        question[r, :n_prefix] = True
        answer[r, n_prefix : len(ids)] = True
    return _Encoded(ids_t, mask, question, answer, members)


def _masked_mean(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    w = m.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def massive_positions(h: torch.Tensor, mask: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """[S, T] bool: real positions of `h` ([S, T, D]) whose largest |h| exceeds `limit` (default
    `MASSIVE_RATIO`) times the median |h| over every real position's elements (module doc)."""
    from worker.scoring.avss import MASSIVE_RATIO

    with torch.no_grad():
        a = h.detach().abs().float()
        real = mask.bool()
        if not bool(real.any()):
            return torch.zeros_like(real)
        median = a[real].median()
        peak = a.amax(dim=-1)
        return real & (peak > (MASSIVE_RATIO if limit is None else limit) * median)


def _last(m: torch.Tensor) -> torch.Tensor:
    """[S, T] bool: the last True position of each row of `m` (none for an empty row)."""
    pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
    return m & (pos == last)


def pool(h: torch.Tensor, span: torch.Tensor, flagged: torch.Tensor | None, how: str) -> torch.Tensor:
    """[S, D]: `h` ([S, T, D]) pooled over each row's `span` positions ([S, T] bool) the way
    `how` says (`MitigateOptions.pooling`, module doc); `flagged`: `massive_positions`."""
    if how == "last_token":
        return _masked_mean(h, _last(span))
    if how == "mean" or flagged is None:
        return _masked_mean(h, span)
    keep = span & ~flagged
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, _last(span))  # all flagged: the last one
    return _masked_mean(h, keep)


def group_losses(
    loaded: LoadedModel, layers: Sequence[int], groups: Sequence[CandidateGroup], *, temperature: float, max_tokens: int,
    pooling: str = "unflagged_mean", stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE, LM loss) of `groups` at blocks `layers`, differentiable in the tuned weights.
    `stats`, when given, gets the counts of pooled and of flagged (excluded) positions added."""
    model = loaded.model
    device = model_device(model)
    enc = encode_groups(loaded.tokenizer, groups, max_tokens)
    ids, mask = enc.ids.to(device), enc.mask.to(device)
    blocks = loaded.adapter.blocks(model)
    captured: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    def keep(li: int) -> Callable[[torch.Tensor], None]:
        return captured[li].append

    handles = [blocks[li].sites["block_output"].register(keep(li)) for li in layers]
    positives = [g[0] for g in enc.groups]
    pos_set = set(positives)
    negatives = [r for r in range(ids.shape[0]) if r not in pos_set]
    try:
        # Positives through the whole model (their logits give the LM loss); negatives only
        # need hidden states, so they skip the output head.
        logits = model(input_ids=ids[positives], attention_mask=mask[positives]).logits
        if negatives:
            model.base_model(input_ids=ids[negatives], attention_mask=mask[negatives])
    finally:
        for handle in handles:
            handle.remove()
    order = positives + negatives
    where = {row: k for k, row in enumerate(order)}
    q_mask = enc.question.to(device)[order]
    a_mask = enc.answer.to(device)[order]
    real = mask[order].bool()
    nce_terms = []
    for li in layers:
        h = torch.cat(captured[li], dim=0)  # rows in `order`
        flagged = massive_positions(h, real) if pooling == "unflagged_mean" else None
        if stats is not None and flagged is not None:
            spans = q_mask | a_mask
            stats["positions"] = stats.get("positions", 0.0) + float(spans.sum())
            stats["flagged"] = stats.get("flagged", 0.0) + float((spans & flagged).sum())
        anchor = F.normalize(pool(h, q_mask, flagged, pooling), dim=-1)
        cand = F.normalize(pool(h, a_mask, flagged, pooling), dim=-1)
        for g in enc.groups:
            idx = torch.tensor([where[r] for r in g], device=device)
            sims = (cand[idx] @ anchor[where[g[0]]]) / temperature
            nce_terms.append(F.cross_entropy(sims.unsqueeze(0), torch.zeros(1, dtype=torch.long, device=device)))
    nce = torch.stack(nce_terms).mean()
    # LM loss on the gold answer tokens: logits at t-1 predict token t.
    target = enc.answer[positives].to(device)[:, 1:]
    lm = F.cross_entropy(logits[:, :-1][target].float(), ids[positives][:, 1:][target])
    return nce, lm


def _chunks(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def _validation_loss(loaded: LoadedModel, layers: Sequence[int], groups: Sequence[CandidateGroup], options: MitigateOptions) -> float:
    total, weight = 0.0, 0
    with torch.no_grad():
        for chunk in _chunks(range(len(groups)), options.batch_size):
            nce, lm = group_losses(
                loaded, layers, [groups[i] for i in chunk],
                temperature=options.temperature, max_tokens=options.max_tokens, pooling=options.pooling,
            )
            total += float(nce + options.lm_weight * lm) * len(chunk)
            weight += len(chunk)
    return total / max(weight, 1)


def _mean_infonce(
    loaded: LoadedModel, layers: Sequence[int], groups: Sequence[CandidateGroup], options: MitigateOptions,
    stats: dict[str, float] | None = None,
) -> float:
    """The InfoNCE term alone over `groups` (no gradients), weighted by group."""
    total, weight = 0.0, 0
    with torch.no_grad():
        for chunk in _chunks(range(len(groups)), options.batch_size):
            nce, _ = group_losses(
                loaded, layers, [groups[i] for i in chunk], temperature=options.temperature,
                max_tokens=options.max_tokens, pooling=options.pooling, stats=stats,
            )
            total += float(nce) * len(chunk)
            weight += len(chunk)
    return total / max(weight, 1)


AT_CHANCE = 0.02  # InfoNCE within 2% of ln(candidates) after tuning: the contrastive term learned nothing


def infonce_diagnostic(
    before: float, after: float, groups: Sequence[CandidateGroup], stats: dict[str, float], pooling: str,
) -> dict[str, Any]:
    """Did the InfoNCE term fall on the tuning data? Its value there before and after tuning
    (same data, eval mode), chance level (the mean ln of the group sizes: uniform scores),
    and whether it stayed at chance (within `AT_CHANCE` of it) or did not fall at all."""
    chance = float(np.mean([math.log(1 + len(g.negatives)) for g in groups])) if groups else math.nan
    at_chance = math.isfinite(after) and after >= (1 - AT_CHANCE) * chance
    return {
        "tuning_infonce_before": _round(before), "tuning_infonce_after": _round(after),
        "chance": _round(chance), "fell": _round(before - after),
        "at_chance": bool(at_chance), "did_not_fall": bool(not after < before),
        "pooling": pooling,
        "flagged_share": _round(stats["flagged"] / stats["positions"]) if stats.get("positions") else None,
    }


def _master_weights(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """float32 copies of the tuned parameters when any is in a lower precision, else None."""
    if all(p.dtype == torch.float32 for p in params.values()):
        return None
    return {name: p.detach().float().clone().requires_grad_(True) for name, p in params.items()}


def _autocast(params: dict[str, torch.nn.Parameter]) -> Any:
    """The forward in the model's own low precision (no-op for a float32 model)."""
    p = next(iter(params.values()))
    if p.dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device.type, dtype=p.dtype)


def _train_step(
    loaded: LoadedModel,
    layers: Sequence[int],
    groups: Sequence[CandidateGroup],
    options: MitigateOptions,
    params: dict[str, torch.nn.Parameter],
    master: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> tuple[float, float]:
    """One optimizer step on `groups`; returns its (InfoNCE, LM loss)."""
    trained = list(master.values()) if master is not None else list(params.values())
    with torch.enable_grad():
        with _autocast(params):
            nce, lm = group_losses(
                loaded, layers, groups, temperature=options.temperature, max_tokens=options.max_tokens,
                pooling=options.pooling,
            )
        loss = nce + options.lm_weight * lm
        if not torch.isfinite(loss):
            raise JobFailed(
                "training_diverged",
                f"the training loss became {float(loss)} at step {step + 1}; lower learning_rate",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if master is not None:  # the step in float32, written back in the model's dtype
            for name, p in params.items():
                master[name].grad = None if p.grad is None else p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if master is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(master[name])
    return float(nce.detach()), float(lm.detach())


def train_blocks(
    loaded: LoadedModel,
    layers: Sequence[int],
    train_groups: Sequence[CandidateGroup],
    val_groups: Sequence[CandidateGroup],
    options: MitigateOptions,
    ctx: JobContext | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainReport:
    """Tune blocks `layers` of `loaded.model` in place (see module doc); the model keeps the
    best epoch's weights. `options`: `app.schemas.MitigateOptions`."""
    if not train_groups or not val_groups:
        raise JobFailed("dataset_too_small", "contrastive tuning needs at least one training and one validation question")
    ctx = ctx or JobContext()
    model = loaded.model
    layers = sorted(set(int(i) for i in layers))
    params = block_parameters(loaded, layers)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    started = time.monotonic()
    steps_per_epoch = math.ceil(len(train_groups) / options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    rng = np.random.default_rng(options.seed)
    torch.manual_seed(options.seed)
    step = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        master = _master_weights(params)
        trained = list(master.values()) if master is not None else list(params.values())
        optimizer = torch.optim.AdamW(trained, lr=options.learning_rate, weight_decay=0.0)
        model.eval()
        flag_stats: dict[str, float] = {}
        fit_nce_before = _mean_infonce(loaded, layers, train_groups, options, flag_stats)
        best = initial = _validation_loss(loaded, layers, val_groups, options)
        if not math.isfinite(initial):
            raise JobFailed("training_diverged", "the validation loss of the untouched model is not finite")
        best_state, best_epoch, bad, history, stopped = snapshot(params), 0, 0, [], False
        for epoch in range(1, options.epochs + 1):
            model.train()
            losses: list[tuple[float, float]] = []
            for chunk in _chunks(rng.permutation(len(train_groups)).tolist(), options.batch_size):
                ctx.check_cancelled()
                batch = [train_groups[i] for i in chunk]
                losses.append(_train_step(loaded, layers, batch, options, params, master, optimizer, step))
                step += 1
                if on_step:
                    on_step(step, total_steps)
            model.eval()
            val = _validation_loss(loaded, layers, val_groups, options)
            history.append({
                "epoch": int(epoch),
                "train_infonce": float(np.mean([a for a, _ in losses])),
                "train_lm": float(np.mean([b for _, b in losses])),
                "val_loss": val,
            })
            if math.isfinite(val) and val < best:
                best, best_epoch, bad = val, epoch, 0
                best_state = snapshot(params)
            else:
                bad += 1
                if bad >= options.patience:
                    stopped = epoch < options.epochs
                    break
        restore(params, best_state)
        model.eval()
        fit_nce_after = _mean_infonce(loaded, layers, train_groups, options)
    finally:
        optimizer = master = None  # type: ignore[assignment]  # free them before the write-back
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
    if on_step:
        on_step(total_steps, total_steps)
    return TrainReport(
        layers=list(layers), epochs_run=len(history), steps=step, best_epoch=best_epoch,
        initial_val_loss=initial, best_val_loss=best, history=history, stopped_early=stopped,
        seconds=time.monotonic() - started,
        diagnostic=infonce_diagnostic(fit_nce_before, fit_nce_after, train_groups, flag_stats, options.pooling),
    )
