"""What kind of model this is, where its inputs go, and its cheapest forward pass."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["forward_callable", "has_classification_head", "is_causal_lm", "model_device"]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def has_classification_head(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A decoder-only LM with an LM head (what perplexity, label-word scoring, QA and the
    loss-based scorers need)."""
    if has_classification_head(model) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def forward_callable(model: torch.nn.Module, blocks: Sequence[Any]) -> Callable[..., Any]:
    """The cheapest module that runs every block: the base model (no LM head) when the
    blocks live inside it, else the model. Passes use_cache=False where accepted."""
    target = model
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model and blocks:
        inside = {id(m) for m in base.modules()}
        if all(id(b.module) in inside for b in blocks):
            target = base
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    extra: dict[str, Any] = {}
    if "use_cache" in params:
        extra["use_cache"] = False

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return target(input_ids=input_ids, attention_mask=attention_mask, **extra)

    return run
