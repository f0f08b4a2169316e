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

The patch file holds no tensor; its metadata hold the recipe (`decoding`: layers, alpha,
repetition penalty) and the SHA-256 of the LM head's and final norm's parameters, so it is
refused on another base like every patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from worker.lm.dola import DolaSpec, clear_decoding, decoding_of, set_decoding
from worker.mitigation.methods.base import MethodInput, MitigationMethod, Patch
from worker.mitigation.patch import save_patch, tensor_digest
from worker.stage import JobFailed

if TYPE_CHECKING:
    from worker.modelzoo import LoadedModel


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
        report = {
            "decoding": spec.to_dict(),
            "final_norm": lens.norm_path,
            "note": "nothing is fitted: the recipe is the decoding setting",
        }
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
