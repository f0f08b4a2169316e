"""model.device_map / max_memory through accelerate, and the size pre-flight (worker/modelzoo/placement.py).

This machine has no GPU: the spread runs here are host + disk offload, the map a GPU host would
mix with `cuda:N` entries. What they show is that a model spread by accelerate (modules streamed
from the offload folder per forward) gives the same profiler statistics as the model on one device.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.schemas import AnalysisSpec, ModelSpec
from tests.unit.test_routing import LLAMA3_8B, write_safetensors
from worker import runtime
from worker.modelzoo import loading, placement
from worker.modelzoo.placement import Budget, advice
from worker.pipeline import run_pipeline
from worker.stage import JobContext, JobFailed, StageResult

TINY_MAP = {
    "model.embed_tokens": "cpu", "lm_head": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
}
ROWS = [{"text": f"row {i}: the quick brown fox jumps over the lazy dog and runs away"} for i in range(6)]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings with a model root holding tiny-random-llama saved to files (to load it with
    from_pretrained and a device_map, not only dispatch it after building it in memory)."""
    root = tmp_path_factory.mktemp("models")
    model, tokenizer, _ = loading._tiny_random("llama", torch.float32)
    model.save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    return Settings(data_dir=tmp_path_factory.mktemp("state"), model_roots=[root])


def profile_rows(model: dict, settings: Settings) -> dict[tuple[str, int], dict]:
    spec = AnalysisSpec.model_validate({
        "model": model,
        "dataset": {"rows": ROWS, "limit": len(ROWS), "max_tokens": 24},
        "stages": {"profile": {"batch_size": 3, "sites": ["block_output", "mlp_activation"]},
                   "avss": {"plots": False}},
    })
    results: list[StageResult] = []
    loading.clear_model_cache()
    run_pipeline(spec, JobContext(), settings, results.append)
    return {(r.stage, row.layer): row.values for r in results for row in r.layers}


def test_device_map_with_cpu_and_disk_offload_gives_the_single_device_statistics(roots: Settings) -> None:
    # Each spread run against the same model on one device: built in memory and dispatched, or read
    # from files by from_pretrained with the map (its saved tokenizer appends [SEP]: other counts).
    singles = {name: profile_rows({"name": name, "device": "cpu"}, roots) for name in ("tiny-random-llama", "tiny-llama")}
    assert all({stage for stage, _ in s} == {"profile", "avss"} and len(s) == 8 for s in singles.values())

    spread = [
        {"name": "tiny-random-llama", "device": "cpu", "device_map": TINY_MAP},
        {"name": "tiny-random-llama", "device": "cpu", "device_map": "auto", "max_memory": {"cpu": "8200KB"}},
        {"name": "tiny-llama", "device": "cpu", "device_map": "auto", "max_memory": {"cpu": "8200KB"}},
        {"name": "tiny-llama", "device": "cpu", "device_map": TINY_MAP},
    ]
    for model in spread:
        loaded = loading.load_model(ModelSpec(**model), roots)
        placed = set(loaded.model.hf_device_map.values())
        assert placed == {"cpu", "disk"}, (model, loaded.model.hf_device_map)
        assert any(p.device.type == "meta" for p in loaded.model.parameters())  # really offloaded
        recorded = runtime.describe(loaded)  # what the job's summary.runtime says
        assert set(recorded["device_map"]) == {"cpu", "disk"} and recorded["device"] == "cpu"
        rows = profile_rows(model, roots)
        single = singles[model["name"]]
        assert rows.keys() == single.keys()
        for key, values in single.items():
            assert rows[key].keys() == values.keys()
            for name, value in values.items():
                assert rows[key][name] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (model, key, name)


def test_an_explicit_map_that_misses_modules_is_a_typed_error(roots: Settings) -> None:
    spec = ModelSpec(name="tiny-random-llama", device="cpu", device_map={"model.layers.0": "disk"})
    with pytest.raises(JobFailed) as info:
        loading.load_model(spec, roots, use_cache=False)
    assert info.value.error_type == "device_map_invalid"


def test_gradient_stages_on_an_offloaded_model_fail_typed_before_any_stage(roots: Settings) -> None:
    rows = [{"text": f"row {i}", "question": f"what is {i}?", "answer": str(i)} for i in range(8)]
    for stages in ({"prune": {"scorers": ["gbis"], "tasks": ["perplexity"]}},
                   {"hallucination": {"n_shots": 1}, "mitigate": {"top_k": 1}}):
        spec = AnalysisSpec.model_validate({
            "model": {"name": "tiny-random-llama", "device": "cpu", "device_map": TINY_MAP},
            "dataset": {"rows": rows, "limit": 8, "max_tokens": 16}, "stages": stages,
        })
        results: list[StageResult] = []
        with pytest.raises(JobFailed) as info:
            run_pipeline(spec, JobContext(), roots, results.append)
        assert info.value.error_type == "device_map_unsupported" and results == []
        assert "cpu, disk" in info.value.detail


