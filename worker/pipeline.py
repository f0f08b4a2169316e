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
from app.schemas import AnalysisSpec, AvssOptions, ProfileOptions
from worker.stage import JobContext, StageResult


def profile_options(spec: AnalysisSpec) -> ProfileOptions:
    """The profiler options, with every site a later stage needs added."""
    options = spec.stages.profile or ProfileOptions()
    sites = list(options.sites)
    avss = avss_options(spec)
    if avss and avss.site not in sites:
        sites.append(avss.site)
    return options.model_copy(update={"sites": sites})


def avss_options(spec: AnalysisSpec) -> AvssOptions | None:
    """AVSS runs when asked for, or when pruning ranks layers by it (with default options)."""
    if spec.stages.avss:
        return spec.stages.avss
    if spec.stages.prune and "avss" in spec.stages.prune.scorers:
        return AvssOptions(plots=False)
    return None


def run_pipeline(
    spec: AnalysisSpec, ctx: JobContext, settings: Settings, save: Callable[[StageResult], None]
) -> None:
    from worker.datasets import load_examples
    from worker.modelzoo import load_model
    from worker.profiler import profile
    from worker.scoring.avss import run_avss_stage, run_profile_stage

    ctx.progress("load_model", 0, 1)
    patch = spec.model.patch
    # A patched model is loaded apart from the process cache, which keeps only base weights.
    loaded = load_model(spec.model, settings, use_cache=patch is None)
    if patch is not None:
        from worker.mitigation.patch import apply_patch, read_patch_source

        apply_patch(loaded, read_patch_source(patch, settings, ctx))
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
    avss = avss_options(spec)
    avss_result: StageResult | None = None
    if stages.profile or avss:
        started = time.monotonic()
        # An absolute threshold is counted exactly during the pass instead of read off the histogram.
        exact = [avss.sparsity_eps] if avss and avss.sparsity_threshold == "absolute" else []
        prof = profile(
            loaded, examples, profile_options(spec), ctx, max_tokens=spec.dataset.max_tokens, thresholds=exact
        )
        if stages.profile:
            timed_save(run_profile_stage(prof), started)
        if avss:
            started = time.monotonic()
            avss_result = run_avss_stage(prof, avss)
            timed_save(avss_result, started)
        del prof

    if stages.prune:
        from worker.pruning import run_prune_stage

        started = time.monotonic()
        rankings: dict[str, list[int]] = {}
        scores: dict[str, list[float]] = {}
        if avss_result is not None:
            rankings["avss"] = list(avss_result.summary["ranking"])
            by_layer = sorted(avss_result.layers, key=lambda r: r.layer)
            scores["avss"] = [float(r.values.get("navss") or 0.0) for r in by_layer]
        qa_examples = None
        if stages.prune.qa_dataset is not None:
            qa_examples = load_examples(stages.prune.qa_dataset, settings)
        result = run_prune_stage(
            loaded, examples, stages.prune, ctx, rankings,
            scores=scores, qa_examples=qa_examples, max_tokens=spec.dataset.max_tokens,
        )
        timed_save(result, started)

    if not (stages.hallucination or stages.mitigate):
        return
    from app.schemas import HallucinationOptions
    from worker.hallucination.stage import run_hallucination_stage, split_examples

    dataset_name = spec.dataset.name or spec.dataset.path or spec.dataset.hub or "inline"
    # Both stages use the hallucination options' split (mitigate: its defaults without that
    # stage), so mitigate never trains on a question the hallucination stage scored on.
    hopts = stages.hallucination or HallucinationOptions()
    train, test = split_examples(examples, hopts.test_fraction, hopts.seed)
    eavss_ranking: list[int] | None = None
    if stages.hallucination:
        started = time.monotonic()
        result = run_hallucination_stage(
            loaded, train, test, hopts, ctx,
            profile_options=stages.profile, avss_options=stages.avss, dataset_name=dataset_name,
        )
        eavss_ranking = list(result.summary["layer_scores"]["ranking"])
        timed_save(result, started)
        del result

    if stages.mitigate:
        from worker.mitigation.stage import run_mitigate_stage

        started = time.monotonic()
        general = load_examples(stages.mitigate.perplexity_dataset, settings)
        result = run_mitigate_stage(
            loaded, train, test, stages.mitigate, ctx,
            hallucination_options=hopts, eavss_ranking=eavss_ranking,
            perplexity_texts=[e.as_text() for e in general], dataset_name=dataset_name,
        )
        timed_save(result, started)
