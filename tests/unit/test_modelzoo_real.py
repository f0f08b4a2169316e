"""End-to-end loads of the real built-in models shipped in packages (slow: the first
SmolLM2 load dequantizes its GGUF, about 30 s on two cores). Deselect with -m "not slow"."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.schemas import ModelSpec
from worker.modelzoo import clear_model_cache, load_model

pytestmark = pytest.mark.slow


def test_smollm2_builtin_converts_once_and_reloads_fast(tmp_path: Path) -> None:
    clear_model_cache()
    settings = Settings(data_dir=tmp_path)
    lm = load_model(ModelSpec(name="smollm2-135m", device="cpu"), settings)
    assert lm.source == "builtin:smollm2-135m"
    assert lm.is_causal_lm and lm.adapter.family == "llama"
    blocks = lm.adapter.blocks(lm.model)
    assert len(blocks) == 30 and blocks[29].name == "model.layers.29"
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.padding_side == "right"
    folders = [p for p in (settings.cache_dir / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "layerscope-cache.json").is_file()

    clear_model_cache()
    started = time.monotonic()
    again = load_model(ModelSpec(name="smollm2-135m", device="cpu"), settings)
    assert time.monotonic() - started < 15  # from the safetensors cache (about 1 s unloaded)
    enc = again.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.inference_mode():
        out = again.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in again.tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
    clear_model_cache()


def test_minilm_builtin(tmp_path: Path) -> None:
    lm = load_model(ModelSpec(name="minilm-l6", device="cpu"), Settings(data_dir=tmp_path), use_cache=False)
    assert not lm.is_causal_lm and lm.adapter.family == "bert"
    assert len(lm.adapter.blocks(lm.model)) == 6
    enc = lm.tokenizer(["hello world"], return_tensors="pt")
    with torch.inference_mode():
        assert lm.model(**enc).last_hidden_state.shape[-1] == 384
