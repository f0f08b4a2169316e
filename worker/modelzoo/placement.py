"""Where a model's weights go: one device, or spread by accelerate (`model.device_map`,
`model.max_memory`); and the pre-flight size check that runs before any weight is loaded.

- `Placement.for_spec` turns the spec into accelerate's terms (GPU indices as ints, a per-load
  offload folder for modules mapped to `disk`). With `device: cpu` an automatic map may only use
  the host and disk, even on a GPU worker.
- `dispatch` spreads a model that was built in memory (the tiny random built-ins); a model read
  from files gets the map in `from_pretrained` instead (`from_pretrained_kwargs`), so a model
  larger than host memory is never materialised on the host.
- `preflight` compares the weights' size (`app/modelsize.py`: safetensors headers or config) with
  what the target devices have free and fails with `model_too_large` and advice that would fit.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.modelsize import UNKNOWN, ModelSize, estimate, hub_config_size, human_bytes
from app.schemas import AnalysisSpec, ModelSpec
from worker.stage import JobFailed

HEADROOM = 0.9  # weights may use this share of a device; the rest is for activations and the allocator
_NAMED = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Placement:
    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int | str] | None
    offload_folder: Path
    main_device: torch.device

    @classmethod
    def for_spec(cls, spec: ModelSpec, device: torch.device, settings: Settings) -> Placement | None:
        if spec.device_map is None:
            return None
        device_map: str | dict[str, int | str]
        if isinstance(spec.device_map, dict):
            device_map = {k: _target(v) for k, v in spec.device_map.items()}
            gpus = [v for v in device_map.values() if isinstance(v, int)]
            main = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
        else:
            device_map = spec.device_map
            main = torch.device("cuda", 0) if device.type == "cuda" else torch.device("cpu")
        max_memory: dict[int | str, int | str] | None = None
        if spec.max_memory is not None:
            max_memory = {int(k) if k.isdigit() else k: v for k, v in spec.max_memory.items()}
        if device.type != "cuda" and isinstance(device_map, str):
            max_memory = {"cpu": (max_memory or {}).get("cpu", host_available())}  # host and disk only
        folder = settings.cache_dir / "offload" / uuid.uuid4().hex
        return cls(device_map, max_memory, folder, main)

    def key(self) -> str:
        """For the process cache: the same spec placement gives the same key."""
        return json.dumps([self.device_map, {str(k): v for k, v in (self.max_memory or {}).items()}], sort_keys=True)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        self.offload_folder.mkdir(parents=True, exist_ok=True)
        kw: dict[str, Any] = {"device_map": self.device_map, "offload_folder": str(self.offload_folder)}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        return kw

    def dispatch(self, model: Any) -> Any:
        """Spread a model that is in host memory over the map (accelerate hooks move activations)."""
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        if isinstance(self.device_map, dict):
            device_map = self.device_map
        else:
            no_split = getattr(model, "_no_split_modules", None) or []
            max_memory = self.max_memory
            if self.device_map in ("auto", "balanced", "balanced_low_0"):
                max_memory = get_balanced_memory(
                    model, max_memory, no_split_module_classes=no_split, low_zero=self.device_map == "balanced_low_0"
                )
            device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        self.offload_folder.mkdir(parents=True, exist_ok=True)
        try:
            model = dispatch_model(model, device_map, main_device=str(self.main_device),
                                   offload_dir=str(self.offload_folder))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise JobFailed("device_map_invalid", f"model.device_map cannot place this model: {exc}") from exc
        model.hf_device_map = dict(device_map)
        return model

    def finalize_with(self, model: Any) -> None:
        """Remove the offload folder when the model is freed."""
        weakref.finalize(model, shutil.rmtree, self.offload_folder, True)


def _target(value: int | str) -> int | str:
    if isinstance(value, int):
        return value
    if value.startswith("cuda:"):
        return int(value.removeprefix("cuda:"))
    return value


def check_offload(spec: AnalysisSpec, model: Any) -> None:
    """Stages that need gradients cannot run on modules accelerate offloads (to the host or disk,
    streamed in per forward); fail before any stage instead of midway with a RuntimeError."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return
    needs = []
    prune = spec.stages.prune
    if prune is not None and {"gbis", "lrp"} & set(prune.scorers):
        needs.append("the gbis/lrp scorers of prune")
    if spec.stages.mitigate is not None:
        needs.append("mitigate")
    if needs:
        placed = sorted({str(v) for v in getattr(model, "hf_device_map", {}).values()})
        raise JobFailed(
            "device_map_unsupported",
            f"{' and '.join(needs)} need gradients, which modules offloaded by the device_map cannot give "
            f"(this map places modules on {', '.join(placed)}). Give the model enough GPU memory that nothing "
            "is offloaded (model.max_memory, more GPUs), or leave out those stages and scorers.",
        )


# ------------------------------------------------------------------ pre-flight


def host_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def gpu_free() -> list[tuple[int, int]]:
    """(free, total) bytes of each visible GPU."""
    if not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())]  # type: ignore[misc]


