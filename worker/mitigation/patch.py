"""A mitigation patch as one safetensors file.

A weight patch (contrastive tuning) holds every parameter of the tuned blocks under its
full name in the model (`model.layers.28.mlp.down_proj.weight`); a method that changes no
weight holds its own small tensors (steering vectors, ...). In the safetensors metadata:
the method's name (`recipe.method`; absent in older files: a weight patch), the recipe that
produced the patch and a SHA-256 of each *base* parameter it was made from. `apply_patch`
checks those hashes against the model it is applied to, so a patch made from one base
model is refused on another (a different checkpoint, revision or dtype) instead of silently
producing a hybrid, and then lets the method (`worker.mitigation.methods`) apply it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.config import Settings
from app.schemas import PatchSpec
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from worker.modelzoo import LoadedModel

FORMAT = "layerscope-mitigation/1"


def block_parameters(loaded: LoadedModel, layers: Iterable[int]) -> dict[str, torch.nn.Parameter]:
    """The parameters of blocks `layers`, by full name; raises JobFailed for a layer that is not there."""
    model = loaded.model
    path = loaded.adapter.block_list_path(model)
    n_blocks = len(loaded.adapter.block_list(model))
    wanted = sorted(set(int(i) for i in layers))
    bad = [i for i in wanted if not 0 <= i < n_blocks]
    if bad:
        raise JobFailed("invalid_layers", f"layers {bad} do not exist: the model has blocks 0-{n_blocks - 1}")
    prefixes = tuple(f"{path}.{i}." for i in wanted)
    params = {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}
    if not params:
        raise JobFailed("invalid_layers", f"blocks {wanted} have no parameters to tune")
    return params


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on CPU)."""
    cpu = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{cpu.dtype}|{tuple(cpu.shape)}|".encode())
    h.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    return h.hexdigest()


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached copy of `params` (to restore or to compare with later)."""
    return {name: p.detach().clone() for name, p in params.items()}


def restore(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def save_patch(tuned: dict[str, torch.Tensor], base_digests: dict[str, str], recipe: dict[str, Any]) -> bytes:
    """The patch file: `tuned` tensors, with the base digests and the recipe as metadata."""
    from safetensors.torch import save

    metadata = {
        "format": FORMAT,
        "recipe": json.dumps(recipe, sort_keys=True, default=str),
        "base_sha256": json.dumps(base_digests, sort_keys=True),
    }
    return save({k: v.detach().to("cpu").contiguous() for k, v in tuned.items()}, metadata=metadata)


def read_patch(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(tensors, recipe, base digests) of a patch file; JobFailed `patch_invalid` when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise JobFailed("patch_invalid", f"the patch is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise JobFailed(
            "patch_invalid", f"the patch is not a layerscope mitigation patch (format {meta.get('format')!r})"
        )
    try:
        recipe = json.loads(meta.get("recipe") or "{}")
        digests = json.loads(meta.get("base_sha256") or "{}")
    except json.JSONDecodeError as exc:
        raise JobFailed("patch_invalid", f"the patch metadata is not valid JSON: {exc}") from exc
    if not isinstance(recipe, dict) or not isinstance(digests, dict):
        raise JobFailed("patch_invalid", "the patch metadata is not a recipe and a table of base digests")
    if _is_weight_patch(recipe) and set(digests) != set(tensors):
        raise JobFailed("patch_invalid", "the patch metadata does not describe every tensor in it")
    return tensors, recipe, digests


def _is_weight_patch(recipe: dict[str, Any]) -> bool:
    from worker.mitigation.methods import METHODS

    method = METHODS.get(str(recipe.get("method", "contrastive")))
    return method is None or method.changes_weights


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("bad header length")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def apply_patch(loaded: LoadedModel, data: bytes, *, expected_method: str | None = None) -> dict[str, Any]:
    """Apply a patch file to `loaded.model` for good, after checking that every base parameter
    it names exists with the same shape and dtype and still holds the value the patch was made
    from (a weight patch: every tensor it replaces). Returns the patch's recipe. JobFailed
    `patch_mismatch` when the model is another base or the patch was not made by
    `expected_method` (`model.patch.method`), `patch_invalid` for an unknown method."""
    from worker.mitigation.methods import METHODS

    tensors, recipe, digests = read_patch(data)
    made_by = str(recipe.get("method", "contrastive"))
    if expected_method is not None and made_by != expected_method:
        raise JobFailed("patch_mismatch", f"model.patch.method is {expected_method!r} but the patch was made by "
                                          f"{made_by!r}")
    method = METHODS.get(made_by)
    if method is None:
        raise JobFailed("patch_invalid", f"the patch was made by an unknown mitigation method {recipe.get('method')!r}")
    params = dict(loaded.model.named_parameters())
    missing = sorted(set(digests) - set(params))
    if missing:
        raise JobFailed(
            "patch_mismatch",
            f"the patch has {len(missing)} weights this model lacks (first: {missing[0]}); "
            f"it was made for {recipe.get('base_model', 'another model')!r}",
        )
    for name, digest in digests.items():
        p = params[name]
        t = tensors.get(name)
        if t is not None and (tuple(p.shape) != tuple(t.shape) or p.dtype != t.dtype):
            raise JobFailed(
                "patch_mismatch",
                f"{name}: the patch holds {tuple(t.shape)} {t.dtype}, the model {tuple(p.shape)} {p.dtype} "
                "(load the base with the dtype the patch was made with)",
            )
        if tensor_digest(p) != digest:
            raise JobFailed(
                "patch_mismatch",
                f"{name} differs from the base weights the patch was made from: it was made for "
                f"{recipe.get('base_model', 'another model')!r} ({recipe.get('base_source', '?')})",
            )
    method.load(loaded, tensors, recipe).apply(loaded)
    return recipe


def read_patch_source(patch: PatchSpec, settings: Settings, ctx: JobContext) -> bytes:
    """The patch file a model spec points at: an artifact of another analysis (read through
    `ctx.read_artifact`, which only sees the job's own project) or a file under the model
    roots, found as a local model path is."""
    from worker.modelzoo.loading import check_under_roots, local_candidate

    if patch.analysis_id is not None:
        if ctx.read_artifact is None:
            raise JobFailed("patch_not_found", "this worker cannot read other analyses' artifacts")
        names = patch.artifact_names()
        data = next((d for d in (ctx.read_artifact(patch.analysis_id, n) for n in names) if d is not None), None)
        if data is None:
            raise JobFailed(
                "patch_not_found",
                f"analysis {patch.analysis_id} has no {' or '.join(names)} artifact in this project (it must be a "
                "succeeded analysis with a mitigate stage; one that compared several methods needs "
                "model.patch.method)",
            )
    else:
        assert patch.path is not None
        found = local_candidate(patch.path, settings) or Path(patch.path).expanduser()
        path = check_under_roots(patch.path, found, settings.model_roots)
        if not path.is_file():
            raise JobFailed("patch_not_found", f"no patch file at {patch.path!r}")
        data = path.read_bytes()
    return data
