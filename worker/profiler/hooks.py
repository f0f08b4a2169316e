"""Forward hooks on the capture sites of every block, registered in a context manager.

A capture site (from the architecture adapter) is a module plus whether to read its
first positional input (forward pre-hook) or its output (forward hook; the first
element when the output is a tuple). The hooks only hand the tensor to a callback;
they never change what the model computes, and they are always removed on exit,
exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

SITES = ("block_output", "mlp_activation", "attention_output")

Callback = Callable[[int, str, torch.Tensor], None]


class _Site(Protocol):
    module: torch.nn.Module
    use_input: bool


class _Block(Protocol):
    index: int
    name: str
    module: torch.nn.Module
    sites: Mapping[str, Any]


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a hook captures: the value itself, the first element of a tuple/list,
    or the first tensor of a ModelOutput-like mapping."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return first_tensor(value[0]) if value else None
    if isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


class SiteUnavailable(LookupError):
    """The adapter has no such capture site for a block."""


@contextmanager
def capture(blocks: Sequence[_Block], sites: Sequence[str], callback: Callback) -> Iterator[int]:
    """Hook `sites` on every block; `callback(block_position, site, tensor)` per firing.

    `block_position` is the position in `blocks` (0..L-1), not `BlockInfo.index`.
    Yields the number of hooks registered. All hooks are removed in `finally`.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for position, block in enumerate(blocks):
            for site_name in sites:
                site = block.sites.get(site_name)
                if site is None:
                    raise SiteUnavailable(
                        f"capture site {site_name!r} is not available for block {block.name!r} "
                        f"(available: {sorted(block.sites)})"
                    )
                handles.append(_register(site, position, site_name, callback))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def _register(site: _Site, position: int, name: str, callback: Callback) -> torch.utils.hooks.RemovableHandle:
    if site.use_input:

        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensor = first_tensor(args) if args else first_tensor(kwargs)
            if tensor is not None:
                callback(position, name, tensor)

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is not None:
            callback(position, name, tensor)

    return site.module.register_forward_hook(hook)