def _size(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return int(convert_file_size_to_int(value))


@dataclass
class Budget:
    """What the target devices of one load can hold."""

    devices: dict[str, int]  # label -> bytes the weights may use there
    gpus: list[tuple[int, int]]  # every visible GPU's (free, total)
    host: int
    spread: bool  # a device_map is in use

    @property
    def total(self) -> int:
        return sum(self.devices.values())


def budget(spec: ModelSpec, device: torch.device, settings: Settings) -> Budget | None:
    """None when there is nothing to check against (mps, whose memory torch does not report)."""
    if device.type == "mps":
        return None
    gpus = gpu_free() if device.type == "cuda" else []
    host = host_available()
    caps = {k: _size(v) for k, v in (spec.max_memory or {}).items()}
    if spec.device_map is None:
        if device.type == "cuda":
            index = device.index or 0
            return Budget({f"cuda:{index}": gpus[index][0]}, gpus, host, spread=False)
        return Budget({"cpu": host}, gpus, host, spread=False)
    targets: set[str]
    if isinstance(spec.device_map, dict):
        targets = {str(_target(v)) for v in spec.device_map.values()}
    else:
        targets = {str(i) for i in range(len(gpus))} | {"cpu", "disk"}
    devices: dict[str, int] = {}
    for i, (free, _total) in enumerate(gpus):
        if str(i) in targets:
            devices[f"cuda:{i}"] = min(free, caps.get(str(i), free))
    if "cpu" in targets:
        devices["cpu"] = min(host, caps.get("cpu", host))
    if "disk" in targets:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        devices["disk"] = shutil.disk_usage(settings.cache_dir).free
    return Budget(devices, gpus, host, spread=True)


def preflight(
    spec: ModelSpec, settings: Settings, device: torch.device, dtype: torch.dtype, *, hub: bool = False
) -> None:
    """Fail with `model_too_large` before loading when the weights cannot fit where they would go.
    `hub`: the model comes from the Hugging Face hub; when its config is not cached yet, fetch
    that one small file first, so a 70B model is refused before its 141 GB download starts."""
    size = estimate(spec, settings)
    if size.params is None and hub:
        size = _fetch_hub_config(spec)
    where = budget(spec, device, settings)
    if size.params is None or where is None:
        return
    width = torch.empty((), dtype=dtype).element_size()
    need = size.params * width
    if need <= where.total * HEADROOM:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    have = ", ".join(f"{k} {human_bytes(v)}" for k, v in where.devices.items())
    options = advice(size.params, width, where, device)
    raise JobFailed(
        "model_too_large",
        f"{spec.name!r} needs {human_bytes(need)} for its weights in {dtype_name} ({size.params / 1e9:.2f}B "
        f"parameters, from its {size.source.replace('_', ' ')}); this worker can give it {human_bytes(where.total)} "
        f"({have}; weights may use {HEADROOM:.0%}). Nothing was loaded. "
        + ("Options that fit: " + "; ".join(options) + "." if options else "No option fits on this kind of worker.")
        + " Quantized (8-/4-bit) loading is not offered by this service.",
    )


def _fetch_hub_config(spec: ModelSpec) -> ModelSize:
    """Download `config.json` alone (a few KB, into the usual hub cache). Best effort: offline or
    unreachable, the size stays unknown and the load that follows reports what went wrong."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return UNKNOWN
    try:
        found = huggingface_hub.hf_hub_download(spec.name.strip(), "config.json", revision=spec.revision)
    except Exception:  # noqa: BLE001 - any hub failure leaves the size unknown, never fails the job here
        return UNKNOWN
    return hub_config_size(Path(found))


def advice(params: int, width: int, where: Budget, device: torch.device) -> list[str]:
    """Changes to the spec (or the deployment) under which the weights would fit."""
    out: list[str] = []
    half = params * 2
    fits = lambda n, room: n <= room * HEADROOM  # noqa: E731
    if width > 2 and fits(half, where.total):
        out.append(f"dtype bfloat16 or float16 ({human_bytes(half)})")
    smallest = min(params * width, half)
    if where.gpus:
        per_gpu = where.gpus[0][1]
        all_free = sum(f for f, _ in where.gpus)
        if not where.spread and len(where.gpus) > 1 and fits(smallest, all_free):
            out.append(f"model.device_map \"auto\" over this worker's {len(where.gpus)} GPUs "
                       f"({human_bytes(all_free)} free)")
        need_gpus = math.ceil(smallest / (per_gpu * HEADROOM))
        if need_gpus > len(where.gpus):
            out.append(
                f"a worker that sees {need_gpus} GPUs of {human_bytes(per_gpu)} (`layerscope worker --gpu "
                f"{','.join(str(i) for i in range(need_gpus))}`) with model.device_map \"auto\""
                + (" and dtype bfloat16" if smallest < params * width else "")
            )
        if fits(smallest, all_free + where.host) and not where.spread:
            out.append(f"model.device_map \"auto\" with CPU offload (GPUs plus {human_bytes(where.host)} of host "
                       "memory; slower)" + (" in bfloat16" if smallest < params * width else ""))
    elif device.type == "cpu":
        out.append(f"a GPU worker (device \"cuda\"; {human_bytes(half)} in bfloat16)")
        if not where.spread:
            out.append("model.device_map \"auto\" with device \"cpu\": what does not fit in host memory is "
                       "offloaded to disk (much slower)")
    return out
