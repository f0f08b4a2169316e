"""The registered stages of an analysis (the contract: `worker.stage.Stage`).

One module per stage; `STAGES` lists them in a dependency order, which
`worker.pipeline.stage_order` checks. Adding a stage: a module with a `Stage`
subclass (its name in `app.schemas.StagesSpec`, its options model, `needs`,
`options(spec)` and `run`) and one entry here.
"""

from __future__ import annotations

from typing import Any

from worker.stage import Stage
from worker.stages.avss import AvssStage
from worker.stages.hallucination import HallucinationStage
from worker.stages.mitigate import MitigateStage
from worker.stages.profile import ProfileStage
from worker.stages.prune import PruneStage

STAGES: dict[str, Stage[Any]] = {
    stage.name: stage
    for stage in (ProfileStage(), AvssStage(), PruneStage(), HallucinationStage(), MitigateStage())
}

__all__ = ["STAGES"]
