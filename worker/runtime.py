"""What a job ran on, recorded in its summary as `runtime`; and the guard of `gpu`-queue jobs.

`recording()` wraps a job: it writes the worker's environment (torch, CUDA, transformers and
accelerate versions, `CUDA_VISIBLE_DEVICES`, the GPUs it sees, the worker and queue) when the job
starts, and adds the device, dtype, GPU name and device-map placement when `load_model` reports
a model (`note_load`). A job that loads nothing (it failed first) still records where it ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from app.schemas import ModelSpec
from worker.stage import JobFailed

if TYPE_CHECKING:
    from worker.modelzoo import LoadedModel

log = logging.getLogger("layerscope.worker")

_on_load: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar("on_load", default=None)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """This process's libraries and the GPUs it can see."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA version torch was built with; None on a CPU build
        "cuda_available": cuda,
        "transformers": transformers.__version__,
        "accelerate": _version("accelerate"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """Device, dtype, GPU name and placement of a `LoadedModel`."""
    import torch

    model = loaded.model
    param = next(iter(model.parameters()), None)
    device = loaded.device
    placement = getattr(model, "hf_device_map", None)
    counts: dict[str, int] | None = None
    if placement:
        counts = {}
        for target in placement.values():
            key = f"cuda:{target}" if isinstance(target, int) else str(target)
            counts[key] = counts.get(key, 0) + 1
    return {
        "model": loaded.name,
        "source": loaded.source,
        "device": str(device),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device_map": counts,  # modules per device when the model is spread (accelerate), else None
    }


@contextlib.contextmanager
def recording(write: Callable[[dict[str, Any]], None], worker: str, queue: str) -> Iterator[dict[str, Any]]:
    """Record the runtime of the job run inside; `write` stores the block (called on every change)."""
    block: dict[str, Any] = {
        "worker": worker, "queue": queue, **environment(), "device": None, "dtype": None, "gpu_name": None,
    }
    write(block)
    loads: list[dict[str, Any]] = []

    def on_load(loaded: LoadedModel) -> None:
        entry = describe(loaded)
        if entry in loads:
            return
        loads.append(entry)
        block.update({k: loads[0][k] for k in ("device", "dtype", "gpu_name", "device_map", "source")})
        if len(loads) > 1:
            block["models"] = list(loads)
        write(block)

    token = _on_load.set(on_load)
    try:
        yield block
    finally:
        _on_load.reset(token)


def note_load(loaded: LoadedModel) -> None:
    """Called by `load_model` for every model it hands out (cache hits included)."""
    callback = _on_load.get()
    if callback is not None:
        callback(loaded)


def require_gpu(model: ModelSpec, worker: str) -> None:
    """A job on the `gpu` queue runs on CUDA or not at all (no silent CPU fallback of `device: auto`)."""
    import torch

    if torch.cuda.is_available():
        return
    raise JobFailed(
        "gpu_unavailable",
        f"This job was routed to the gpu queue (device {model.device!r}"
        + (", a device_map" if model.device_map is not None else "")
        + f") but worker {worker} sees no CUDA device (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); it is not run on the CPU instead. Check the worker's GPU "
        "(nvidia-smi, the container's GPU reservation), or resubmit with device 'cpu' to run it on a CPU worker.",
    )
