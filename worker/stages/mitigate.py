"""The `mitigate` stage: tune the layers EAVSS points at and compare before/after
(worker.mitigation.stage)."""

from __future__ import annotations

from app.schemas import AnalysisSpec, HallucinationOptions, MitigateOptions
from worker.modelcard import Provenance
from worker.stage import Stage, StageInputs, StageOutput


class MitigateStage(Stage[MitigateOptions]):
    name = "mitigate"
    needs = ("hallucination",)  # its EAVSS ranking when it ran; else mitigate computes one
    options_model = MitigateOptions

    def options(self, spec: AnalysisSpec) -> MitigateOptions | None:
        return spec.stages.mitigate

    def run(self, job: StageInputs, options: MitigateOptions) -> StageOutput:
        from worker.mitigation.stage import run_mitigate_stage
        from worker.stages.hallucination import EAVSS_RANKING, qa_split

        train, test = qa_split(job)
        eavss = job.values.get(EAVSS_RANKING)
        general = job.load_examples(options.perplexity_dataset)
        result = run_mitigate_stage(
            job.loaded, train, test, options, job.ctx,
            hallucination_options=job.spec.stages.hallucination or HallucinationOptions(),
            eavss=eavss,
            perplexity_texts=[e.as_text() for e in general], dataset_name=job.dataset_name,
            judges=job.settings.judges,
            provenance=Provenance.of(job.spec, job.loaded, job.ctx.analysis_id),
        )
        return StageOutput(result)
