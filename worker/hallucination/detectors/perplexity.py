"""`perplexity` (lm-polygraph's Perplexity as a confidence): 1 / perplexity of the greedy answer,
exp(mean token log-probability), counting the end-of-answer token as the toolkit does
(`sequence_likelihood` is the same mean without it). An empty answer gets 0."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, logprob_confidence
from worker.hallucination.generation import Generation


def inverse_perplexity(generations: Sequence[Generation]) -> np.ndarray:
    """exp(mean log p) over the answer tokens and the end-of-answer token; 0.0 for an empty answer."""
    return logprob_confidence(generations, np.mean, with_end=True)


class Perplexity(Detector):
    name = "perplexity"
    phase = "answers"
    toolkit = True
    compute = "none: the greedy answers' token log-probabilities"

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=inverse_perplexity(inp.answers.generations))
