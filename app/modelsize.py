"""How big a model's weights are, read without torch and without loading them.

Used at submit to route a job to a queue (`app/routing.py`) and by the worker's
pre-flight check before it loads weights (`worker/modelzoo/placement.py`). Sources, best first:

- safetensors headers of a local folder (exact: every tensor's shape and dtype);
- its `config.json` (a transformer parameter count from the usual config keys;
  within a few percent for Llama/Mistral/Qwen/Gemma-style decoders and BERT/GPT-2);
- a `.gguf` file's size (rough: GGUF weights are quantized, about 4.5 bits per weight
  assumed for the float count);
- the built-in models' known counts;
- a hub id's `config.json` when it is already in the local Hugging Face cache (no network).

Anything else is unknown (`params is None`); routing then goes by the requested device only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.modelpaths import first_escape, local_candidate, resolved_under_roots
from app.schemas import ModelSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
GGUF_BITS_PER_WEIGHT = 4.5

# Parameter counts of the built-in models (measured with torch; tests check the tiny ones).
BUILTIN_PARAMS = {
    "smollm2-135m": 134_515_008,
    "gemma3-270m": 268_098_176,
    "minilm-l6": 22_713_728,
    "tiny-random-llama": 2_101_440,
    "tiny-random-gpt2": 2_186_240,
    "tiny-random-bert": 2_124_480,
}

# Architectures whose MLP has no gate (two matrices instead of three).
_UNGATED = {
    "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "bert", "roberta",
    "distilbert", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet", "albert", "starcoder2",
}


@dataclass(frozen=True)
class ModelSize:
    params: int | None
    source: str  # safetensors | config | gguf_file_size | builtin | hub_cache_config | unknown

    def bytes_at(self, dtype: str) -> int | None:
        """Bytes of the weights in `dtype` (float32, float16, bfloat16)."""
        return None if self.params is None else self.params * DTYPE_BYTES[dtype]


UNKNOWN = ModelSize(None, "unknown")


def estimate(spec: ModelSpec, settings: Settings) -> ModelSize:
    """The size of the model `spec` names; UNKNOWN when it cannot be read here. Never raises."""
    name = spec.name.strip()
    try:
        if name in BUILTIN_PARAMS:
            return ModelSize(BUILTIN_PARAMS[name], "builtin")
        local = local_candidate(name, settings)
        if local is not None:
            path = resolved_under_roots(local, settings.model_roots) if settings.model_roots else None
            if path is None or not path.exists() or first_escape(path, settings.model_roots) is not None:
                return UNKNOWN  # nothing outside the roots is read, not even a header
            return _local(path)
        return _hub_cache(name, spec.revision)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return UNKNOWN


def _local(path: Path) -> ModelSize:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf(path)
    if not path.is_dir():
        return UNKNOWN
    files = sorted(path.glob("*.safetensors"))
    if files:
        return ModelSize(sum(safetensors_params(f) for f in files), "safetensors")
    if (path / "config.json").is_file():
        params = config_params(json.loads((path / "config.json").read_text()))
        return ModelSize(params, "config") if params else UNKNOWN
    ggufs = sorted(path.glob("*.gguf"))
    return _gguf(ggufs[0]) if len(ggufs) == 1 else UNKNOWN


def _gguf(path: Path) -> ModelSize:
    return ModelSize(int(path.stat().st_size * 8 / GGUF_BITS_PER_WEIGHT), "gguf_file_size")


def _hub_cache(name: str, revision: str | None) -> ModelSize:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return UNKNOWN
    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return hub_config_size(Path(found)) if isinstance(found, str) else UNKNOWN


def hub_config_size(config_file: Path) -> ModelSize:
    """The size a hub model's downloaded (or cached) `config.json` gives; UNKNOWN when it gives none."""
    try:
        params = config_params(json.loads(config_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return UNKNOWN
    return ModelSize(params, "hub_cache_config") if params else UNKNOWN


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > _MAX_HEADER:
            raise ValueError(f"{path.name}: safetensors header of {length} bytes")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not an object")
    return header


def safetensors_params(path: Path) -> int:
    """Elements of every tensor in a safetensors file, from its header only."""
    total = 0
    for key, entry in safetensors_header(path).items():
        if key == "__metadata__":
            continue
        total += math.prod(int(d) for d in entry["shape"])
    return total


def config_params(config: dict[str, Any]) -> int | None:
    """A transformer's parameter count from its config keys; None when the keys are not there."""
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal wrappers: the language model dominates
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    get = config.get
    hidden = get("hidden_size") or get("n_embd") or get("d_model")
    layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
    vocab = get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    heads = get("num_attention_heads") or get("n_head") or 1
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    inter = get("intermediate_size") or get("n_inner") or get("ffn_dim") or 4 * hidden
    experts = get("num_local_experts") or get("num_experts") or get("n_routed_experts") or 1
    moe_inter = get("moe_intermediate_size") or inter
    gated = get("model_type") not in _UNGATED
    mlp_one = (3 if gated else 2) * hidden * (moe_inter if experts > 1 else inter)
    mlp = mlp_one * experts + (mlp_one * get("n_shared_experts", 0) if experts > 1 else 0)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attn + mlp + 4 * hidden
    tied = get("tie_word_embeddings", get("model_type") in _UNGATED)
    embeddings = vocab * hidden * (1 if tied else 2)
    return int(layers * per_layer + embeddings + 2 * hidden)


def human_bytes(n: float) -> str:
    """1.5 GB style (decimal units, as GPU memory is usually quoted)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
