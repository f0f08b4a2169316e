"""Queue routing at submit (app/routing.py) and the torch-free size estimate it uses (app/modelsize.py)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.modelsize import BUILTIN_PARAMS, ModelSize, config_params, estimate, safetensors_params
from app.routing import route
from app.schemas import ModelSpec
from cli import gpus

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file whose data section is sparse (no bytes written for the weights)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)


def test_config_count_matches_known_models() -> None:
    assert config_params(LLAMA3_8B) == pytest.approx(8.03e9, rel=0.002)
    seventy = {**LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
               "num_attention_heads": 64}
    assert config_params(seventy) == pytest.approx(70.55e9, rel=0.002)
    assert config_params({"model_type": "llama"}) is None


def test_builtin_counts_are_the_real_ones() -> None:
    import torch

    from worker.modelzoo.loading import _tiny_random

    for arch in ("llama", "gpt2", "bert"):
        model, _, _ = _tiny_random(arch, torch.float32)
        assert BUILTIN_PARAMS[f"tiny-random-{arch}"] == sum(p.numel() for p in model.parameters())


def test_sizes_from_safetensors_headers_and_configs_under_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "models"
    big = root / "big"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps(LLAMA3_8B))
    write_safetensors(big / "model-00001.safetensors", {"a": ("BF16", [50_000, 40_000])})
    write_safetensors(big / "model-00002.safetensors", {"b": ("BF16", [1_000, 1_000]), "c": ("F32", [7])})
    assert safetensors_params(big / "model-00002.safetensors") == 1_000_007
    settings = Settings(data_dir=tmp_path / "d", model_roots=[root])
    assert estimate(ModelSpec(name="big"), settings) == ModelSize(2_001_000_007, "safetensors")
    only_config = root / "cfg"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert estimate(ModelSpec(name=str(only_config)), settings).source == "config"
    # Outside the roots, missing, or unreadable: unknown (the size of a file there is not probed).
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert estimate(ModelSpec(name=str(outside)), settings).params is None
    assert estimate(ModelSpec(name=str(root / "nope")), settings).params is None
    (big / "model-00001.safetensors").write_bytes(b"\xff" * 8)
    assert estimate(ModelSpec(name="big"), settings).params is None
    assert estimate(ModelSpec(name="org/not-in-the-cache"), settings).params is None


def test_routing_rules() -> None:
    settings = Settings(cpu_max_model_gb=8)
    eight_b = ModelSize(8_030_000_000, "config")
    small = ModelSize(135_000_000, "builtin")
    unknown = ModelSize(None, "unknown")

    def queue(size: ModelSize, **model: object) -> str:
        return route(ModelSpec(**model), settings, size).queue

    assert queue(small, device="cuda") == "gpu"
    assert queue(eight_b, device="cpu") == "cpu"  # asked for explicitly
    assert queue(eight_b) == "gpu"  # 32 GB in float32 > 8 GB
    assert queue(eight_b, dtype="bfloat16") == "gpu"  # 16 GB
    assert queue(ModelSize(3_000_000_000, "config"), dtype="bfloat16") == "cpu"  # 6 GB
    assert queue(small) == "cpu" and queue(unknown) == "cpu"
    assert queue(small, device_map="auto") == "gpu"
    assert queue(small, device="cpu", device_map={"model.layers.0": "disk"}) == "cpu"
    assert queue(small, device="mps") == "cpu"
    r = route(ModelSpec(), settings, eight_b)
    assert r.params == 8_030_000_000 and "32.1 GB" in r.reason and r.size_source == "config"


def test_placement_fields_are_checked() -> None:
    ModelSpec(device_map="balanced", max_memory={"0": "70GiB", "1": 70_000_000_000, "cpu": "200GB"})
    ModelSpec(device="cpu", device_map={"model.embed_tokens": "cpu", "model.layers.0": "disk"})
    for bad in (
        {"max_memory": {"cpu": "1GB"}},  # without a device_map
        {"device": "cpu", "device_map": {"model.layers.0": 0}},
        {"device": "cpu", "device_map": "auto", "max_memory": {"0": "1GB"}},
        {"device_map": {"model.layers.0": "gpu"}},
        {"device_map": {"model/../x": "cpu"}},
        {"device_map": "auto", "max_memory": {"cpu": "lots"}},
        {"device_map": "everywhere"},
    ):
        with pytest.raises(ValidationError):
            ModelSpec(**bad)


def test_worker_options() -> None:
    assert gpus.parse_ids("0", "--gpu") == ["0"] and gpus.parse_ids("3, 1", "--gpus") == ["3", "1"]
    for bad in ("", "a", "0,0", "-1", "cuda:0"):
        with pytest.raises(ValueError):
            gpus.parse_ids(bad, "--gpu")
    assert gpus.parse_queues(None, gpu=False) == ["cpu"]
    assert gpus.parse_queues(None, gpu=True) == ["gpu", "cpu"]
    assert gpus.parse_queues("gpu", gpu=True) == ["gpu"]
    with pytest.raises(ValueError):
        gpus.parse_queues("layerscope", gpu=False)


def test_pinning_refuses_once_torch_is_imported() -> None:
    import torch  # noqa: F401

    assert "torch" in sys.modules
    with pytest.raises(RuntimeError, match="before the GPU was pinned"):
        gpus.pin(["0"])
