"""Hallucination detectors (docs/method.md section 5): each gives every answer a confidence in
[0, 1] that it is correct.

- `sequence_likelihood` ("original LLM"): geometric-mean token probability of the greedy
  answer, exp(mean log p) over its tokens. An empty answer gets 0.
- `p_ik` (P(IK), Kadavath et al.): a logistic probe on the final hidden state at the last
  prompt token, trained on the training split (`probe_confidence`).
- `verbalized`: the model's own 0-100 after being asked (`verbalized_confidence`);
  unparseable replies count as 0.5 and are counted.
- `self_consistency`: share of K sampled answers that match the greedy answer
  (`self_consistency`; matching rule in `answers_match`).
- `length`: the answer-length baseline, a logistic probe on the number of answer tokens
  trained on the training split (so it learns the direction and the calibration).
- `eavss_probe` (the paper's method): a logistic probe on the pooled activations of the
  top-k layers by EAVSS, trained on the training split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from worker.evaluation.correctness import contains_match, exact_match, normalize_answer, token_f1
from worker.hallucination.generation import Generation, parse_verbalized
from worker.hallucination.probe import DEFAULT_L2_GRID, LogisticProbe, fit_probe

__all__ = [
    "DETECTORS",
    "answers_match",
    "length_features",
    "probe_confidence",
    "self_consistency",
    "sequence_likelihood",
    "verbalized_confidence",
]

DETECTORS = ("sequence_likelihood", "p_ik", "verbalized", "self_consistency", "length", "eavss_probe")


def sequence_likelihood(generations: Sequence[Generation]) -> np.ndarray:
    """exp(mean token log-probability) per answer; 0.0 for an empty answer."""
    out = np.zeros(len(generations), dtype=np.float64)
    for i, g in enumerate(generations):
        m = g.mean_logprob
        out[i] = 0.0 if m is None or not math.isfinite(m) else min(max(math.exp(m), 0.0), 1.0)
    return out


def length_features(generations: Sequence[Generation]) -> np.ndarray:
    """[answers, 1]: the number of answer tokens."""
    return np.asarray([[float(g.n_tokens)] for g in generations], dtype=np.float64).reshape(-1, 1)


def answers_match(a: str, b: str, *, contains_max_tokens: int = 5, f1_threshold: float = 0.5) -> bool:
    """Whether two answers say the same thing, by the default lexical correctness rules
    (normalized `exact`, `contains` for short answers, token F1 >= threshold). Two empty
    answers match; an empty and a non-empty one do not."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return not na and not nb
    return (
        exact_match(a, b)
        or contains_match(a, b, max_tokens=contains_max_tokens)
        or token_f1(a, b) >= f1_threshold
    )


def self_consistency(
    greedy: Sequence[str], samples: Sequence[Sequence[str]], **match_kw: float
) -> np.ndarray:
    """Per answer: the share of its samples that match the greedy answer (`answers_match`)."""
    if len(greedy) != len(samples):
        raise ValueError(f"{len(greedy)} greedy answers for {len(samples)} sample lists")
    out = np.zeros(len(greedy), dtype=np.float64)
    for i, (g, ss) in enumerate(zip(greedy, samples, strict=True)):
        if not ss:
            raise ValueError(f"answer {i} has no samples")
        out[i] = sum(answers_match(s, g, **match_kw) for s in ss) / len(ss)  # type: ignore[arg-type]
    return out


def verbalized_confidence(replies: Sequence[str], default: float = 0.5) -> tuple[np.ndarray, int]:
    """(confidence per reply, number of unparseable replies, which got `default`)."""
    out = np.zeros(len(replies), dtype=np.float64)
    bad = 0
    for i, text in enumerate(replies):
        value = parse_verbalized(text)
        if value is None:
            bad += 1
            value = default
        out[i] = value
    return out, bad


def probe_confidence(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, LogisticProbe]:
    """Fit a probe on the training split only and return its confidences on the test split."""
    probe = fit_probe(x_train, y_train, l2=l2, l2_grid=l2_grid, folds=folds, seed=seed)
    return np.clip(probe.predict_proba(x_test), 0.0, 1.0), probe
