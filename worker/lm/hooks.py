"""Reading hidden states with forward hooks: what a hook captures, and hooks on every block.

Every hook here only reads (it never changes what the model computes) and is removed
in a `finally`, errors included."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from worker.stage import JobFailed

if TYPE_CHECKING:
    from worker.modelzoo.adapters import BlockInfo

__all__ = ["block_hooks", "first_tensor", "input_tensor"]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a hook captures: the value itself, the first element of a tuple/list
    (recursively), or the first tensor of a ModelOutput-like mapping; None otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list):
        return first_tensor(value[0]) if value else None
    if isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def input_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A module's input: its first positional argument, else the keyword argument
    `hidden_states`, `input` or `x` (the first that is a tensor), else the first tensor
    among the keyword arguments."""
    if args:
        return first_tensor(args)
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return first_tensor(kwargs)


@contextmanager
def block_hooks(
    blocks: Sequence[BlockInfo],
    pre: Callable[[int, torch.Tensor], None] | None = None,
    post: Callable[[int, torch.Tensor], Any] | None = None,
) -> Iterator[None]:
    """pre(i, block input) and post(i, block output) on every block i; a block whose
    hidden state cannot be read fails the job (`scorer_failed`)."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_pre(i: int, fn: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = input_tensor(args, kwargs)
            if x is None:
                raise JobFailed("scorer_failed", f"could not read the input hidden state of block {i}")
            fn(i, x)

        return hook

    def make_post(i: int, fn: Callable[[int, torch.Tensor], Any]) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            y = first_tensor(output)
            if y is None:
                raise JobFailed("scorer_failed", f"could not read the output hidden state of block {i}")
            fn(i, y)

        return hook

    try:
        for i, block in enumerate(blocks):
            if pre is not None:
                handles.append(block.module.register_forward_pre_hook(make_pre(i, pre), with_kwargs=True))
            if post is not None:
                handles.append(block.module.register_forward_hook(make_post(i, post)))
        yield
    finally:
        for h in handles:
            h.remove()
