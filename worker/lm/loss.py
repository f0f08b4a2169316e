"""Next-token loss of a causal LM on a padded batch, the one definition every stage uses."""

from __future__ import annotations

import torch

__all__ = ["next_token_targets", "token_nll"]


def next_token_targets(mask: torch.Tensor) -> torch.Tensor:
    """[batch, len-1] bool: position t+1 is a target (both it and its context token are real)."""
    return mask[:, 1:].bool() & mask[:, :-1].bool()


def token_nll(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-position NLL [batch, len-1] (float32) of token t+1 given tokens <= t; 0 where
    `target_mask[:, 1:]` is False (default: every real token after the first of its row)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets_ok = next_token_targets(mask) if target_mask is None else target_mask[:, 1:].bool()
    targets = ids[:, 1:].masked_fill(~targets_ok, -100)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=-100
    )
    return nll.view(targets.shape)
