"""`max_sequence_probability_no_end`: `max_sequence_probability` over the answer tokens only,
without the token that ended the answer (what the service computed before it kept that token;
beside it, it shows what the end-of-answer token is worth). An empty answer gets 0."""

from __future__ import annotations

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.detectors.max_sequence_probability import max_sequence_probability


class MaxSequenceProbabilityNoEnd(Detector):
    name = "max_sequence_probability_no_end"
    phase = "answers"
    compute = "none: the greedy answers' token log-probabilities"

    def score(self, inp: DetectorInput) -> Scored:
        return Scored(confidence=max_sequence_probability(inp.answers.generations, with_end=False))
