"""Model zoo: load models (built-in packaged models, local folders and .gguf files, hub ids)
and find their transformer blocks and capture sites (architecture adapters)."""

from worker.modelzoo.adapters import ArchitectureAdapter, BlockInfo, CaptureSite, adapter_for
from worker.modelzoo.loading import BUILTIN_MODELS, LoadedModel, clear_model_cache, load_model, resolve_device

__all__ = [
    "BUILTIN_MODELS",
    "ArchitectureAdapter",
    "BlockInfo",
    "CaptureSite",
    "LoadedModel",
    "adapter_for",
    "clear_model_cache",
    "load_model",
    "resolve_device",
]
