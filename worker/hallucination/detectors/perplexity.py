"""`perplexity` (lm-polygraph's Perplexity as a confidence): 1 / perplexity of the greedy answer,
exp(mean token log-probability), counting the end-of-answer token as the toolkit does
(`sequence_likelihood` is the same mean without it). An empty answer gets 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from app.schemas import HallucinationOptions
from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import Generation


def inverse_perplexity(generations: Sequence[Generation]) -> np.ndarray:
    """exp(mean log p) over the answer tokens and the end-of-answer token; 0.0 for an empty answer."""
    out = np.zeros(len(generations), dtype=np.float64)
    for i, g in enumerate(generations):
        lps = g.logprobs_with_end
        mean = float(np.mean(lps)) if g.token_ids and lps else -math.inf
        out[i] = min(max(math.exp(mean), 0.0), 1.0) if math.isfinite(mean) else 0.0
    return out


class Perplexity(Detector):
    name = "perplexity"
    phase = "answers"
    toolkit = True
    compute = "none: the greedy answers' token log-probabilities"

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        return 0

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=inverse_perplexity(inp.answers.generations))
