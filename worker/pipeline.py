"""The stages of an analysis, in dependency order, independent of Celery and the database.

`run_pipeline` loads the model and the data once, runs what the spec asks for
(a stage pulls in what it needs: `avss` runs the profiler), and hands each
stage's result to `save` as soon as it is done, so a client sees partial results
and a redelivered job overwrites rather than duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.config import Settings
from app.schemas import AnalysisSpec, ProfileOptions
from worker.stage import JobContext, StageResult


def profile_options(spec: AnalysisSpec) -> ProfileOptions:
    """The profiler options, with every site a later stage needs added."""
    options = spec.stages.profile or ProfileOptions()
    sites = list(options.sites)
    if spec.stages.avss and spec.stages.avss.site not in sites:
        sites.append(spec.stages.avss.site)
    return options.model_copy(update={"sites": sites})


def run_pipeline(
    spec: AnalysisSpec, ctx: JobContext, settings: Settings, save: Callable[[StageResult], None]
) -> None:
    from worker.datasets import load_examples
    from worker.modelzoo import load_model
    from worker.profiler import profile
    from worker.scoring.avss import run_avss_stage, run_profile_stage

    ctx.progress("load_model", 0, 1)
    loaded = load_model(spec.model, settings)
    ctx.progress("load_model", 1, 1)
    ctx.check_cancelled()
    ctx.progress("load_dataset", 0, 1)
    examples = load_examples(spec.dataset, settings)
    ctx.progress("load_dataset", 1, 1)
    ctx.check_cancelled()

    def timed_save(result: StageResult, started: float) -> None:
        result.summary["seconds"] = round(time.monotonic() - started, 3)
        save(result)

    stages = spec.stages
    if stages.profile or stages.avss:
        started = time.monotonic()
        avss = stages.avss
        # An absolute threshold is counted exactly during the pass instead of read off the histogram.
        exact = [avss.sparsity_eps] if avss and avss.sparsity_threshold == "absolute" else []
        prof = profile(
            loaded, examples, profile_options(spec), ctx, max_tokens=spec.dataset.max_tokens, thresholds=exact
        )
        if stages.profile:
            timed_save(run_profile_stage(prof), started)
        if stages.avss:
            timed_save(run_avss_stage(prof, stages.avss), time.monotonic())
