"""Bootstrap intervals: the paired bootstrap against cases whose interval is known by
construction or analytically, and the per-example statistics tasks declare."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_ci
from worker.evaluation.tasks import ExampleStatistic, MetricValue, TaskResult, mean_of
from worker.pruning import retained_metric


def _mean_ratio(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return b[0].mean(axis=1) / a[0].mean(axis=1)


def test_paired_ratio_of_proportional_systems_is_exact():
    # b = 0.8 x a on every example: every paired resample has ratio exactly 0.8, so the
    # interval is [0.8, 0.8]; resampled independently it would be wide.
    rng = np.random.default_rng(1)
    a = rng.uniform(0.1, 10.0, size=200)
    b = 0.8 * a
    ci = paired_bootstrap_ci(_mean_ratio, [a], [b], n_boot=500, seed=3)
    assert ci.low == pytest.approx(0.8) and ci.high == pytest.approx(0.8)
    assert ci.n_valid == 500 and ci.n_boot == 500
    ia = bootstrap_ci(lambda x: x.mean(axis=1), a, n_boot=500, seed=3, batched=True)
    ib = bootstrap_ci(lambda x: x.mean(axis=1), b, n_boot=500, seed=4, batched=True)
    assert ia.low is not None and ia.high is not None and ib.low is not None and ib.high is not None
    assert ib.high / ia.low - ib.low / ia.high > 0.1  # unpaired: the shared difficulty does not cancel


def test_paired_mean_difference_matches_the_normal_interval():
    # d_i = b_i - a_i; the paired bootstrap of mean(b) - mean(a) is the bootstrap of mean(d),
    # whose 95% interval is mean(d) +- 1.96 sd(d) / sqrt(n) for large n. The examples'
    # shared part (sd 10) would dominate an unpaired interval; here it cancels.
    rng = np.random.default_rng(0)
    n = 4000
    shared = rng.normal(0.0, 10.0, size=n)
    a = shared + rng.normal(0.0, 1.0, size=n)
    b = shared + 0.3 + rng.normal(0.0, 1.0, size=n)
    d = b - a
    half = 1.959964 * d.std(ddof=1) / math.sqrt(n)
    ci = paired_bootstrap_ci(
        lambda x, y: y[0].mean(axis=1) - x[0].mean(axis=1), [a], [b], n_boot=4000, seed=7
    )
    assert ci.low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(d.mean() + half, abs=0.1 * half)
    unpaired_width = 2 * 1.96 * math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / n)
    assert ci.high - ci.low < 0.15 * unpaired_width


def test_paired_uses_bootstrap_ci_resamples_and_drops_undefined():
    a = np.array([1.0, 2.0, 3.0, 0.0])
    b = np.array([2.0, 2.0, 2.0, 2.0])
    fn = lambda x, y: np.where(x[0].sum(1) > 0, y[0].sum(1) / np.maximum(x[0].sum(1), 1e-300), np.nan)  # noqa: E731
    ci = paired_bootstrap_ci(fn, [a], [b], n_boot=300, seed=5)
    same = bootstrap_ci(lambda x, y: fn([x], [y]), a, b, n_boot=300, seed=5, batched=True)
    assert ci == same
    only_zero = np.zeros(3)
    none = paired_bootstrap_ci(fn, [only_zero], [np.ones(3)], n_boot=50, seed=0)
    assert none.low is None and none.high is None and none.n_valid == 0
    with pytest.raises(ValueError):
        paired_bootstrap_ci(fn, [], [b])
    with pytest.raises(ValueError):
        paired_bootstrap_ci(fn, [a], [b[:3]])


def test_example_statistics_by_hand():
    ppl = ExampleStatistic("nll_sum", "tokens", "exp")
    assert ppl(np.array([2.0, 4.0]), np.array([1.0, 3.0]))[0] == pytest.approx(math.exp(6 / 4))
    # an example without tokens adds nothing; a resample of only such examples is undefined
    assert ppl(np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])).tolist()[0] == pytest.approx(
        math.exp(2.0)
    )
    assert math.isnan(ppl(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]]))[0])
    assert mean_of("correct")(np.array([1.0, 0.0, 1.0, 1.0]))[0] == pytest.approx(0.75)
    assert mean_of("f1").keys() == ("f1",) and ppl.keys() == ("nll_sum", "tokens")


def _acc_result(correct: list[float]) -> TaskResult:
    n = len(correct)
    return TaskResult(
        task="classification", primary="accuracy",
        metrics={"accuracy": MetricValue("accuracy", sum(correct) / n, None, None, n, True)},
        per_example={"correct": correct}, statistics={"accuracy": mean_of("correct")},
    )


def _ppl_result(nll: list[float], tokens: list[float]) -> TaskResult:
    value = math.exp(sum(nll) / sum(tokens))
    return TaskResult(
        task="perplexity", primary="perplexity",
        metrics={"perplexity": MetricValue("perplexity", value, None, None, len(nll), False)},
        per_example={"nll_sum": nll, "tokens": tokens},
        statistics={"perplexity": ExampleStatistic("nll_sum", "tokens", "exp")},
    )


def test_retained_metric_paired_interval_by_construction():
    # Perplexity: the pruned model adds log(1.25) NLL per token on every example, so its
    # perplexity is 1.25x the original's on every resample: retained 80% exactly.
    nll = [3.0, 10.0, 1.5, 7.0]
    tokens = [2.0, 5.0, 1.0, 4.0]
    shift = math.log(1.25)
    orig = _ppl_result(nll, tokens)
    pruned = _ppl_result([v + shift * t for v, t in zip(nll, tokens, strict=True)], tokens)
    kept, why = retained_metric(orig, pruned, n_boot=200, seed=0)
    assert why is None and kept.n == 4
    assert kept.value == pytest.approx(80.0)
    assert kept.ci_low == pytest.approx(80.0) and kept.ci_high == pytest.approx(80.0)

    # Accuracy: the pruned model loses 1 of 4 correct answers: 66.7% with a real interval.
    kept, why = retained_metric(_acc_result([1, 0, 1, 1, 1, 0]), _acc_result([1, 0, 0, 1, 1, 0]), n_boot=400)
    assert why is None and kept.value == pytest.approx(75.0)
    assert kept.ci_low is not None and kept.ci_high is not None
    assert kept.ci_low < 75.0 and kept.ci_high == pytest.approx(100.0)  # never above: it only lost answers


def test_retained_metric_without_pairable_values_says_why():
    orig = _acc_result([1, 1, 0])
    no_values = TaskResult(
        task="classification", primary="accuracy",
        metrics={"accuracy": MetricValue("accuracy", 1 / 3, None, None, 3, True)},
    )
    kept, why = retained_metric(orig, no_values, n_boot=100)
    assert kept.value == pytest.approx(50.0) and kept.ci_low is None and why and "no per-example" in why
    kept, why = retained_metric(orig, _acc_result([1, 0]), n_boot=100)
    assert kept.ci_low is None and why and "different examples" in why


def test_retained_metric_of_an_original_that_scores_zero_says_why():
    kept, why = retained_metric(_acc_result([0, 0, 0]), _acc_result([1, 0, 0]), n_boot=100)
    assert kept.value is None and kept.ci_low is None
    assert why and "undefined" in why and "original 0" in why
