"""`length`: the answer-length baseline, a logistic probe on the number of answer tokens
trained on the training split (so it learns the direction and the calibration)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, probe_scored
from worker.hallucination.generation import Generation


def length_features(generations: Sequence[Generation]) -> np.ndarray:
    """[answers, 1]: the number of answer tokens."""
    return np.asarray([[float(g.n_tokens)] for g in generations], dtype=np.float64).reshape(-1, 1)


class Length(Detector):
    name = "length"
    phase = "probe"
    compute = "one probe fit on one feature"
    options = ("probe_l2", "seed")

    def score(self, inp: DetectorInput) -> Scored:
        return probe_scored(
            self.name, length_features(inp.answers.generations), inp,
            weight=lambda probe: float(probe.weight[0]) if probe.weight.size else None,
        )
