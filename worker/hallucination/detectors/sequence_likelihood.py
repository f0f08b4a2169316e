"""`sequence_likelihood` ("original LLM"): the geometric-mean token probability of the greedy
answer, exp(mean log p) over its tokens; an empty answer gets 0. Scores every answer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from app.schemas import HallucinationOptions
from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import Generation


def sequence_likelihood(generations: Sequence[Generation]) -> np.ndarray:
    """exp(mean token log-probability) per answer; 0.0 for an empty answer."""
    out = np.zeros(len(generations), dtype=np.float64)
    for i, g in enumerate(generations):
        m = g.mean_logprob
        out[i] = 0.0 if m is None or not math.isfinite(m) else min(max(math.exp(m), 0.0), 1.0)
    return out


class SequenceLikelihood(Detector):
    name = "sequence_likelihood"
    phase = "answers"
    compute = "none: the greedy answers' token log-probabilities"

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        return 0

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=sequence_likelihood(inp.answers.generations))