def test_preflight_fails_fast_from_the_headers_before_loading(tmp_path: Path) -> None:
    root = tmp_path / "models"
    big = root / "llama-70b"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps({
        **LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
        "num_attention_heads": 64, "architectures": ["LlamaForCausalLM"],
    }))
    # 70.6B bfloat16 parameters declared in the header; the file is sparse (no weight bytes on disk).
    write_safetensors(big / "model.safetensors", {"model.embed": ("BF16", [70_553_706, 1000])})
    settings = Settings(data_dir=tmp_path / "state", model_roots=[root])
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        loading.load_model(ModelSpec(name="llama-70b", device="cpu", dtype="bfloat16"), settings, use_cache=False)
    assert time.monotonic() - started < 30  # reading 141 GB would take minutes; this reads a header
    assert info.value.error_type == "model_too_large"
    detail = info.value.detail
    assert "needs 141.1 GB for its weights in bfloat16 (70.55B parameters, from its safetensors)" in detail
    assert "Nothing was loaded" in detail and "a GPU worker" in detail
    assert "device_map \"auto\" with device \"cpu\"" in detail  # disk offload would fit


def test_preflight_counts_disk_offload_when_the_map_allows_it(tmp_path: Path) -> None:
    """Weights of 1.3 x this host's available memory: too large for the host alone, fitting with
    a disk-offload map (where the disk has the room): the check lets it through to the loader."""
    root = tmp_path / "models"
    big = root / "big"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    params = int(placement.host_available() * 1.3 / 2)
    if shutil.disk_usage(tmp_path).free * placement.HEADROOM < params * 2:
        pytest.skip("not enough free disk for the offload case")
    write_safetensors(big / "model.safetensors", {"w": ("BF16", [params])})
    settings = Settings(data_dir=tmp_path / "state", model_roots=[root])
    alone = ModelSpec(name="big", device="cpu", dtype="bfloat16")
    with pytest.raises(JobFailed) as info:
        placement.preflight(alone, settings, torch.device("cpu"), torch.bfloat16)
    assert info.value.error_type == "model_too_large"
    placement.preflight(alone.model_copy(update={"device_map": {"model": "disk"}}), settings,
                        torch.device("cpu"), torch.bfloat16)


GB = 1_000_000_000
H100 = (80 * GB, 80 * GB)


def test_advice_names_only_what_would_fit() -> None:
    seventy_b = 70_553_706_000
    one_gpu = Budget({"cuda:0": 80 * GB}, [H100], host=200 * GB, spread=False)
    options = advice(seventy_b, 2, one_gpu, torch.device("cuda"))
    assert options == [
        'a worker that sees 2 GPUs of 80.0 GB (`layerscope worker --gpu 0,1`) with model.device_map "auto"',
        'model.device_map "auto" with CPU offload (GPUs plus 200.0 GB of host memory; slower)',
    ]
    eight = Budget({"cuda:0": 80 * GB}, [H100] * 8, host=200 * GB, spread=False)
    assert advice(seventy_b, 2, eight, torch.device("cuda"))[0] == (
        'model.device_map "auto" over this worker\'s 8 GPUs (640.0 GB free)'
    )
    # 8B in float32 on a 24 GB GPU: bfloat16 fits (alone, or with offload), more GPUs are not needed.
    small_gpu = Budget({"cuda:0": 24 * GB}, [(24 * GB, 24 * GB)], host=8 * GB, spread=False)
    assert advice(8_030_000_000, 4, small_gpu, torch.device("cuda")) == [
        "dtype bfloat16 or float16 (16.1 GB)",
        'model.device_map "auto" with CPU offload (GPUs plus 8.0 GB of host memory; slower) in bfloat16',
    ]
    # Already spread over GPUs, host and disk: no device_map advice again.
    spread = Budget({"cuda:0": 80 * GB, "cpu": 10 * GB, "disk": 50 * GB}, [H100], host=10 * GB, spread=True)
    assert advice(seventy_b, 2, spread, torch.device("cuda")) == [
        'a worker that sees 2 GPUs of 80.0 GB (`layerscope worker --gpu 0,1`) with model.device_map "auto"'
    ]


def test_preflight_fetches_an_uncached_hub_config_before_any_weight(tmp_path: Path, monkeypatch) -> None:
    """A hub model whose config is not cached: its config.json alone is fetched, and a model that
    cannot fit is refused before the weights' download would start (hf_hub_download stands in for
    the hub, which this machine cannot reach)."""
    import huggingface_hub

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        **LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
        "num_attention_heads": 64, "architectures": ["LlamaForCausalLM"],
    }))
    asked: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **_: object) -> str:
        asked.append((repo_id, filename, revision))
        return str(config)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    settings = Settings(data_dir=tmp_path / "state")
    spec = ModelSpec(name="example-org/llama-70b-uncached", device="cpu", dtype="bfloat16")
    with pytest.raises(JobFailed) as info:
        loading.load_model(spec, settings, use_cache=False)
    assert asked == [("example-org/llama-70b-uncached", "config.json", None)]
    assert info.value.error_type == "model_too_large"
    assert "from its hub cache config" in info.value.detail and "Nothing was loaded" in info.value.detail

    # Offline, nothing is fetched and the size stays unknown: no pre-flight verdict.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked.clear()
    placement.preflight(spec, settings, torch.device("cpu"), torch.bfloat16, hub=True)
    assert asked == []
