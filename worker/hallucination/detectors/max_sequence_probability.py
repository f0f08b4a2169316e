"""`max_sequence_probability` (lm-polygraph's MaximumSequenceProbability as a confidence): the
probability of the whole greedy answer, exp(sum of token log-probabilities), counting the token
that ended the answer (the newline or EOS, `Generation.end_logprob`) as the toolkit does: the
model's belief that the answer is complete belongs to the answer. An empty answer gets 0 (it is
never correct). Scores every answer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from app.schemas import HallucinationOptions
from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import Generation


def token_logprobs(g: Generation, with_end: bool) -> list[float]:
    """The answer tokens' log-probabilities, and the end-of-answer token's `with_end`."""
    return g.logprobs_with_end if with_end else g.logprobs


def max_sequence_probability(generations: Sequence[Generation], *, with_end: bool = True) -> np.ndarray:
    """exp(sum log p) per answer (`with_end`: and the end-of-answer token); 0.0 for an empty answer."""
    out = np.zeros(len(generations), dtype=np.float64)
    for i, g in enumerate(generations):
        total = float(np.sum(token_logprobs(g, with_end))) if g.token_ids else -math.inf
        out[i] = min(max(math.exp(total), 0.0), 1.0) if math.isfinite(total) else 0.0
    return out


class MaxSequenceProbability(Detector):
    name = "max_sequence_probability"
    phase = "answers"
    toolkit = True
    compute = "none: the greedy answers' token log-probabilities"

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        return 0

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=max_sequence_probability(inp.answers.generations, with_end=True))
