"""The GPU side of pinning, placement and the pre-flight, for a machine with CUDA (`pytest -m gpu`).

Skipped where torch sees no CUDA device (this project's CI machine); the CPU versions of the same
checks are in test_placement.py and tests/integration/test_gpu_routing.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.schemas import ModelSpec
from tests.unit.test_placement import TINY_MAP, profile_rows
from tests.unit.test_routing import LLAMA3_8B, write_safetensors
from worker import runtime
from worker.modelzoo import loading
from worker.stage import JobFailed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU_MAP = {**TINY_MAP, "model.embed_tokens": 0, "lm_head": 0, "model.layers.0": 0, "model.layers.2": 0,
           "model.norm": 0, "model.rotary_emb": 0}  # layers 1 and 3 stay on disk, the rest on cuda:0


def test_cuda_load_records_the_gpu(tmp_path: Path) -> None:
    loaded = loading.load_model(ModelSpec(name="tiny-random-llama", device="cuda"),
                                Settings(data_dir=tmp_path), use_cache=False)
    info = runtime.describe(loaded)
    assert info["device"].startswith("cuda") and info["gpu_name"] == torch.cuda.get_device_name(0)
    assert info["dtype"] in ("bfloat16", "float16")
    env = runtime.environment()
    assert env["cuda_available"] and env["cuda"] and env["gpus"]


def test_gpu_plus_disk_offload_gives_the_single_gpu_statistics(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    base = {"name": "tiny-random-llama", "device": "cuda", "dtype": "float32"}
    single = profile_rows(base, settings)
    spread = profile_rows({**base, "device_map": GPU_MAP}, settings)
    assert spread.keys() == single.keys()
    for key, values in single.items():
        for name, value in values.items():
            assert spread[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (key, name)


def test_preflight_against_the_gpu_memory(tmp_path: Path) -> None:
    root = tmp_path / "models"
    big = root / "big"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    free, _total = torch.cuda.mem_get_info(0)
    write_safetensors(big / "model.safetensors", {"w": ("BF16", [int(free * 1.2 / 2)])})
    settings = Settings(data_dir=tmp_path / "state", model_roots=[root])
    with pytest.raises(JobFailed) as info:
        loading.load_model(ModelSpec(name="big", device="cuda", dtype="bfloat16"), settings, use_cache=False)
    assert info.value.error_type == "model_too_large" and "cuda:0" in info.value.detail
