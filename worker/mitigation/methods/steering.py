"""Activation steering at the chosen blocks (inference-time intervention, Li et al. 2023):
no weight changes; the patch is one vector per chosen block, added to that block's output
at every position.

Fit (`Steering.fit`), on the tuning questions only:

1. Direction: every candidate of every tuning group (`Question: q\\nAnswer: a`, the gold
   answer and the wrong ones: the base model's own wrong answer and other questions'
   answers) runs through the base model; at each chosen block's output the answer span is
   pooled (`MitigateOptions.pooling`, as the contrastive anchor: massive-activation positions
   left out by default). The direction is the mean difference, gold minus wrong, of those
   pooled vectors (ITI's "mass mean shift"), scaled to unit length; sigma is the standard
   deviation of every candidate's projection on it.
2. Strength: for each alpha in `steering_strengths` (0 always included) the vector
   alpha x sigma x direction is added at the chosen blocks and the validation questions are
   scored as multiple choice: is the gold answer's mean log-probability per token the
   highest of its group? The alpha with the highest validation accuracy is kept (ties: the
   smaller alpha, so one that helps no more than 0 gives the base model back, and the
   report says so), among the alphas that keep the gold answers' mean log-probability per
   token within `steering_max_logprob_drop` nats of alpha 0's (a fluency guard, as ITI
   watches cross-entropy: without it a one-question gain on a small validation set chose
   alpha 16 on TruthfulQA, at -12.3 against -3.1 nats per gold token, and the steered model
   answered nothing right on the test split). The test split is never looked at.

The directions are computed with the unsteered model at every chosen block (steering block
i then also moves block j > i's input; the strength is chosen with all of them on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from worker.lm.model import model_device
from worker.mitigation.contrastive import CandidateGroup, encode_groups, massive_positions, pool
from worker.mitigation.methods.base import MethodInput, MitigationMethod, Patch
from worker.mitigation.patch import block_parameters, save_patch, tensor_digest
from worker.stage import JobFailed

if TYPE_CHECKING:
    from app.schemas import MitigateOptions
    from worker.modelzoo import LoadedModel

KEY = "steering."  # tensor names in the patch file: steering.<block index>


@dataclass
class SteeringPatch(Patch):
    """One vector per block, added to the block's output (a forward hook) while applied."""

    method: str
    layers: list[int]
    vectors: dict[int, torch.Tensor]  # block index -> [hidden] (float32)
    digests: dict[str, str] = field(default_factory=dict)  # the steered blocks' base parameters
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)

    def apply(self, loaded: LoadedModel) -> None:
        if self._handles:
            raise RuntimeError("this steering patch is applied already")
        blocks = loaded.adapter.blocks(loaded.model)
        for layer, v in self.vectors.items():
            if not bool(v.any()):  # strength 0: no hook, the base model exactly
                continue
            self._handles.append(blocks[layer].module.register_forward_hook(_adder(v)))

    def remove(self, loaded: LoadedModel) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def to_bytes(self, recipe: dict[str, Any]) -> bytes:
        tensors = {f"{KEY}{k}": v.detach().float().cpu() for k, v in self.vectors.items()}
        return save_patch(tensors, self.digests, {**recipe, "method": self.method, "layers": self.layers})


