"""`self_consistency`: the share of K answers sampled at a temperature
(`self_consistency_k`, `self_consistency_temperature`, seeded) that match the greedy
answer by the lexical correctness rules (`answers_match`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.schemas import HallucinationOptions
from worker.evaluation.correctness import contains_match, exact_match, normalize_answer, token_f1
from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import generate


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
    greedy: Sequence[str], samples: Sequence[Sequence[str]], *, contains_max_tokens: int = 5,
    f1_threshold: float = 0.5,
) -> np.ndarray:
    """Per answer: the share of its samples that match the greedy answer (`answers_match`)."""
    if len(greedy) != len(samples):
        raise ValueError(f"{len(greedy)} greedy answers for {len(samples)} sample lists")
    out = np.zeros(len(greedy), dtype=np.float64)
    for i, (g, ss) in enumerate(zip(greedy, samples, strict=True)):
        if not ss:
            raise ValueError(f"answer {i} has no samples")
        out[i] = sum(
            answers_match(s, g, contains_max_tokens=contains_max_tokens, f1_threshold=f1_threshold) for s in ss
        ) / len(ss)
    return out


def sample_answers(inp: DetectorInput) -> list[list[str]]:
    """Per test question: its `self_consistency_k` answers sampled at `self_consistency_temperature`
    (seeded), or those an earlier detector of this run already sampled (the same call)."""
    for earlier in inp.earlier.values():
        if earlier.samples is not None:
            inp.on_batch(1, 1)
            return earlier.samples
    a, o = inp.answers, inp.options
    k, n_test = o.self_consistency_k, a.qa.n_test
    run = generate(
        inp.loaded.model, inp.loaded.tokenizer, [a.qa.prompts[i] for i in a.qa.test_rows], max_new_tokens=o.max_new_tokens,
        batch_size=o.batch_size * k, temperature=o.self_consistency_temperature, num_samples=k, seed=o.seed,
        ctx=inp.ctx, on_batch=inp.on_batch,
    )
    return [[g.text for g in run.generations[j * k : (j + 1) * k]] for j in range(n_test)]


class SamplingDetector(Detector):
    """A detector on the `sample_answers` samples compared by `answers_match`: the options those
    read and the progress units of drawing the samples (what every detector on them shares)."""

    phase = "sampling"
    options = ("self_consistency_k", "self_consistency_temperature", "max_new_tokens", "batch_size", "seed",
               "contains_max_tokens", "f1_threshold")

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        k = options.self_consistency_k
        return -(-(n_test * k) // (options.batch_size * k))


class SelfConsistency(SamplingDetector):
    name = "self_consistency"
    compute = "self_consistency_k sampled answers of max_new_tokens per test question"
    timing = "generate_self_consistency"

    def score(self, inp: DetectorInput) -> Scored:
        a, o = inp.answers, inp.options
        per_q = sample_answers(inp)
        conf = self_consistency([a.texts[i] for i in a.qa.test_rows], per_q,
                                contains_max_tokens=o.contains_max_tokens, f1_threshold=o.f1_threshold)
        return Scored(confidence=a.full(conf), samples=per_q)
