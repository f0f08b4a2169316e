"""`mean_token_entropy` (lm-polygraph's MeanTokenEntropy as a confidence): exp(-H), H the mean
entropy (nats, temperature 1) of the model's next-token distribution over the greedy answer's
tokens and its end-of-answer token **(choice: exp(-H) maps H in [0, log V] into (0, 1] and keeps
the order, so AUROC is the toolkit's; the scale is the "effective probability" 1 / e^H)**. An
empty answer gets 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import Generation


def mean_token_entropy(generations: Sequence[Generation]) -> np.ndarray:
    """The mean token entropy H per answer (end-of-answer token included); NaN for an empty answer."""
    out = np.full(len(generations), np.nan, dtype=np.float64)
    for i, g in enumerate(generations):
        ents = g.entropies_with_end
        if g.token_ids and ents:
            out[i] = float(np.mean(ents))
    return out


def entropy_confidence(generations: Sequence[Generation]) -> np.ndarray:
    """exp(-mean token entropy) per answer; 0.0 for an empty answer."""
    h = mean_token_entropy(generations)
    return np.where(np.isfinite(h), np.exp(-np.where(np.isfinite(h), np.maximum(h, 0.0), math.inf)), 0.0)


class MeanTokenEntropy(Detector):
    name = "mean_token_entropy"
    phase = "answers"
    toolkit = True
    compute = "none: the greedy answers' token entropies"

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=entropy_confidence(inp.answers.generations))
