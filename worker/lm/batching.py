"""Automatic batch size: start from the requested size, halve on out-of-memory and retry,
and remember the size that worked per model and workload.

    batcher = AutoBatch("gbis", model, requested=options.batch_size)
    for rows, out in batcher.run(order, compute):   # compute(rows) -> out, no side effects
        commit(rows, out)                            # only ever sees completed batches
        ctx.progress(stage, *batcher.progress)       # rows done, rows in all: never backwards

`compute` must not change anything outside itself before it returns (accumulate into locals
and return them): a batch that runs out of memory half-way is thrown away and its rows are
run again in smaller batches, so a committed result is the same as that of a run started at
the smaller size. Rows keep their order; a failed batch of n rows becomes batches of n // 2.

The size is remembered per process (a worker runs one job at a time and keeps its model
cached), keyed by workload and model (class, name or path, dtype, device), so the next job
on the same model starts at the size that fitted instead of failing again. It only ever goes
down: a transient OOM (another process on the GPU) lowers it until the worker restarts.
`forget()` clears it.

No torch import at module level: `is_out_of_memory` is also used by `worker.service.runner`.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

log = logging.getLogger("layerscope.worker.batching")

T = TypeVar("T")
R = TypeVar("R")

_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")
_remembered: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError and torch's OutOfMemoryError (CUDA), and the allocation failures torch
    reports as a RuntimeError (`MPS backend out of memory`, `DefaultCPUAllocator: can't
    allocate memory`, `unable to mmap ... Cannot allocate memory (12)`) or the OS as ENOMEM."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == 12:  # ENOMEM
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError | OSError) and any(m in text for m in _OOM_TEXT)


def model_key(model: Any) -> str:
    """What a remembered batch size is keyed by: the model's class, name or path, dtype and
    device (read from its first parameter)."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "")
    dtype = device = "?"
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            dtype, device = str(first.dtype), str(first.device)
    return f"{type(model).__name__}|{name}|{dtype}|{device}"


def remembered(workload: str, model: Any) -> int | None:
    with _lock:
        return _remembered.get((workload, model_key(model)))


def forget() -> None:
    """Drop every remembered size (tests; or after the GPU was freed)."""
    with _lock:
        _remembered.clear()


def release_memory() -> None:
    """Return the failed batch's memory: collect its tensors and empty the CUDA cache."""
    gc.collect()
    import torch  # only when an OOM happened

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class AutoBatch:
    """One workload's batch size on one model (see module doc)."""

    def __init__(self, workload: str, model: Any, requested: int, *, min_size: int = 1):
        if requested < 1 or min_size < 1:
            raise ValueError("batch sizes must be >= 1")
        self.workload = workload
        self.key = (workload, model_key(model))
        self.requested = int(requested)
        self.min_size = int(min_size)
        with _lock:
            known = _remembered.get(self.key)
        self.size = min(self.requested, known) if known is not None else self.requested
        self.backoffs: list[tuple[int, int]] = []  # (rows that ran out of memory, new batch size)
        self.done = 0  # batches completed in the current run()
        self.total = 0  # done + batches left at the current size (grows when the size is lowered)
        self.rows_done = 0  # rows of completed batches in the current run()
        self.rows_total = 0  # rows of the current run()

    @property
    def progress(self) -> tuple[int, int]:
        """(rows done, rows in all) of the current run: what to report as progress. Unlike
        batches, it never goes backwards when an out-of-memory back-off adds batches."""
        return self.rows_done, self.rows_total

    def total_for(self, items: Sequence[Any]) -> int:
        """Batches `items` takes at the current size (for a progress total before run())."""
        return math.ceil(len(items) / self.size)

    def run(self, items: Sequence[T], compute: Callable[[list[T]], R]) -> Iterator[tuple[list[T], R]]:
        """Yield (rows, compute(rows)) for consecutive batches of `items`, backing off on OOM.
        An OOM on a batch of `min_size` rows (or any other error) is raised."""
        items = list(items)
        pos = 0
        self.done = 0
        self.total = math.ceil(len(items) / self.size) if items else 0
        self.rows_done, self.rows_total = 0, len(items)
        while pos < len(items):
            rows = items[pos : pos + self.size]
            reason = ""
            try:
                out = compute(rows)
            except BaseException as exc:
                if not is_out_of_memory(exc) or len(rows) <= self.min_size:
                    raise
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            if reason:
                # outside the except block, so the traceback (and the tensors its frames hold) is gone
                self._shrink(len(rows), reason)
                release_memory()
                self.total = self.done + math.ceil((len(items) - pos) / self.size)
                continue
            pos += len(rows)
            self.done += 1
            self.rows_done = pos
            yield rows, out

    def _shrink(self, failed_rows: int, reason: str) -> None:
        new = max(self.min_size, failed_rows // 2)
        self.size = new
        self.backoffs.append((failed_rows, new))
        with _lock:
            old = _remembered.get(self.key)
            _remembered[self.key] = new if old is None else min(old, new)
        log.warning(
            "%s: out of memory on a batch of %d; retrying at batch size %d (%s)",
            self.workload, failed_rows, new, reason,
        )

    def warning(self) -> str | None:
        """A line for the stage's warnings when the size was lowered, else None."""
        if not self.backoffs and self.size == self.requested:
            return None
        return (
            f"batch size {self.requested} lowered to {self.size} to fit in memory "
            f"({self.workload}; out-of-memory back-offs this run: {len(self.backoffs)})"
        )
