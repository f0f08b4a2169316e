"""The `profile` stage: one hook pass over the data (worker.profiler) that every stage
reading activation statistics shares; stored only when the analysis asks for it."""

from __future__ import annotations

from app.schemas import AnalysisSpec, ProfileOptions
from worker.profiler.profiler import Profile
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
        from worker.scoring.avss import run_profile_stage

        avss = avss_options(job.spec)
        # An absolute threshold is counted exactly during the pass instead of read off the histogram.
        exact = [avss.sparsity_eps] if avss and avss.sparsity_threshold == "absolute" else []
        prof = profile(job.loaded, job.examples, options, job.ctx,
                       max_tokens=job.spec.dataset.max_tokens, thresholds=exact)
        stored = run_profile_stage(prof) if job.spec.stages.profile else None
        return StageOutput(stored).provide(PROFILE, prof)
