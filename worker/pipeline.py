"""The stages of an analysis, in dependency order, independent of Celery and the database.

`run_pipeline` loads the model and the data once, runs every registered stage
(`worker.stages.STAGES`) whose `options(spec)` says it runs, in the order of their
`needs` (a stage pulls in what it needs: `avss` runs the profiler), times each once
(`summary["seconds"]`) and hands each result to `save` as soon as it is done, so a
client sees partial results and a redelivered job overwrites rather than duplicates.
Stages pass typed values to later ones (`StageOutput.provide`), never summaries; a
value is dropped once no stage still to run needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from app.config import Settings
from app.schemas import AnalysisSpec
from worker.stage import JobContext, Stage, StageInputs, StageResult


def stage_order(stages: Mapping[str, Stage[Any]]) -> list[str]:
    """The stage names with every stage after the ones it needs (registry order otherwise)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"stages need each other in a cycle: {' -> '.join(path + (name,))}")
        if name not in stages:
            raise ValueError(f"stage {path[-1]!r} needs {name!r}, which is not registered")
        for need in stages[name].needs:
            visit(need, path + (name,))
        order.append(name)

    for name in stages:
        visit(name, ())
    return order


def run_pipeline(
    spec: AnalysisSpec, ctx: JobContext, settings: Settings, save: Callable[[StageResult], None]
) -> None:
    from worker.datasets import load_examples
    from worker.modelzoo import load_model
    from worker.modelzoo.placement import check_offload
    from worker.stages import STAGES

    hopts_given = spec.stages.hallucination
    if hopts_given is not None and "judge" in hopts_given.correctness_rules:
        from worker.hallucination.stage import open_judge

        open_judge(hopts_given, settings.judges).close()  # an unknown judge fails before the model loads
    ctx.progress("load_model", 0, 1)
    patch = spec.model.patch
    # A patched model is loaded apart from the process cache, which keeps only base weights.
    loaded = load_model(spec.model, settings, use_cache=patch is None)
    check_offload(spec, loaded.model)  # gradient stages on an offloaded device_map: a typed error now
    if patch is not None:
        from worker.mitigation.patch import apply_patch, read_patch_source

        apply_patch(loaded, read_patch_source(patch, settings, ctx), expected_method=patch.method)
    ctx.progress("load_model", 1, 1)
    ctx.check_cancelled()
    ctx.progress("load_dataset", 0, 1)
    examples = load_examples(spec.dataset, settings)
    ctx.progress("load_dataset", 1, 1)
    ctx.check_cancelled()

    job = StageInputs(spec=spec, loaded=loaded, examples=examples, ctx=ctx, settings=settings)
    planned = [(name, STAGES[name].options(spec)) for name in stage_order(STAGES)]
    runs = [(name, options) for name, options in planned if options is not None]
    for i, (name, options) in enumerate(runs):
        started = time.monotonic()
        out = STAGES[name].run(job, options)
        for key, value in out.values:
            job.values.put(key, value, by=name)
        if out.result is not None:
            out.result.summary["seconds"] = round(time.monotonic() - started, 3)
            save(out.result)
        del out
        later = {need for other, _ in runs[i + 1:] for need in STAGES[other].needs}
        for done, _ in runs[: i + 1]:
            if done not in later:
                job.values.drop(done)
