"""What a mitigation method is (the registry in `worker.mitigation.methods`).

A method takes the model, the chosen layers (the top EAVSS layers, or the random-layer
control), the tuning and validation data, the options and their seed, and returns a
`Patch`: what it would change in the model, held apart from it. `fit` leaves the model
as it found it (also on failure or cancel); the stage then evaluates every patch the same
way (`Patch.applied` around the same hallucination analysis and perplexity) for every
method and its control, and writes the EAVSS variant's patch as the `mitigation.safetensors`
artifact, which `model.patch` applies at load (`worker.mitigation.patch.apply_patch`).

A patch is weights (`WeightPatch`: the tuned blocks' parameters, e.g. contrastive tuning)
or a recipe with small tensors applied by hooks (e.g. steering vectors, a decoding rule);
either way one safetensors file whose metadata carries the method's name, the recipe and
a SHA-256 of every base parameter it depends on, so it is refused on another base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from worker.mitigation.patch import save_patch, tensor_digest
from worker.stage import JobContext

if TYPE_CHECKING:
    from app.schemas import MitigateOptions
    from worker.mitigation.contrastive import CandidateGroup
    from worker.modelzoo import LoadedModel


@dataclass
class TuningData:
    """Candidate groups of the tuning and validation questions: per question the gold answer
    and wrong answers (the base model's own wrong greedy answer first, when it gave one)."""

    fit: list[CandidateGroup]
    val: list[CandidateGroup]
    own_wrong: int  # base answers the lexical rules call wrong
    negatives_mean: float


@dataclass
class MethodInput:
    loaded: LoadedModel
    variant: str  # "eavss" or "random" (the control): for messages only, both are fitted alike
    layers: list[int]
    data: TuningData
    options: MitigateOptions
    ctx: JobContext
    on_step: Callable[[int, int], None]  # fills the method's progress units

    @property
    def seed(self) -> int:
        return self.options.seed


class Patch:
    """What a method fitted, held apart from the model: `apply` puts it into a model,
    `remove` takes it out again (bit-identical base). `report` is the method's own account
    (training history, chosen strength, diagnostics) and lands in summary["training"];
    `warnings` are prefixed with the variant by the stage."""

    method: str
    layers: list[int]
    report: dict[str, Any]
    warnings: list[str]

    def apply(self, loaded: LoadedModel) -> None:
        raise NotImplementedError

    def remove(self, loaded: LoadedModel) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, loaded: LoadedModel) -> Iterator[None]:
        self.apply(loaded)
        try:
            yield
        finally:
            self.remove(loaded)

    def weight_change(self, loaded: LoadedModel) -> dict[int, float] | None:
        """Per changed block ||W_patched - W_base|| / ||W_base||; None when no weight changes."""
        return None

    def to_bytes(self, recipe: dict[str, Any]) -> bytes:
        """The patch file, with `recipe` (the stage's record of how it was made) as metadata."""
        raise NotImplementedError


@dataclass
class WeightPatch(Patch):
    """New values of some of the model's parameters (the tuned blocks)."""

    method: str
    layers: list[int]
    base: dict[str, torch.Tensor] | None  # full parameter name -> base value (None: read from a file)
    tuned: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def apply(self, loaded: LoadedModel) -> None:
        _copy_into(loaded, self.tuned)

    def remove(self, loaded: LoadedModel) -> None:
        if self.base is None:
            raise RuntimeError("this weight patch was read from a file and keeps no base weights to restore")
        _copy_into(loaded, self.base)

    def weight_change(self, loaded: LoadedModel) -> dict[int, float] | None:
        if self.base is None:
            return None
        path = loaded.adapter.block_list_path(loaded.model) + "."
        num: dict[int, float] = {}
        den: dict[int, float] = {}
        for name, b in self.base.items():
            layer = int(name[len(path):].split(".", 1)[0])
            num[layer] = num.get(layer, 0.0) + float((self.tuned[name].double() - b.double()).pow(2).sum())
            den[layer] = den.get(layer, 0.0) + float(b.double().pow(2).sum())
        return {k: (num[k] ** 0.5) / (den[k] ** 0.5 or 1.0) for k in num}

    def to_bytes(self, recipe: dict[str, Any]) -> bytes:
        if self.base is None:
            raise RuntimeError("this weight patch was read from a file and keeps no base digests")
        digests = {n: tensor_digest(t) for n, t in self.base.items()}
        return save_patch(self.tuned, digests, {**recipe, "method": self.method})


def _copy_into(loaded: LoadedModel, values: dict[str, torch.Tensor]) -> None:
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, t in values.items():
            params[name].copy_(t.to(params[name].device))


class MitigationMethod:
    """One method (module doc); a subclass per module, registered in `METHODS`."""

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # the MitigateOptions fields it reads
    changes_weights: ClassVar[bool] = True
    units: ClassVar[int] = 20  # progress units of one fit

    def fit(self, inp: MethodInput) -> Patch:
        """The patch for `inp.layers`; the model is left as it was found."""
        raise NotImplementedError

    def load(self, loaded: LoadedModel, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> Patch:
        """The patch a file holds (`tensors` and `recipe` read and checked against the base by
        `worker.mitigation.patch.apply_patch`), ready to `apply` to `loaded`."""
        raise NotImplementedError


def load_weight_patch(
    method: str, loaded: LoadedModel, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]
) -> WeightPatch:
    """A `WeightPatch` from a file's tensors (applied for good: it keeps no base to restore)."""
    layers = [int(x) for x in recipe.get("layers", [])]
    if not layers:  # an older file: the layers from the parameter names
        path = loaded.adapter.block_list_path(loaded.model) + "."
        layers = sorted({int(n[len(path):].split(".", 1)[0]) for n in tensors if n.startswith(path)})
    return WeightPatch(method, layers, None, dict(tensors))
