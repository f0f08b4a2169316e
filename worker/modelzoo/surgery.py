"""Removing transformer blocks from a model (used by pruning and by the `cim` scorer).

- `remove_blocks(model, indices)` returns a model without the given blocks (0-based
  positions in the adapter's block list). It works on a `copy.deepcopy` of the model
  unless `inplace=True`: **the model a `LoadedModel` holds is shared** (the process
  cache of `worker.modelzoo.load_model` hands the same object to later jobs), so it
  must never be mutated. What changes:
  * the block list (the adapter's `block_list_path`, e.g. `model.layers`,
    `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`, `encoder.layer`) is
    replaced by a new `nn.ModuleList` of the kept blocks, in order;
  * every integer `layer_idx` / `layer_id` attribute inside a kept block (the
    attention's index into the KV cache) is renumbered to the block's new position;
  * the config that describes those blocks (`model.config`, or its `text_config`
    when the blocks live under `language_model`) gets the new count in every
    layer-count field that held the old one (`num_hidden_layers`, `n_layer`,
    `num_layers`, `n_layers`), per-layer lists of the old length whose name contains
    "layer" (e.g. Gemma3's `layer_types`) are subset to the kept blocks, and lists of
    layer indices (`mlp_only_layers`) are remapped.
  The result runs, generates with its KV cache, saves with `save_pretrained` and loads
  back with `from_pretrained` as an ordinary model with fewer layers.
  Refused (`JobFailed("prune_unsupported")`): removing every block, heterogeneous
  per-layer configs, and GPT-2 with `scale_attn_by_inverse_layer_idx` (its attention
  scaling depends on the layer index, so a reloaded pruned model would differ).
- `pruned_view(model, indices)`: the same change applied in place and undone on exit
  (in `finally`, errors included): nothing is copied, and the model is exactly as before
  afterwards (the same block objects, indices and config values). The prune stage and
  the `cim` scorer evaluate candidate prunings of the loaded model this way. The model
  is shared by the worker process (one job at a time), so nothing else may run on it
  while a view is open.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from worker.modelzoo.adapters import ArchitectureAdapter, adapter_for
from worker.stage import JobFailed

__all__ = ["block_count", "pruned_view", "remove_blocks"]

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_INDEX_LIST_FIELDS = ("mlp_only_layers",)
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")


def _adapter(model: torch.nn.Module, adapter: ArchitectureAdapter | None) -> ArchitectureAdapter:
    return adapter if adapter is not None else adapter_for(model)


def block_count(model: torch.nn.Module, adapter: ArchitectureAdapter | None = None) -> int:
    return len(_adapter(model, adapter).block_list(model))


def _block_config(model: torch.nn.Module, path: str) -> Any:
    """The config object whose layer fields describe the block list at `path`."""
    config = model.config
    text = getattr(config, "text_config", None)
    if text is not None and text is not config and "language_model" in path:
        return text
    return config


@dataclass
class _Undo:
    parent: torch.nn.Module
    attr: str
    old_list: torch.nn.ModuleList
    index_attrs: list[tuple[torch.nn.Module, str, Any]]
    config: Any
    config_fields: dict[str, Any]


def _check_indices(indices: Iterable[int], n: int) -> list[int]:
    drop = sorted({int(i) for i in indices})
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise JobFailed("prune_invalid", f"layer indices {bad} are out of range for a model with {n} blocks")
    if len(drop) >= n:
        raise JobFailed("prune_unsupported", f"cannot remove all {n} blocks of the model")
    return drop


def _apply(model: torch.nn.Module, indices: Iterable[int], adapter: ArchitectureAdapter | None) -> _Undo:
    """Remove the blocks in place; returns what is needed to undo it."""
    path = _adapter(model, adapter).block_list_path(model)
    old_list = _adapter(model, adapter).block_list(model)
    n = len(old_list)
    drop = _check_indices(indices, n)
    keep = [i for i in range(n) if i not in set(drop)]
    new_pos = {old: new for new, old in enumerate(keep)}
    config = _block_config(model, path)
    if getattr(config, "is_heterogeneous", False):
        raise JobFailed(
            "prune_unsupported", "pruning a model with a heterogeneous per-layer config is not supported"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise JobFailed(
            "prune_unsupported",
            "this GPT-2 scales attention by its layer index (scale_attn_by_inverse_layer_idx), so a pruned "
            "model would not reload as the same model; pruning it is not supported",
        )

    # Config fields, computed before anything changes.
    updates: dict[str, Any] = {}
    for name in LAYER_COUNT_FIELDS:
        if getattr(config, name, None) == n:
            updates[name] = len(keep)
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and "layer" in name and name not in updates:
            if name in LAYER_INDEX_LIST_FIELDS:
                continue
            updates[name] = type(value)(value[i] for i in keep)
    for name in LAYER_INDEX_LIST_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            updates[name] = type(value)(new_pos[i] for i in value if i in new_pos)

    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    undo = _Undo(parent, attr, old_list, [], config, {k: getattr(config, k, None) for k in updates})
    try:
        for old in keep:
            for module in old_list[old].modules():
                for name in LAYER_INDEX_ATTRS:
                    value = getattr(module, name, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        undo.index_attrs.append((module, name, value))
                        setattr(module, name, new_pos[old])
        setattr(parent, attr, torch.nn.ModuleList([old_list[i] for i in keep]))
        for name, value in updates.items():
            setattr(config, name, value)
    except BaseException:
        _undo(undo)
        raise
    return undo


def _undo(undo: _Undo) -> None:
    setattr(undo.parent, undo.attr, undo.old_list)
    for module, name, value in undo.index_attrs:
        setattr(module, name, value)
    # Restore the count before per-layer lists, so a validating config never sees a mismatch.
    for name in sorted(undo.config_fields, key=lambda k: k not in LAYER_COUNT_FIELDS):
        setattr(undo.config, name, undo.config_fields[name])


def remove_blocks(
    model: torch.nn.Module,
    indices: Iterable[int],
    *,
    adapter: ArchitectureAdapter | None = None,
    inplace: bool = False,
) -> torch.nn.Module:
    """A model without the blocks at `indices` (see module doc). Works on a deepcopy
    unless `inplace=True`; never pass `inplace=True` with a `LoadedModel.model`."""
    target = model if inplace else copy.deepcopy(model)
    _apply(target, indices, adapter)
    return target


@contextmanager
def pruned_view(
    model: torch.nn.Module, indices: Iterable[int], *, adapter: ArchitectureAdapter | None = None
) -> Iterator[torch.nn.Module]:
    """Temporarily remove blocks from `model` in place (restored on exit, errors included).
    Nothing else may use `model` meanwhile: it would see the pruned model."""
    undo = _apply(model, indices, adapter)
    try:
        yield model
    finally:
        _undo(undo)


