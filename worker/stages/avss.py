"""The `avss` stage: AVSS layer scores from the shared profile (worker.scoring.avss)."""

from __future__ import annotations

from app.schemas import AnalysisSpec, AvssOptions
from worker.scoring.agreement import Ranking
from worker.stage import Key, Stage, StageInputs, StageOutput

# Layer indices, lowest AVSS (least important) first; scores: nAVSS per layer.
AVSS_RANKING: Key[Ranking] = Key("avss.ranking")


def avss_options(spec: AnalysisSpec) -> AvssOptions | None:
    """AVSS runs when asked for, or when pruning ranks layers by it (with default options)."""
    if spec.stages.avss:
        return spec.stages.avss
    if spec.stages.prune and "avss" in spec.stages.prune.scorers:
        return AvssOptions(plots=False)
    return None


class AvssStage(Stage[AvssOptions]):
    name = "avss"
    needs = ("profile",)
    options_model = AvssOptions

    def options(self, spec: AnalysisSpec) -> AvssOptions | None:
        return avss_options(spec)

    def run(self, job: StageInputs, options: AvssOptions) -> StageOutput:
        from worker.scoring.avss import avss_stage
        from worker.stages.profile import PROFILE

        out = avss_stage(job.values.require(PROFILE), options)
        return StageOutput(out.result).provide(AVSS_RANKING, out.ranking)
