"""The `hallucination` stage: answer, judge, detect, and score layers by EAVSS
(worker.hallucination.stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.schemas import AnalysisSpec, HallucinationOptions
from worker.scoring.agreement import Ranking
from worker.stage import Key, Stage, StageInputs, StageOutput

if TYPE_CHECKING:
    from worker.datasets import Example

# Block indices, highest EAVSS (most hallucination-prone) first; scores: EAVSS per layer.
EAVSS_RANKING: Key[Ranking] = Key("hallucination.eavss_ranking")


def qa_split(job: StageInputs) -> tuple[list[Example], list[Example]]:
    """The train/test split of the analysis data. Both the hallucination and the mitigate
    stage use the hallucination options' split (mitigate: its defaults without that stage),
    so mitigate never trains on a question the hallucination stage scored on."""
    from worker.hallucination.stage import split_examples

    hopts = job.spec.stages.hallucination or HallucinationOptions()
    return split_examples(job.examples, hopts.test_fraction, hopts.seed)


class HallucinationStage(Stage[HallucinationOptions]):
    name = "hallucination"
    options_model = HallucinationOptions

    def options(self, spec: AnalysisSpec) -> HallucinationOptions | None:
        return spec.stages.hallucination

    def run(self, job: StageInputs, options: HallucinationOptions) -> StageOutput:
        from worker.hallucination.stage import analyze_hallucination

        train, test = qa_split(job)
        run = analyze_hallucination(
            job.loaded, train, test, options, job.ctx,
            profile_options=job.spec.stages.profile, avss_options=job.spec.stages.avss,
            dataset_name=job.dataset_name, judges=job.settings.judges,
        )
        return StageOutput(run.result).provide(
            EAVSS_RANKING, Ranking(tuple(run.ranking), "highest", tuple(run.eavss.eavss))
        )
