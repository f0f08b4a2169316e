"""Layer-contrast decoding at the chosen blocks (DoLa, Chuang et al. 2024; the decoding rule
is `worker.lm.dola`, docs/method.md section 8): no weight changes and nothing fitted; the
patch is a recipe, the decoding setting, which `model.patch` installs at load.

The chosen blocks are the premature layers: one block is static DoLa, several are DoLa's
dynamic selection among them (per row and step the block whose next-token distribution is
farthest, by Jensen-Shannon divergence, from the final layer's). So the `eavss` variant
contrasts with the top-k EAVSS blocks, the control with as many random other blocks, and
explicit `layers` give DoLa's own bucket (e.g. the lower half of the network, as the paper
does). The final layer itself among them changes nothing (its divergence is 0 and its
contrast is 0: greedy decoding).

Validation diagnostic (nothing is chosen by it): the validation groups scored as multiple
choice, once with the final layer's log-probabilities and once with DoLa's (teacher-forced:
at each answer position the contrast `F` of worker/lm/dola.py, normalised over the plausible
set as DoLa's scoring does, a token outside it scoring `IMPLAUSIBLE`): is the gold answer's
mean score per token the highest of its group? `report.validation` holds both accuracies.

The patch file holds no tensor; its metadata hold the recipe (`decoding`: layers, alpha,
repetition penalty) and the SHA-256 of the LM head's and final norm's parameters, so it is
refused on another base like every patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from worker.lm.dola import DolaSpec, clear_decoding, contrast_scores, decoding_of, js_divergence, set_decoding
from worker.lm.model import model_device
from worker.mitigation.contrastive import CandidateGroup, encode_groups
from worker.mitigation.methods.base import MethodInput, MitigationMethod, Patch
from worker.mitigation.patch import save_patch, tensor_digest
from worker.stage import JobFailed

if TYPE_CHECKING:
    from app.schemas import MitigateOptions
    from worker.modelzoo import LoadedModel

IMPLAUSIBLE = -1000.0  # the teacher-forced score of a token outside the plausible set (DoLa's value)


@dataclass
class DolaPatch(Patch):
    """The DoLa setting, installed on the model while applied (`worker.lm.dola.set_decoding`)."""

    method: str
    layers: list[int]
    spec: DolaSpec
    digests: dict[str, str] = field(default_factory=dict)  # the LM head's and final norm's base parameters
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def apply(self, loaded: LoadedModel) -> None:
        if decoding_of(loaded.model) is not None:
            raise RuntimeError("this model has a decoding setting already")
        set_decoding(loaded.model, self.spec)

    def remove(self, loaded: LoadedModel) -> None:
        clear_decoding(loaded.model)

    def to_bytes(self, recipe: dict[str, Any]) -> bytes:
        return save_patch({}, self.digests, {**recipe, "method": self.method, "layers": self.layers,
                                             "decoding": self.spec.to_dict()})


def head_digests(loaded: LoadedModel) -> dict[str, str]:
    """SHA-256 of the parameters DoLa reads every layer through (final norm, projection, LM
    head), by their names in the model (a tied head under its embedding's name)."""
    lens = loaded.adapter.logit_lens(loaded.model)
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    out: dict[str, str] = {}
    for module in (lens.norm, lens.projection, lens.head):
        if module is None:
            continue
        for p in module.parameters():
            if id(p) in names:
                out[names[id(p)]] = tensor_digest(p)
    return out


def _spec(loaded: LoadedModel, layers: list[int], alpha: float, penalty: float) -> DolaSpec:
    n_blocks = len(loaded.adapter.blocks(loaded.model))
    bad = [i for i in layers if not 0 <= i < n_blocks]
    if bad:
        raise JobFailed("invalid_layers", f"DoLa premature layers {bad} do not exist: the model has blocks "
                                          f"0-{n_blocks - 1}")
    try:
        return DolaSpec(tuple(sorted(layers)), alpha=alpha, repetition_penalty=penalty)
    except ValueError as exc:
        raise JobFailed("patch_invalid", f"not a DoLa setting: {exc}") from exc


class Dola(MitigationMethod):
    name: ClassVar[str] = "dola"
    description: ClassVar[str] = (
        "layer-contrast decoding: the next token maximises log q_final - log q_premature among the tokens the final "
        "layer finds plausible (>= dola_alpha x its top probability); the chosen blocks are the premature layers "
        "(several: the one with the largest Jensen-Shannon divergence per step); no weights change"
    )
    options: ClassVar[tuple[str, ...]] = ("dola_alpha", "dola_repetition_penalty")
    changes_weights: ClassVar[bool] = False
    units: ClassVar[int] = 1

    def fit(self, inp: MethodInput) -> DolaPatch:
        loaded = inp.loaded
        spec = _spec(loaded, list(inp.layers), inp.options.dola_alpha, inp.options.dola_repetition_penalty)
        lens = loaded.adapter.logit_lens(loaded.model)
        final = len(loaded.adapter.blocks(loaded.model)) - 1
        warnings = []
        if spec.layers == (final,):
            warnings.append(f"the only premature layer is the last block ({final}): DoLa decodes as greedy")
        report: dict[str, Any] = {
            "decoding": spec.to_dict(),
            "final_norm": lens.norm_path,
            "note": "nothing is fitted: the recipe is the decoding setting",
        }
        if inp.data.val:
            base_acc, dola_acc = validation_multiple_choice(loaded, spec, inp.data.val, inp.options)
            report["validation"] = {"questions": len(inp.data.val), "mc_accuracy_base": base_acc,
                                    "mc_accuracy_dola": dola_acc}
        inp.on_step(1, 1)
        return DolaPatch(self.name, list(spec.layers), spec, head_digests(loaded), report, warnings)

    def load(self, loaded: LoadedModel, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> DolaPatch:
        if tensors:
            raise JobFailed("patch_invalid", "a DoLa patch holds no tensors; this one does")
        setting = recipe.get("decoding")
        if not isinstance(setting, dict) or not isinstance(setting.get("layers"), list):
            raise JobFailed("patch_invalid", "the DoLa patch's recipe has no decoding setting (decoding.layers)")
        try:
            layers = [int(i) for i in setting["layers"]]
            alpha = float(setting.get("alpha", 0.1))
            penalty = float(setting.get("repetition_penalty", 1.0))
        except (TypeError, ValueError) as exc:
            raise JobFailed("patch_invalid", f"the DoLa patch's decoding setting is not valid: {exc}") from exc
        spec = _spec(loaded, layers, alpha, penalty)
        return DolaPatch(self.name, list(spec.layers), spec, report=dict(recipe.get("training") or {}))


def _keeper(into: dict[int, torch.Tensor], i: int) -> Any:
    def keep(t: torch.Tensor) -> None:
        into[i] = t.detach()
    return keep


@torch.no_grad()
def validation_multiple_choice(
    loaded: LoadedModel, spec: DolaSpec, groups: Sequence[CandidateGroup], options: MitigateOptions,
) -> tuple[float, float]:
    """(base, DoLa) multiple-choice accuracy on `groups` (module doc, validation diagnostic)."""
    model = loaded.model
    device = model_device(model)
    blocks = loaded.adapter.blocks(model)
    lens = loaded.adapter.logit_lens(model)
    final = len(blocks) - 1
    hits_base: list[float] = []
    hits_dola: list[float] = []
    for start in range(0, len(groups), options.batch_size):
        enc = encode_groups(loaded.tokenizer, groups[start : start + options.batch_size], options.max_tokens)
        captured: dict[int, torch.Tensor] = {}
        handles = [blocks[i].sites["block_output"].register(_keeper(captured, i)) for i in spec.layers if i != final]
        try:
            logits = model(input_ids=enc.ids.to(device), attention_mask=enc.mask.to(device)).logits
        finally:
            for h in handles:
                h.remove()
        base_scores, dola_scores = [], []
        for r in range(enc.ids.shape[0]):
            pos = torch.nonzero(enc.answer[r, 1:]).squeeze(-1)  # predicting answer token t + 1 at t
            target = enc.ids[r, 1:][pos].to(logits.device)
            lp_n = torch.log_softmax(logits[r, pos].float(), dim=-1)
            prem = torch.stack([lp_n if i == final else
                                torch.log_softmax(lens(captured[i][r, pos]).to(lp_n.device), dim=-1)
                                for i in spec.layers])  # [k, answer tokens, vocab]
            chosen = js_divergence(lp_n, prem).argmax(dim=0)
            f = contrast_scores(lp_n, prem[chosen, torch.arange(len(pos), device=lp_n.device)], spec.alpha)
            f = torch.log_softmax(f, dim=-1).nan_to_num(nan=IMPLAUSIBLE, neginf=IMPLAUSIBLE)
            base_scores.append(float(lp_n.gather(1, target[:, None]).mean()))
            dola_scores.append(float(f.gather(1, target[:, None]).mean()))
        for rows in enc.groups:
            hits_base.append(1.0 if int(np.argmax([base_scores[i] for i in rows])) == 0 else 0.0)
            hits_dola.append(1.0 if int(np.argmax([dola_scores[i] for i in rows])) == 0 else 0.0)
    return float(np.mean(hits_base)), float(np.mean(hits_dola))
