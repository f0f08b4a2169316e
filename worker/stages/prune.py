"""The `prune` stage: prune by every scorer and measure what is retained (worker.pruning)."""

from __future__ import annotations

from app.schemas import AnalysisSpec, PruneOptions
from worker.stage import Stage, StageInputs, StageOutput


class PruneStage(Stage[PruneOptions]):
    name = "prune"
    needs = ("avss",)  # the avss ranking, when the scorers name it
    options_model = PruneOptions

    def options(self, spec: AnalysisSpec) -> PruneOptions | None:
        return spec.stages.prune

    def run(self, job: StageInputs, options: PruneOptions) -> StageOutput:
        from worker.evaluation.tasks.lm_eval_task import resolve_paths
        from worker.modelcard import Provenance
        from worker.pruning import run_prune_stage
        from worker.stages.avss import AVSS_RANKING

        options = resolve_paths(options, job.settings)  # lm_eval's YAML and data file, under the data roots
        given = {}
        avss = job.values.get(AVSS_RANKING)
        if avss is not None:
            given["avss"] = avss
        qa = job.load_examples(options.qa_dataset) if options.qa_dataset is not None else None
        heal = None
        if options.heal is not None:  # the healing corpus (worker.pruning_heal)
            from worker.pruning_heal import default_heal_dataset

            heal = job.load_examples(options.heal.dataset or default_heal_dataset())
        held_out = (
            job.load_examples(options.perplexity_dataset) if options.perplexity_dataset is not None else None
        )
        result = run_prune_stage(
            job.loaded, job.examples, options, job.ctx, given,
            qa_examples=qa, perplexity_examples=held_out, max_tokens=job.spec.dataset.max_tokens,
            heal_examples=heal, provenance=Provenance.of(job.spec, job.loaded, job.ctx.analysis_id),
        )
        return StageOutput(result)
