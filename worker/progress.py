"""Progress a client can trust: it never goes backwards.

`PhasedProgress` is one bar over the phases of a long stage. A stage made of several
sub-steps (scoring, evaluation, generation, profiling, training, ...) each reporting their
own `(done, total)` shows the client a single `ctx.progress(stage, done, total)` that never
goes backwards: every phase owns a fixed number of units of the total. A labelled phase
reports under the sub-step's own name (`prune:score:cim`) with the stage's units, so the
client sees what runs and one bar.

`Monotonic` is the job service's guard over every report of a job: per stage (the name
before the first `:`), a report whose done/total fraction is below the last one written is
dropped, and so is a repeat of the last one; so a stage that restarts a count (a second
pass, a batch-size back-off) holds its bar instead of moving it back.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.stage import JobContext

ProgressFn = Callable[[str, int, int], None]


class PhasedProgress:
    def __init__(self, ctx: JobContext, stage: str, total: int) -> None:
        self.ctx = ctx
        self.stage = stage
        self.total = max(1, int(total))
        self.base = 0
        self.ctx.progress(stage, 0, self.total)

    def phase(self, units: int, label: str | None = None) -> Callable[..., None]:
        """Reserve the next `units`; the returned `report(done, total[, label])` fills them
        (under `label`, else this phase's label, else the stage's name)."""
        base = self.base
        self.base += units

        def report(done: int, total: int, sub_label: str | None = None) -> None:
            frac = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
            self.ctx.progress(sub_label or label or self.stage,
                              min(self.total, base + int(round(frac * units))), self.total)

        return report

    def sub_context(self, units: int, *, labelled: bool = False) -> JobContext:
        """A JobContext whose progress fills the next `units`; `labelled`: reported under the
        stage name the sub-step gives (else under this stage's name)."""
        report = self.phase(units)
        return JobContext(
            progress=lambda stage, done, total: report(done, total, stage if labelled else None),
            is_cancelled=self.ctx.is_cancelled,
            deadline=self.ctx.deadline,
        )

    def finish(self) -> None:
        self.ctx.progress(self.stage, self.total, self.total)


def stage_of(name: str) -> str:
    """The stage a progress name belongs to (`prune:score:cim` -> `prune`)."""
    return name.split(":", 1)[0]


class Monotonic:
    """Wraps a job's progress callback so what it writes never goes backwards (see module doc)."""

    def __init__(self, write: ProgressFn) -> None:
        self.write = write
        self.last: dict[str, tuple[float, int, int]] = {}  # stage -> (fraction, done, total)

    def __call__(self, name: str, done: int, total: int) -> None:
        stage = stage_of(name)
        frac = 0.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
        seen = self.last.get(stage)
        if seen is not None and (frac < seen[0] or (frac == seen[0] and (done, total) == seen[1:])):
            return
        self.last[stage] = (frac, done, total)
        self.write(name, done, total)
