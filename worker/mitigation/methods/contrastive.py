"""Contrastive tuning of the chosen blocks (docs/method.md section 7; the training itself is
`worker.mitigation.contrastive.train_blocks`): the patch is the tuned blocks' weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from worker.mitigation.contrastive import train_blocks
from worker.mitigation.methods.base import MethodInput, MitigationMethod, WeightPatch, load_weight_patch
from worker.mitigation.patch import block_parameters, restore, snapshot

if TYPE_CHECKING:
    from worker.modelzoo import LoadedModel


class Contrastive(MitigationMethod):
    name: ClassVar[str] = "contrastive"
    description: ClassVar[str] = (
        "InfoNCE between the question and the gold vs wrong answers at the chosen blocks' outputs, plus "
        "lm_weight x the gold answer's LM loss; only the chosen blocks are tuned, early stopping on validation"
    )
    options: ClassVar[tuple[str, ...]] = (
        "temperature", "lm_weight", "pooling", "learning_rate", "epochs", "patience", "batch_size", "max_tokens", "seed",
    )
    changes_weights: ClassVar[bool] = True

    def fit(self, inp: MethodInput) -> WeightPatch:
        params = block_parameters(inp.loaded, inp.layers)
        base = snapshot(params)
        try:
            report = train_blocks(inp.loaded, inp.layers, inp.data.fit, inp.data.val, inp.options, inp.ctx,
                                  on_step=inp.on_step)
            tuned = snapshot(params)
        finally:
            restore(params, base)
        warnings = []
        if report.best_epoch == 0:
            warnings.append("no epoch lowered the validation loss; the tuned weights equal the base")
        warnings.extend(diagnostic_warnings(report.diagnostic))
        return WeightPatch(self.name, list(inp.layers), base, tuned, report.to_dict(), warnings)

    def load(self, loaded: LoadedModel, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> WeightPatch:
        return load_weight_patch(self.name, loaded, tensors, recipe)


def diagnostic_warnings(d: dict[str, Any]) -> list[str]:
    """What the InfoNCE diagnostic (`contrastive.infonce_diagnostic`) has to say, if anything."""
    if not d or d.get("tuning_infonce_after") is None:
        return []
    out = []
    share = d.get("flagged_share")
    if d.get("pooling") == "unflagged_mean" and share is not None and share > 0.5:
        # e.g. Gemma-3: nearly every position has one dimension over 100 x the median |h|, so
        # the rule flags them all and a span falls back to its last position.
        out.append(f"the massive-activation rule flagged {share:.0%} of the pooled positions, so `unflagged_mean` "
                   "pooled mostly last positions (a span whose every position is flagged falls back to its last); "
                   "on this model `last_token` says so explicitly")
    values = f"{d['tuning_infonce_before']:.3f} -> {d['tuning_infonce_after']:.3f} on the tuning data"
    if d["at_chance"]:
        out.append(f"the contrastive (InfoNCE) loss stayed at chance ({values}; chance {d['chance']:.3f}, "
                   f"pooling {d['pooling']}): it learned nothing, whatever changed came from the LM term")
    elif d["did_not_fall"]:
        out.append(f"the contrastive (InfoNCE) loss did not fall ({values}; pooling {d['pooling']})")
    return out
