"""`semantic_consistency`: one minus the normalized discrete semantic entropy of the K sampled
answers (Farquhar et al. 2024, "discrete" variant; the samples `self_consistency` draws, drawn
here with the same seeded call when it did not run). The K answers are clustered by meaning
(two answers share a cluster when the lexical correctness rules say they match, `answers_match`,
closed transitively), cluster c gets p_c = |c| / K, SE = -sum p_c log p_c, and the confidence is
1 - SE / log K: 1 when every sample says the same, 0 when all K differ. Unlike
`self_consistency` it does not look at the greedy answer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from worker.hallucination.detectors.base import DetectorInput, Scored
from worker.hallucination.detectors.self_consistency import SamplingDetector, answers_match, sample_answers


def semantic_clusters(texts: Sequence[str], same: Callable[[str, str], bool]) -> list[int]:
    """A cluster id per text (0, 1, ... by first appearance): the transitive closure of `same`."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            if root(i) != root(j) and same(texts[i], texts[j]):
                parent[max(root(i), root(j))] = min(root(i), root(j))
    ids: dict[int, int] = {}
    return [ids.setdefault(root(i), len(ids)) for i in range(len(texts))]


def semantic_consistency(
    samples: Sequence[Sequence[str]], *, contains_max_tokens: int = 5, f1_threshold: float = 0.5
) -> np.ndarray:
    """Per question: 1 - (entropy of its samples' cluster shares) / log K (module doc)."""
    out = np.zeros(len(samples), dtype=np.float64)
    for i, ss in enumerate(samples):
        if len(ss) < 2:
            raise ValueError(f"question {i} has {len(ss)} samples; semantic consistency needs at least 2")
        clusters = semantic_clusters(
            ss, lambda a, b: answers_match(a, b, contains_max_tokens=contains_max_tokens, f1_threshold=f1_threshold)
        )
        shares = np.bincount(clusters) / len(ss)
        entropy = float(-(shares * np.log(shares)).sum())
        out[i] = min(max(1.0 - entropy / math.log(len(ss)), 0.0), 1.0)
    return out


class SemanticConsistency(SamplingDetector):
    name = "semantic_consistency"
    compute = "the self_consistency samples (drawn here when self_consistency does not run)"
    timing = "semantic_consistency"

    def score(self, inp: DetectorInput) -> Scored:
        a, o = inp.answers, inp.options
        per_q = sample_answers(inp)
        conf = semantic_consistency(per_q, contains_max_tokens=o.contains_max_tokens, f1_threshold=o.f1_threshold)
        return Scored(confidence=a.full(conf), samples=per_q)
