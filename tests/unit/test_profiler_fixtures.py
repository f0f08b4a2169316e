"""Tiny random Llama, a character tokenizer and capture sites built by hand, shared by the
profiler, AVSS and plot tests (no network, no real weights, a few ms per forward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from worker.modelzoo.adapters import CaptureSite


@dataclass
class Block:
    index: int
    name: str
    module: torch.nn.Module
    sites: dict[str, CaptureSite] = field(default_factory=dict)


class HandAdapter:
    """block_output = block output, mlp_activation = input of mlp.down_proj,
    attention_output = output[0] of self_attn."""

    def blocks(self, model: Any) -> list[Block]:
        out = []
        for i, block in enumerate(model.model.layers):
            out.append(
                Block(
                    i,
                    f"model.layers.{i}",
                    block,
                    {
                        "block_output": CaptureSite(block),
                        "mlp_activation": CaptureSite(block.mlp.down_proj, use_input=True),
                        "attention_output": CaptureSite(block.self_attn),
                    },
                )
            )
        return out


class CharTokenizer:
    """BOS (id 1) then one id per character; pad id 0."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(
        self,
        texts: list[str],
        truncation: bool = True,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, list[list[int]]]:
        out = []
        for text in texts:
            ids = [1] + [3 + (ord(c) % 120) for c in text]
            out.append(ids[:max_length] if (truncation and max_length) else ids)
        return {"input_ids": out}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    adapter: Any
    device: torch.device = torch.device("cpu")
    name: str = "tiny-random-llama"
    source: str = "test"
    is_causal_lm: bool = True


def tiny_llama(layers: int = 3, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


TEXTS = [
    "hello world",
    "a",
    "the quick brown fox jumps over the lazy dog",
    "",
    "zzz top",
    "layer scores from activations",
    "ok",
]


@pytest.fixture(scope="session")
def loaded() -> Loaded:
    return Loaded(tiny_llama(), CharTokenizer(), HandAdapter())


def reference_capture(loaded: Loaded, run: Any, sites: list[str]) -> tuple[dict, list[torch.Tensor]]:
    """Run `run()` while keeping every captured tensor (float64, CPU) and every attention
    mask the base model saw, in call order."""
    from worker.profiler.hooks import capture

    kept: dict[tuple[int, str], list[torch.Tensor]] = {}
    masks: list[torch.Tensor] = []

    def keep(position: int, site: str, tensor: torch.Tensor) -> None:
        kept.setdefault((position, site), []).append(tensor.detach().double().cpu().clone())

    def on_forward(module: Any, args: tuple, kwargs: dict) -> None:
        masks.append(kwargs["attention_mask"].bool().cpu())

    handle = loaded.model.model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with capture(loaded.adapter.blocks(loaded.model), sites, keep):
            result = run()
    finally:
        handle.remove()
    return {"result": result, "kept": kept}, masks
