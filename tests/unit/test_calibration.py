"""Calibration metrics against hand-worked cases (LitCab's definitions, docs/method.md section 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.evaluation.bootstrap import bootstrap_ci, bootstrap_cis
from worker.evaluation.calibration import (
    MetricEstimate,
    acc_at,
    accuracy,
    auroc,
    brier,
    calibration_report,
    cov_at,
    ece,
    ece_litcab,
    metric_name,
    to_metric_rows,
)
from worker.stage import MetricRow

# --------------------------------------------------------------------------- acc@q


def test_acc_at_ties_put_correct_answers_on_the_confident_side():
    # sorted by (conf, correct): (0.2,1) (0.6,0) (0.6,1) (0.9,0) -> top 2 = (0.6,1) (0.9,0)
    assert acc_at([0.9, 0.6, 0.6, 0.2], [0, 0, 1, 1], 0.5) == 0.5
    # all tied: correct ones are the "most confident"
    assert acc_at([0.5] * 4, [1, 0, 0, 1], 0.5) == 1.0
    assert acc_at([0.5] * 4, [0, 1, 0, 0], 0.25) == 1.0


def test_acc_at_uses_floor_of_n_times_q():
    conf = [0.1, 0.2, 0.3, 0.4, 0.5]
    corr = [1, 1, 1, 0, 1]
    assert acc_at(conf, corr, 0.5) == 0.5  # k = floor(2.5) = 2: (0.4,0) (0.5,1)
    assert acc_at(conf, corr, 1.0) == 0.8
    assert acc_at(conf, corr, 0.2) == 1.0  # k = 1


def test_acc_at_k_zero_is_none():
    assert acc_at([0.7], [1], 0.5) is None  # floor(0.5) = 0
    assert acc_at([0.1, 0.2, 0.3], [1, 1, 1], 0.25) is None  # floor(0.75) = 0
    assert acc_at([], [], 0.5) is None


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_acc_at_rejects_bad_q(q):
    with pytest.raises(ValueError, match="q must be"):
        acc_at([0.5], [1], q)


# --------------------------------------------------------------------------- cov@p


def test_cov_at_all_correct_stops_at_n_minus_one():
    assert cov_at([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], 0.5) == 0.75


def test_cov_at_none_correct_is_zero():
    assert cov_at([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0], 0.5) == 0.0


def test_cov_at_equal_to_p_does_not_count():
    # most confident first: 1 0 0 1 0 -> A(k) = 1, .5, .33, .5 (k = 1..4)
    conf = [0.1, 0.2, 0.3, 0.4, 0.5]
    corr = [0, 1, 0, 0, 1]
    assert cov_at(conf, corr, 0.5) == 0.2  # only k = 1; ">=" would give 0.8
    assert cov_at(conf, corr, 0.49) == 0.8


def test_cov_at_never_uses_k_equal_n():
    # most confident first: 0 1 -> A(1) = 0, A(2) = 0.5 > 0.4 but k = N is excluded
    assert cov_at([0.1, 0.9], [1, 0], 0.4) == 0.0


def test_cov_at_single_answer_and_empty():
    assert cov_at([0.9], [1], 0.5) == 0.0
    assert cov_at([], [], 0.5) is None


def test_cov_at_ties_and_p_zero():
    # all tied: correct first among the confident -> 1 1 0 0: A = 1, 1, 2/3
    assert cov_at([0.5] * 4, [0, 1, 0, 1], 0.5) == 0.75
    # most confident first 0 0 1: A(1) = A(2) = 0, not > 0
    assert cov_at([0.1, 0.5, 0.9], [1, 0, 0], 0.0) == 0.0


# --------------------------------------------------------------------------- brier, auroc, accuracy


def test_brier_by_hand():
    assert brier([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    assert brier([1.0, 0.0], [1, 0]) == 0.0


def test_accuracy():
    assert accuracy([0.1, 0.2, 0.3, 0.4], [True, False, True, True]) == 0.75
    assert accuracy([], []) is None


def test_auroc_by_hand_and_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # positives {0.5, 0.8}, negatives {0.5, 0.2}: pairs 0.5, 1, 1, 1 -> 3.5 / 4
    assert auroc([0.5, 0.5, 0.2, 0.8], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert auroc([0.3] * 6, [1, 0, 1, 0, 0, 1]) == pytest.approx(0.5)
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0


def test_auroc_one_class_is_none():
    assert auroc([0.1, 0.5, 0.9], [1, 1, 1]) is None
    assert auroc([0.1, 0.5, 0.9], [0, 0, 0]) is None


def test_auroc_matches_pairwise_count_on_random_ties():
    rng = np.random.default_rng(3)
    conf = np.round(rng.random(40), 1)  # many ties
    corr = rng.integers(0, 2, 40)
    pos, neg = conf[corr == 1], conf[corr == 0]
    expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(conf, corr) == pytest.approx(expected)


# --------------------------------------------------------------------------- ECE


def test_ece_by_hand():
    conf = [0.05, 0.15, 0.18, 0.95, 1.0, 0.62]
    corr = [0, 1, 0, 1, 0, 0]
    # bin0 {.05:0}: .05 ; bin1 {.15:1,.18:0}: 2*|.5-.165| = .67 ; bin6 {.62:0}: .62 ;
    # bin9 {.95:1, 1.0:0} (1.0 is in the last bin): 2*|.5-.975| = .95
    assert ece(conf, corr) == pytest.approx((0.05 + 0.67 + 0.62 + 0.95) / 6)


def test_ece_bin_edges_are_left_closed():
    # 0.3 belongs to [0.3, 0.4) with 0.35: |0.5 - 0.325| = 0.175
    assert ece([0.3, 0.35], [1, 0]) == pytest.approx(0.175)


def test_ece_perfect_and_empty():
    assert ece([1.0, 0.0], [1, 0]) == 0.0
    assert ece([], []) is None


def test_ece_litcab_bins_midpoints_and_11th_bin():
    # already spanning [0, 1]: bins 0 (mid .05), 2 (mid .25), 5 (mid .55), 10 (mid 1.0)
    # |1-.05| + |1-.25| + |1-.55| + |1-1| = 2.15 ; with 1.0 in bin 9 (mid .95) it would be 2.20,
    # against mean confidences instead of midpoints 1 + .75 + .5 + 0 = 2.25
    assert ece_litcab([0.0, 0.25, 0.5, 1.0], [1, 1, 1, 1]) == pytest.approx(2.15 / 4)


def test_ece_litcab_rescales_min_max():
    # [0.3, 0.5] -> [0, 1]: |0 - .05| / 2 ; unscaled it would be (.25 + .45) / 2
    assert ece_litcab([0.3, 0.5], [0, 1]) == pytest.approx(0.025)


def test_ece_litcab_float_floor_like_litcab():
    # LitCab's int(0.3 / 0.1) == 2: a rescaled 0.3 falls in bin 2 (mid .25), not bin 3
    assert ece_litcab([0.0, 0.3, 1.0], [0, 0, 1]) == pytest.approx((0.05 + 0.25 + 0.0) / 3)


def test_ece_litcab_constant_confidence_is_none():
    assert ece_litcab([0.4, 0.4, 0.4], [1, 0, 1]) is None


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("conf", "corr", "match"),
    [
        ([0.5, float("nan")], [1, 0], "finite"),
        ([0.5, float("inf")], [1, 0], "finite"),
        ([0.5, 1.2], [1, 0], r"\[0, 1\]"),
        ([-0.1, 0.5], [1, 0], r"\[0, 1\]"),
        ([0.5, 0.5], [1, 0, 1], "length"),
        ([0.5, 0.5], [1, 2], "0/1"),
        ([[0.5]], [[1]], "1-D"),
    ],
)
def test_inputs_are_validated(conf, corr, match):
    for fn in (acc_at, cov_at, brier, auroc, ece, ece_litcab, accuracy):
        with pytest.raises(ValueError, match=match):
            fn(conf, corr)
    with pytest.raises(ValueError, match=match):
        calibration_report(conf, corr, n_boot=10)


# --------------------------------------------------------------------------- report + bootstrap


def _data(n=120, seed=5):
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    corr = (rng.random(n) < conf).astype(int)  # roughly calibrated
    return conf, corr


def test_report_names_values_and_intervals():
    conf, corr = _data()
    rep = calibration_report(conf, corr, p_values=(0.5, 0.9), q_values=(0.5, 0.25), n_boot=300, seed=1)
    assert list(rep) == [
        "acc@50",
        "acc@25",
        "cov@50",
        "cov@90",
        "ece",
        "ece_litcab",
        "brier",
        "auroc",
        "accuracy",
    ]
    assert rep["acc@50"].value == acc_at(conf, corr, 0.5)
    assert rep["cov@90"].value == cov_at(conf, corr, 0.9)
    assert rep["ece"].value == pytest.approx(ece(conf, corr))
    assert rep["ece_litcab"].value == pytest.approx(ece_litcab(conf, corr))
    assert rep["brier"].value == pytest.approx(brier(conf, corr))
    assert rep["auroc"].value == pytest.approx(auroc(conf, corr))
    for name, est in rep.items():
        assert isinstance(est, MetricEstimate)
        assert est.n == 120
        assert est.ci_low is not None and est.ci_high is not None
        assert est.ci_low <= est.value <= est.ci_high, name


def test_report_is_deterministic_with_a_seed():
    conf, corr = _data()
    a = calibration_report(conf, corr, n_boot=200, seed=7)
    b = calibration_report(conf, corr, n_boot=200, seed=7)
    c = calibration_report(conf, corr, n_boot=200, seed=8)
    assert a == b
    assert a != c


def test_report_undefined_values_and_no_bootstrap():
    rep = calibration_report([0.5], [1], n_boot=0)
    assert rep["acc@50"] == (None, None, None, 1)
    assert rep["auroc"].value is None
    assert rep["ece_litcab"].value is None
    assert rep["accuracy"] == (1.0, None, None, 1)
    empty = calibration_report([], [], n_boot=50)
    assert all(est == (None, None, None, 0) for est in empty.values())


def test_metric_name():
    assert metric_name("acc", 0.5) == "acc@50"
    assert metric_name("cov", 0.9) == "cov@90"
    assert metric_name("acc", 0.29) == "acc@29"
    assert metric_name("acc", 0.125) == "acc@12.5"


def test_to_metric_rows_drops_non_finite():
    rows = to_metric_rows(
        {
            "auroc": MetricEstimate(None, None, None, 3),
            "ece": (float("nan"), 0.1, float("inf"), 3),
            "brier": (0.2, 0.1, 0.3, 3),
        },
        scope="task=qa,detector=p_ik",
    )
    assert rows == [
        MetricRow("task=qa,detector=p_ik", "auroc", None, None, None, 3),
        MetricRow("task=qa,detector=p_ik", "ece", None, 0.1, None, 3),
        MetricRow("task=qa,detector=p_ik", "brier", 0.2, 0.1, 0.3, 3),
    ]


def test_bootstrap_ci_generic_batched_and_unbatched_agree():
    x = np.random.default_rng(0).normal(size=50)
    slow = bootstrap_ci(lambda a: float(a.mean()), x, n_boot=200, seed=3)
    fast = bootstrap_ci(lambda a: a.mean(axis=1), x, n_boot=200, seed=3, batched=True)
    small_blocks = bootstrap_ci(
        lambda a: a.mean(axis=1), x, n_boot=200, seed=3, batched=True, max_block_elems=120
    )
    assert slow.low == pytest.approx(fast.low) and slow.high == pytest.approx(fast.high)
    assert small_blocks == fast
    assert slow.n_valid == 200 and slow.low < x.mean() < slow.high


def test_bootstrap_ci_ignores_undefined_resamples():
    # one positive among 4: many resamples miss it and AUROC is undefined there
    conf = np.array([0.9, 0.1, 0.2, 0.3])
    corr = np.array([1, 0, 0, 0])
    ci = bootstrap_ci(lambda c, y: auroc(c, y), conf, corr, n_boot=200, seed=0)
    assert 0 < ci.n_valid < 200
    assert ci.low == 1.0 and ci.high == 1.0
    none = bootstrap_ci(lambda c, y: None, conf, corr, n_boot=20)
    assert (none.low, none.high, none.n_valid) == (None, None, 0)


def test_bootstrap_cis_columns_share_resamples():
    x = np.arange(30, dtype=float)
    cis = bootstrap_cis(
        lambda a: np.stack([a.mean(axis=1), 2 * a.mean(axis=1)], axis=1), x, n_boot=100, seed=1
    )
    assert cis[1].low == pytest.approx(2 * cis[0].low) and cis[1].high == pytest.approx(2 * cis[0].high)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(np.mean, [1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="first dimension"):
        bootstrap_ci(np.mean, [1.0, 2.0], [1.0])


def test_never_nan_in_report():
    rep = calibration_report([0.0, 0.0, 1.0], [0, 0, 0], n_boot=50)
    for est in rep.values():
        for v in est[:3]:
            assert v is None or math.isfinite(v)


def test_auroc_difference_is_paired() -> None:
    from worker.evaluation.calibration import auroc_difference

    y = np.array([0, 0, 1, 1, 0, 1, 1, 0] * 5, dtype=float)
    a = y * 0.5 + 0.25  # separates perfectly: AUROC 1
    b = np.full_like(y, 0.5)  # AUROC 0.5
    d = auroc_difference(a, b, y, n_boot=200, seed=1)
    assert d.value == pytest.approx(0.5) and d.n == len(y)
    assert d.ci_low == pytest.approx(0.5) and d.ci_high == pytest.approx(0.5)  # every resample: 1 - 0.5
    same = auroc_difference(a, a, y, n_boot=50)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    assert auroc_difference(a, b, y, n_boot=0).ci_low is None
    assert auroc_difference(a, b, np.ones_like(y), n_boot=10).value is None  # one class: undefined
    with pytest.raises(ValueError):
        auroc_difference(a, b[:3], y)
