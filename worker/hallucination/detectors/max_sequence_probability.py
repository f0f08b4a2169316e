"""`max_sequence_probability` (lm-polygraph's MaximumSequenceProbability as a confidence): the
probability of the whole greedy answer, exp(sum of token log-probabilities), counting the token
that ended the answer (the newline or EOS, `Generation.end_logprob`) as the toolkit does: the
model's belief that the answer is complete belongs to the answer. An empty answer gets 0 (it is
never correct). Scores every answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, logprob_confidence
from worker.hallucination.generation import Generation


def max_sequence_probability(generations: Sequence[Generation], *, with_end: bool = True) -> np.ndarray:
    """exp(sum log p) per answer (`with_end`: and the end-of-answer token); 0.0 for an empty answer."""
    return logprob_confidence(generations, np.sum, with_end=with_end)


class MaxSequenceProbability(Detector):
    name = "max_sequence_probability"
    phase = "answers"
    toolkit = True
    compute = "none: the greedy answers' token log-probabilities"

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=max_sequence_probability(inp.answers.generations, with_end=True))
