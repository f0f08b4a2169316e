"""The standard white-box estimators (lm-polygraph's MaximumSequenceProbability, Perplexity and
MeanTokenEntropy as confidences, with and without the end-of-answer token) and the discrete
semantic-consistency score, each on a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.hallucination.detectors import (
    entropy_confidence,
    inverse_perplexity,
    max_sequence_probability,
    mean_token_entropy,
    semantic_clusters,
    semantic_consistency,
    sequence_likelihood,
)
from worker.hallucination.generation import Generation

LN = math.log


def _gens() -> list[Generation]:
    return [
        # two answer tokens (p 0.5, 0.25) and a newline ending it (p 0.8)
        Generation("a b", " a b", [1, 2], [LN(0.5), LN(0.25)], "newline", entropies=[1.0, 2.0],
                   end_logprob=LN(0.8), end_entropy=0.5),
        # cut at the token cap: nothing ended it
        Generation("c", " c", [3], [LN(0.9)], "max_tokens", entropies=[0.3]),
        # empty: EOS at once (never correct: every estimator gives 0)
        Generation("", "", [], [], "eos", end_logprob=LN(0.7), end_entropy=0.1),
    ]


def test_max_sequence_probability_with_and_without_the_end_token() -> None:
    with_end = max_sequence_probability(_gens(), with_end=True)
    without = max_sequence_probability(_gens(), with_end=False)
    assert with_end.tolist() == pytest.approx([0.5 * 0.25 * 0.8, 0.9, 0.0])
    assert without.tolist() == pytest.approx([0.5 * 0.25, 0.9, 0.0])


def test_perplexity_counts_the_end_token_and_sequence_likelihood_does_not() -> None:
    assert inverse_perplexity(_gens()).tolist() == pytest.approx([(0.5 * 0.25 * 0.8) ** (1 / 3), 0.9, 0.0])
    assert sequence_likelihood(_gens()).tolist() == pytest.approx([(0.5 * 0.25) ** 0.5, 0.9, 0.0])


def test_mean_token_entropy() -> None:
    h = mean_token_entropy(_gens())
    assert h[:2].tolist() == pytest.approx([(1.0 + 2.0 + 0.5) / 3, 0.3]) and math.isnan(h[2])
    assert entropy_confidence(_gens()).tolist() == pytest.approx([math.exp(-3.5 / 3), math.exp(-0.3), 0.0])


def test_semantic_clusters_close_transitively() -> None:
    # "a b" and "c d" share no word, but "b c" links them: one cluster; "x" and "x y" another
    def share(a: str, b: str) -> bool:
        return bool(set(a.split()) & set(b.split()))

    assert semantic_clusters(["a b", "x", "c d", "b c", "x y", "z"], share) == [0, 1, 0, 0, 1, 2]


def test_semantic_consistency_is_one_minus_normalized_entropy() -> None:
    samples = [
        ["Paris", "paris", "London", "Rome"],  # shares 1/2, 1/4, 1/4: SE = 1.5 ln 2, log K = 2 ln 2
        ["Paris", "The Paris.", "paris", "PARIS"],  # one cluster
        ["Paris", "London", "Rome", "Oslo"],  # four
        ["", "", "x", "x"],  # empty answers match each other: two halves, SE = ln 2
    ]
    got = semantic_consistency(samples)
    assert got.tolist() == pytest.approx([0.25, 1.0, 0.0, 0.5])
    with pytest.raises(ValueError):
        semantic_consistency([["only one"]])
    assert np.all((got >= 0) & (got <= 1))
