"""Forward hooks on the capture sites of every block, registered in a context manager.

A capture site (from the architecture adapter) is a module plus whether to read its
first positional input (forward pre-hook) or its output (forward hook; the first
element when the output is a tuple). The hook itself is registered by the site
(`worker.modelzoo.adapters.CaptureSite.register`, the one implementation); here it
only hands the tensor to a callback with the block position and site name. Hooks
never change what the model computes, and they are always removed on exit,
exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import torch

Callback = Callable[[int, str, torch.Tensor], None]


class _Site(Protocol):
    """What `capture` needs of a site: `CaptureSite.register`."""

    def register(self, fn: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle: ...


class _Block(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def module(self) -> torch.nn.Module: ...
    @property
    def sites(self) -> Mapping[str, _Site]: ...


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
                handles.append(site.register(partial(callback, position, site_name)))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()