def _adder(v: torch.Tensor) -> Callable[..., Any]:
    cache: dict[tuple[Any, Any], torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        y = output[0] if isinstance(output, tuple) else output
        key = (y.dtype, y.device)
        if key not in cache:
            cache[key] = v.to(device=y.device, dtype=y.dtype)
        y = y + cache[key]
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook


def _block_digests(loaded: LoadedModel, layers: Sequence[int]) -> dict[str, str]:
    return {n: tensor_digest(p) for n, p in block_parameters(loaded, layers).items()}


class Steering(MitigationMethod):
    name: ClassVar[str] = "steering"
    description: ClassVar[str] = (
        "inference-time intervention: add alpha x sigma x (mean gold minus mean wrong answer direction) to the "
        "chosen blocks' outputs; alpha chosen on the validation questions as multiple choice"
    )
    options: ClassVar[tuple[str, ...]] = (
        "pooling", "steering_strengths", "steering_max_logprob_drop", "max_tokens", "batch_size")
    changes_weights: ClassVar[bool] = False

    def fit(self, inp: MethodInput) -> SteeringPatch:
        loaded, options, layers = inp.loaded, inp.options, sorted(inp.layers)
        if not inp.data.fit or not inp.data.val:
            raise JobFailed("dataset_too_small", "steering needs at least one tuning and one validation question")
        strengths = sorted({0.0, *(float(a) for a in options.steering_strengths)})
        total = 1 + len(strengths)
        directions, sigma, counts = steering_directions(loaded, layers, inp.data.fit, options)
        inp.on_step(1, total)
        curve = []
        for i, alpha in enumerate(strengths):
            inp.ctx.check_cancelled()
            trial = SteeringPatch(self.name, layers, {k: alpha * sigma[k] * d for k, d in directions.items()})
            with trial.applied(loaded):
                acc, gold_lp = multiple_choice(loaded, inp.data.val, options)
            curve.append({"strength": alpha, "val_mc_accuracy": acc, "val_gold_logprob": gold_lp})
            inp.on_step(2 + i, total)
        floor = curve[0]["val_gold_logprob"] - options.steering_max_logprob_drop  # curve[0]: alpha 0
        for c in curve:
            c["fluent"] = bool(c["strength"] == 0.0 or c["val_gold_logprob"] >= floor)
        rank = lambda c: (c["val_mc_accuracy"], -c["strength"])  # noqa: E731
        best = max((c for c in curve if c["fluent"]), key=rank)
        alpha = float(best["strength"])
        warnings = []
        unguarded = max(curve, key=rank)
        if unguarded is not best:
            warnings.append(
                f"steering strength {unguarded['strength']:g} scored best on the validation questions "
                f"({unguarded['val_mc_accuracy']:.3f} against {best['val_mc_accuracy']:.3f}) but lowered the gold "
                f"answers' log-probability per token from {curve[0]['val_gold_logprob']:.2f} to "
                f"{unguarded['val_gold_logprob']:.2f} (more than steering_max_logprob_drop = "
                f"{options.steering_max_logprob_drop:g}); {alpha:g} was kept"
            )
        if alpha == 0.0:
            warnings.append("no steering strength beat 0 on the validation questions; the steering patch adds nothing")
        report = {
            "strength": alpha, "strengths": curve, "sigma": {str(k): round(v, 6) for k, v in sigma.items()},
            "direction": "mean difference (gold minus wrong), unit length", "pooling": options.pooling,
            "tuning_candidates": counts, "validation_questions": len(inp.data.val),
        }
        vectors = {k: alpha * sigma[k] * d for k, d in directions.items()}
        return SteeringPatch(self.name, layers, vectors, _block_digests(loaded, layers), report, warnings)

    def load(self, loaded: LoadedModel, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> SteeringPatch:
        n_blocks = len(loaded.adapter.blocks(loaded.model))
        vectors: dict[int, torch.Tensor] = {}
        for name, t in tensors.items():
            index = name.removeprefix(KEY)
            if not name.startswith(KEY) or not index.isdigit() or int(index) >= n_blocks or t.dim() != 1:
                raise JobFailed("patch_invalid", f"{name}: not a steering vector of a block of this model")
            vectors[int(index)] = t.float()
        return SteeringPatch(self.name, sorted(vectors), vectors, report=dict(recipe.get("training") or {}))


def _forward_groups(
    loaded: LoadedModel, layers: Sequence[int], groups: Sequence[CandidateGroup], options: MitigateOptions,
) -> list[tuple[Any, dict[int, torch.Tensor], torch.Tensor]]:
    """Per chunk of groups: (its encoding, block output per layer, logits), no gradients."""
    model = loaded.model
    device = model_device(model)
    blocks = loaded.adapter.blocks(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(groups), options.batch_size):
            enc = encode_groups(loaded.tokenizer, groups[start : start + options.batch_size], options.max_tokens)
            captured: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
            handles = [blocks[li].sites["block_output"].register(captured[li].append) for li in layers]
            try:
                logits = model(input_ids=enc.ids.to(device), attention_mask=enc.mask.to(device)).logits
            finally:
                for h in handles:
                    h.remove()
            out.append((enc, {li: torch.cat(v, 0).float() for li, v in captured.items()}, logits.float()))
    return out


def steering_directions(
    loaded: LoadedModel, layers: Sequence[int], groups: Sequence[CandidateGroup], options: MitigateOptions,
) -> tuple[dict[int, torch.Tensor], dict[int, float], dict[str, int]]:
    """(unit direction per block, sigma per block, counts): module doc, step 1."""
    pos: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    neg: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    for enc, hidden, _ in _forward_groups(loaded, layers, groups, options):
        is_pos = torch.zeros(enc.ids.shape[0], dtype=torch.bool)
        is_pos[[g[0] for g in enc.groups]] = True
        for li, h in hidden.items():
            mask = enc.mask.to(h.device).bool()
            flagged = massive_positions(h, mask) if options.pooling == "unflagged_mean" else None
            pooled = pool(h, enc.answer.to(h.device), flagged, options.pooling).cpu()
            pos[li].append(pooled[is_pos])
            neg[li].append(pooled[~is_pos])
    directions: dict[int, torch.Tensor] = {}
    sigma: dict[int, float] = {}
    for li in layers:
        p, n = torch.cat(pos[li]), torch.cat(neg[li])
        diff = p.mean(0) - n.mean(0)
        norm = float(diff.norm())
        if not norm > 0 or not np.isfinite(norm):
            raise JobFailed("training_diverged", f"block {li}: gold and wrong answers give no direction to steer by")
        d = diff / norm
        directions[li] = d
        sigma[li] = float((torch.cat([p, n]) @ d).std())
    n_pos = sum(len(x) for x in pos[layers[0]])
    n_neg = sum(len(x) for x in neg[layers[0]])
    return directions, sigma, {"gold": n_pos, "wrong": n_neg}


def multiple_choice(
    loaded: LoadedModel, groups: Sequence[CandidateGroup], options: MitigateOptions,
) -> tuple[float, float]:
    """(share of groups whose gold answer has the highest mean log-probability per token,
    mean of the gold answers' mean log-probability per token)."""
    hits: list[float] = []
    gold: list[float] = []
    for enc, _, logits in _forward_groups(loaded, [], groups, options):
        ids = enc.ids.to(logits.device)
        target = enc.answer.to(logits.device)[:, 1:]
        lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mean_lp = (lp * target).sum(1) / target.sum(1).clamp_min(1)
        for rows in enc.groups:
            scores = mean_lp[rows]
            hits.append(1.0 if int(scores.argmax()) == 0 else 0.0)
            gold.append(float(scores[0]))
    return float(np.mean(hits)), float(np.mean(gold))
