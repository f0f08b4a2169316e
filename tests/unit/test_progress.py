"""The progress guard of the job service and the phased bar: what a client reads never goes back."""

from __future__ import annotations

from worker.progress import Monotonic, PhasedProgress
from worker.stage import JobContext


def test_guard_drops_reports_that_go_back_or_repeat_per_stage() -> None:
    written: list[tuple[str, int, int]] = []
    guard = Monotonic(lambda s, d, t: written.append((s, d, t)))
    for report in [("profile", 0, 4), ("profile", 2, 4), ("profile", 2, 4), ("profile", 2, 8),  # a back-off: 2/8 < 2/4
                   ("profile", 5, 8), ("profile", 0, 4),  # a second pass restarting its count
                   ("prune:score:cim", 0, 5), ("prune:score:cim", 5, 5), ("prune:original:perplexity", 0, 2),
                   ("prune", 3, 3)]:
        guard(*report)
    assert written == [("profile", 0, 4), ("profile", 2, 4), ("profile", 5, 8), ("prune:score:cim", 0, 5),
                       ("prune:score:cim", 5, 5), ("prune", 3, 3)]


def test_labelled_phases_share_the_stage_bar() -> None:
    seen: list[tuple[str, int, int]] = []
    bar = PhasedProgress(JobContext(progress=lambda s, d, t: seen.append((s, d, t))), "prune", 20)
    for name in ("prune:score:cim", "prune:original:perplexity"):
        sub = bar.sub_context(10, labelled=True)
        for done in range(3):
            sub.progress(name, done, 2)
    bar.finish()
    assert seen == [("prune", 0, 20), ("prune:score:cim", 0, 20), ("prune:score:cim", 5, 20),
                    ("prune:score:cim", 10, 20), ("prune:original:perplexity", 10, 20),
                    ("prune:original:perplexity", 15, 20), ("prune:original:perplexity", 20, 20), ("prune", 20, 20)]
