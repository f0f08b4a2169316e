"""The detector registry: every registered detector carries its metadata, and the API's
detector names (`app.schemas.Detector`, `ALL_DETECTORS`) are exactly the registry's."""

from __future__ import annotations

from typing import get_args

import pytest

from app.schemas import ALL_DETECTORS, Detector, HallucinationOptions
from worker.hallucination.detectors import DETECTORS, PHASES
from worker.hallucination.detectors import Detector as Base


def test_the_schema_names_are_the_registry() -> None:
    assert list(DETECTORS) == ALL_DETECTORS  # same names, same (default) order
    assert set(get_args(Detector)) == set(DETECTORS)
    assert HallucinationOptions().detectors == list(DETECTORS)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_declares_its_metadata(name: str) -> None:
    d = DETECTORS[name]
    assert d.name == name and d.phase in PHASES and d.compute
    assert set(d.options) <= set(HallucinationOptions.model_fields), d.options
    opts = HallucinationOptions(batch_size=4, self_consistency_k=3)
    for n_test in (0, 1, 9):
        units = d.units(n_test, opts)
        assert isinstance(units, int) and units >= 0
    assert d.units(0, opts) in (0, 1)  # nothing to generate for no answers
    if d.phase in ("generation", "sampling"):
        assert d.units(9, opts) >= 1 and d.timing  # a model pass: shown in progress and timings
    assert d.needs_last_hidden is (name == "p_ik")
    assert type(d).score is not Base.score  # every detector implements score
