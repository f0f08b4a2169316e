"""Which worker queue a job goes to, decided at submit from the model spec (no torch here).

Two queues by capability: `cpu` (every worker consumes it) and `gpu` (only workers started
with `layerscope worker --gpu N` / `--gpus ...`). The rules, first match wins:

1. `device: cuda` -> `gpu`.
2. a `device_map` and a device other than cpu/mps -> `gpu` (sharding is for GPUs; a CPU/disk
   offload map with `device: cpu` is rule 3).
3. `device: cpu` or `mps` -> `cpu`.
4. `device: auto`: `gpu` when the weights are over `LAYERSCOPE_CPU_MAX_MODEL_GB` in float32
   (or the requested dtype), read from the model's safetensors headers or config
   (`app/modelsize.py`); otherwise, or when the size cannot be read here, `cpu`.

A job on the `gpu` queue runs only where CUDA is: a GPU worker without a usable CUDA device
fails it with `gpu_unavailable` rather than running it on the CPU (`worker/runtime.py`).
The decision is stored in the analysis summary as `routing` (the sweeper re-sends by it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.config import Settings
from app.modelsize import ModelSize, estimate, human_bytes
from app.schemas import ModelSpec

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)


@dataclass(frozen=True)
class Route:
    queue: str
    reason: str
    params: int | None
    size_source: str

    def as_summary(self) -> dict[str, Any]:
        return asdict(self)


def route(model: ModelSpec, settings: Settings, size: ModelSize | None = None) -> Route:
    size = size if size is not None else estimate(model, settings)

    def done(queue: str, reason: str) -> Route:
        return Route(queue, reason, size.params, size.source)

    if model.device == "cuda":
        return done(GPU_QUEUE, "device cuda")
    if model.device_map is not None and model.device not in ("cpu", "mps"):
        return done(GPU_QUEUE, "device_map on an accelerator")
    if model.device in ("cpu", "mps"):
        return done(CPU_QUEUE, f"device {model.device}")
    dtype = "float32" if model.dtype == "auto" else model.dtype
    weights = size.bytes_at(dtype)
    limit = settings.cpu_max_model_gb * 1e9
    if weights is None:
        return done(CPU_QUEUE, "device auto, model size unknown here")
    if weights > limit:
        return done(
            GPU_QUEUE, f"device auto, {human_bytes(weights)} of weights in {dtype} > {human_bytes(limit)} CPU limit"
        )
    return done(CPU_QUEUE, f"device auto, {human_bytes(weights)} of weights in {dtype}")


def queue_of(summary: dict[str, Any] | None) -> str:
    """The queue stored at submit (rows from before routing existed go to `cpu`)."""
    stored = (summary or {}).get("routing") or {}
    queue = stored.get("queue") if isinstance(stored, dict) else None
    return queue if queue in QUEUES else CPU_QUEUE
