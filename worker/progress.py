"""One monotonic progress bar over the phases of a long stage.

A stage made of several sub-steps (generation, profiling, training, ...) each reporting
their own `(done, total)` shows the client a single `ctx.progress(stage, done, total)`
that never goes backwards: every phase owns a fixed number of units of the total.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.stage import JobContext


class PhasedProgress:
    def __init__(self, ctx: JobContext, stage: str, total: int) -> None:
        self.ctx = ctx
        self.stage = stage
        self.total = max(1, int(total))
        self.base = 0
        self.ctx.progress(stage, 0, self.total)

    def phase(self, units: int) -> Callable[[int, int], None]:
        """Reserve the next `units`; the returned `report(done, total)` fills them."""
        base = self.base
        self.base += units

        def report(done: int, total: int) -> None:
            frac = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
            self.ctx.progress(self.stage, min(self.total, base + int(round(frac * units))), self.total)

        return report

    def sub_context(self, units: int) -> JobContext:
        """A JobContext whose progress (under any stage name) fills the next `units`."""
        report = self.phase(units)
        return JobContext(
            progress=lambda _stage, done, total: report(done, total),
            is_cancelled=self.ctx.is_cancelled,
            deadline=self.ctx.deadline,
        )

    def finish(self) -> None:
        self.ctx.progress(self.stage, self.total, self.total)
