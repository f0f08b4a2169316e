"""`sequence_likelihood` ("original LLM"): the geometric-mean token probability of the greedy
answer, exp(mean log p) over its tokens; an empty answer gets 0. Scores every answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, logprob_confidence
from worker.hallucination.generation import Generation


def sequence_likelihood(generations: Sequence[Generation]) -> np.ndarray:
    """exp(mean token log-probability) per answer; 0.0 for an empty answer."""
    return logprob_confidence(generations, np.mean, with_end=False)


class SequenceLikelihood(Detector):
    name = "sequence_likelihood"
    phase = "answers"
    compute = "none: the greedy answers' token log-probabilities"

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=sequence_likelihood(inp.answers.generations))
