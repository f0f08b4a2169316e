"""The stage contract: every stage of the schema is registered with its options model,
the pipeline orders stages by what they need, and rankings know their orientation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from app.schemas import AnalysisSpec, StagesSpec
from worker.pipeline import stage_order
from worker.scoring.agreement import Ranking
from worker.stage import Key, Stage, StageInputs, StageOutput, Values
from worker.stages import STAGES


def test_every_schema_stage_is_registered_with_its_options_model() -> None:
    assert list(STAGES) == list(StagesSpec.model_fields)
    for name, field in StagesSpec.model_fields.items():
        assert STAGES[name].name == name
        assert field.annotation == STAGES[name].options_model | None


def test_stages_run_after_what_they_need() -> None:
    order = stage_order(STAGES)
    for name, stage in STAGES.items():
        for need in stage.needs:
            assert order.index(need) < order.index(name)


def _toy(name: str, needs: tuple[str, ...]) -> Stage[Any]:
    cls: type[Stage[Any]] = type(f"Toy{name}", (Stage,), {"name": name, "needs": needs, "options_model": BaseModel})
    return cls()


def test_stage_order_rejects_cycles_and_unknown_needs() -> None:
    assert stage_order({"b": _toy("b", ("a",)), "a": _toy("a", ())}) == ["a", "b"]
    with pytest.raises(ValueError, match="cycle"):
        stage_order({"a": _toy("a", ("b",)), "b": _toy("b", ("a",))})
    with pytest.raises(ValueError, match="not registered"):
        stage_order({"a": _toy("a", ("x",))})


def test_which_stages_an_analysis_runs() -> None:
    def runs(stages: dict[str, Any]) -> list[str]:
        spec = AnalysisSpec.model_validate({"dataset": {"rows": [{"text": "x"}]}, "stages": stages})
        return [n for n in stage_order(STAGES) if STAGES[n].options(spec) is not None]

    assert runs({"avss": {}}) == ["profile", "avss"]
    assert runs({"prune": {"scorers": ["avss", "cim"]}}) == ["profile", "avss", "prune"]
    assert runs({"prune": {"scorers": ["cim"]}}) == ["prune"]
    assert runs({"hallucination": {}, "mitigate": {}}) == ["hallucination", "mitigate"]
    spec = AnalysisSpec.model_validate(
        {"dataset": {"rows": [{"text": "x"}]}, "stages": {"avss": {"site": "mlp_activation"}}}
    )
    profile = STAGES["profile"].options(spec)
    assert profile is not None and set(profile.sites) == {"block_output", "mlp_activation"}


def test_values_are_typed_and_dropped_by_stage() -> None:
    key: Key[int] = Key("n")
    values = Values()
    assert values.get(key) is None
    with pytest.raises(RuntimeError, match="declare the stage"):
        values.require(key)
    values.put(key, 3, by="a")
    assert values.require(key) == 3
    values.drop("a")
    assert values.get(key) is None
    out = StageOutput(None).provide(key, 5)
    assert out.values == [(key, 5)]
    assert StageInputs.__dataclass_fields__["values"].default_factory is Values  # type: ignore[misc]


def test_ranking_knows_its_orientation() -> None:
    low = Ranking.from_scores([0.3, 0.1, 0.2, 0.1])
    assert low.lowest_first() == [1, 3, 2, 0]  # ties: lower index first
    assert low.highest_first() == [0, 2, 3, 1]
    assert low.ranks() == [4, 1, 3, 2]
    high = Ranking.from_scores([0.3, 0.1, 0.2, float("nan")], first="highest")
    assert high.highest_first() == [0, 2, 1, 3]  # a non-finite score last
    assert high.lowest_first() == [3, 1, 2, 0]
