"""The ready spec files in examples/ are valid analyses of built-in models and data, one per stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.schemas import AnalysisSpec, StagesSpec
from cli.client import load_spec
from worker.datasets.sources import BUILTIN_DATASETS
from worker.modelzoo.loading import BUILTIN_MODELS

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_is_a_valid_spec_of_built_ins(path: Path) -> None:
    spec = AnalysisSpec.model_validate(load_spec(path, None, None, None, None, []))
    assert spec.model.name in BUILTIN_MODELS
    datasets = [spec.dataset] + [s.qa_dataset for s in [spec.stages.prune] if s and s.qa_dataset]
    assert all(d.name in BUILTIN_DATASETS for d in datasets)
    assert yaml.safe_load(path.read_text())["stages"], "an example says which stages it runs"


def test_every_stage_has_an_example() -> None:
    used = set()
    for path in EXAMPLES:
        used |= set(yaml.safe_load(path.read_text())["stages"])
    assert used == set(StagesSpec.model_fields)
