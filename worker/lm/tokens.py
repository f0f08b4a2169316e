"""Encoding and padding: token ids per text, padded batches, batches by length.

Every stage tokenizes the same way: the tokenizer's default special tokens (e.g. a
BOS token), truncated to `max_tokens`, no padding; batches are padded here, on the
right (on the left for generation), with the attention mask marking real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

__all__ = ["by_length", "encode_texts", "iter_batches", "length_batches", "pad_batch", "pad_id"]


def pad_id(tokenizer: Any) -> int:
    """The pad token id. `worker.modelzoo.load_model` always gives the tokenizer one (its
    eos, unk or bos token when it has none), so there is no fallback to guess here."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; load the model with worker.modelzoo.load_model")
    return int(pad)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_tokens: int | None, *, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids per text, with the tokenizer's default special tokens, truncated to max_tokens."""
    if not texts:
        return []
    kw: dict[str, Any] = {"add_special_tokens": add_special_tokens}
    if max_tokens is not None:
        kw.update(truncation=True, max_length=int(max_tokens))
    enc = tokenizer(list(texts), **kw)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of shape [batch, max_len] int64, padded on `side`."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, : len(s)] = t
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s) :] = t
            mask[i, width - len(s) :] = 1
    return ids, mask


def iter_batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


def by_length(lengths: Sequence[int]) -> list[int]:
    """Indices longest first, ties by index (less padding per batch; the biggest batch runs
    first, so an out-of-memory shows at once)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """`by_length` in batches of `batch_size`, empty sequences left out."""
    order = [i for i in by_length(lengths) if lengths[i] > 0]
    return list(iter_batches(order, batch_size))
