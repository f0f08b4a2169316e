"""The `profile` stage: one hook pass over the data (worker.profiler) that every stage
reading activation statistics shares; stored only when the analysis asks for it."""

from __future__ import annotations

from typing import Any

from app.schemas import AnalysisSpec, ProfileOptions
from worker.profiler.profiler import Profile
from worker.progress import PhasedProgress
from worker.stage import Key, Stage, StageInputs, StageOutput
from worker.stages.avss import avss_options

PROFILE: Key[Profile] = Key("profile")


class ProfileStage(Stage[ProfileOptions]):
    name = "profile"
    options_model = ProfileOptions

    def options(self, spec: AnalysisSpec) -> ProfileOptions | None:
        """Asked for, or needed by avss; with every site avss reads added."""
        avss = avss_options(spec)
        if spec.stages.profile is None and avss is None:
            return None
        options = spec.stages.profile or ProfileOptions()
        sites = list(options.sites)
        if avss and avss.site not in sites:
            sites.append(avss.site)
        return options.model_copy(update={"sites": sites})

    def run(self, job: StageInputs, options: ProfileOptions) -> StageOutput:
        from worker.profiler import profile
        from worker.profiler.profiler import count_exactly
        from worker.scoring.avss import PROFILE_SPARSITY_REL_EPS, counted_thresholds, run_profile_stage

        avss = avss_options(job.spec)
        # An absolute threshold is counted exactly during the pass instead of read off the histogram;
        # a relative one gets fine histogram windows around it (exact with a second pass when asked).
        exact = [avss.sparsity_eps] if avss and avss.sparsity_threshold == "absolute" else []
        relative = [(PROFILE_SPARSITY_REL_EPS, "rms")]
        if avss and avss.sparsity_threshold == "relative":
            relative.append((avss.sparsity_rel_eps, avss.sparsity_reference))
        kwargs: dict[str, Any] = {"max_tokens": job.spec.dataset.max_tokens, "thresholds": exact, "relative": relative}
        two_passes = bool(avss and avss.exact_sparsity and avss.sparsity_threshold == "relative")
        # Two passes share one bar (a unit per example per pass), so the second does not restart it.
        bar = PhasedProgress(job.ctx, self.name, 2 * max(1, len(job.examples))) if two_passes else None
        first = bar.sub_context(max(1, len(job.examples))) if bar else job.ctx
        prof = profile(job.loaded, job.examples, options, first, **kwargs)
        if avss and bar:
            wanted = counted_thresholds(prof, avss, profile_stage=job.spec.stages.profile is not None)
            count_exactly(prof, wanted, job.loaded, job.examples, options, bar.sub_context(max(1, len(job.examples))),
                          **kwargs)
            bar.finish()
        stored = run_profile_stage(prof) if job.spec.stages.profile else None
        return StageOutput(stored).provide(PROFILE, prof)
