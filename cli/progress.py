"""What `layerscope wait` (and `submit --wait`) shows while an analysis runs.

On a terminal: a rich progress bar per stage (the running phase's name, done/total, elapsed
time and an ETA), redrawn in place. Otherwise (CI logs, pipes): one plain line per change of
state or progress, with an ETA once the stage has moved; never a line per poll. The service's
progress never goes backwards within a stage (the name before the first `:`), so a bar only
grows; the ETA is taken from when the stage started.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from app.schemas import AnalysisOut


def stage_of(name: str | None) -> str:
    return (name or "").split(":", 1)[0]


def eta_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Lines:
    """A line per change: `RUNNING    prune:score:cim   12/40  ETA 1m05s`."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self.started: dict[str, tuple[float, int]] = {}  # stage -> (when first seen, done then)
        self.last: tuple[Any, ...] | None = None

    def __call__(self, job: AnalysisOut) -> None:
        p = job.progress
        shown = (job.state.value, p.stage, p.done, p.total)
        if shown == self.last:
            return
        self.last = shown
        now = time.monotonic()
        t0, d0 = self.started.setdefault(stage_of(p.stage), (now, p.done))
        line = f"{job.state.value:<10} {p.stage or '-':<28} {p.done}/{p.total}"
        if p.total and d0 < p.done < p.total and now > t0:
            line += f"  ETA {eta_text((now - t0) / (p.done - d0) * (p.total - p.done))}"
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        pass


class Bars:
    """A rich progress bar per stage on a terminal (stderr), with elapsed time and ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.fields[state]:<10}"), TextColumn("{task.description:<28}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task: Any = None
        self.stage: str | None = None

    def __call__(self, job: AnalysisOut) -> None:
        p = job.progress
        stage = stage_of(p.stage)
        if self.task is None or stage != self.stage:
            if self.task is not None:  # the stage before ended: show it full
                done = self.progress.tasks[-1]
                self.progress.update(self.task, completed=done.total or 1, total=done.total or 1)
            self.stage = stage
            self.task = self.progress.add_task(p.stage or "queued", total=p.total or None, state=job.state.value)
        self.progress.update(self.task, description=p.stage or "queued", completed=p.done, total=p.total or None,
                             state=job.state.value)

    def close(self) -> None:
        self.progress.stop()


def display(tty: bool | None = None) -> Lines | Bars:
    """Bars on a terminal, lines otherwise."""
    return Bars() if (sys.stderr.isatty() if tty is None else tty) else Lines()
