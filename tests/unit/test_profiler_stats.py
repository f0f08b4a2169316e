"""RunningStats and the device reduction against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from worker.profiler.stats import BatchPlan, HistogramSpec, RunningStats, reduce_activations


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


X = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])  # one example, 2 tokens, width 3


def test_hand_computed_single_example() -> None:
    s = RunningStats()
    s.update(X)
    assert s.count == 6 and s.tokens == 2 and s.width == 3 and s.examples == 1
    # values 1, -2, 3, 0, 4, -1: sum 5, sum of squares 31, sum |a| 11, max |a| 4
    assert close(s.mean, 5 / 6)
    assert close(s.variance, 31 / 6 - (5 / 6) ** 2)
    assert close(s.m2, 31 - 25 / 6)
    assert close(s.std, math.sqrt(31 / 6 - 25 / 36))
    assert close(s.sum_abs, 11.0) and close(s.sum_sq, 31.0) and s.max_abs == 4.0
    assert close(s.rms, math.sqrt(31 / 6)) and close(s.mean_abs, 11 / 6)
    # per token L1: 6 and 5; L2: sqrt(14), sqrt(17); Frobenius of the example: sqrt(31)
    assert close(s.l1_norm, 5.5)
    assert close(s.l2_norm, (math.sqrt(14) + math.sqrt(17)) / 2)
    assert close(s.frobenius_norm, math.sqrt(31))
    # pooled: mean over tokens = [0.5, 1, 1]; population variance over units = 1/18
    assert close(s.pooled_variance, 1 / 18)


def test_two_examples_average_per_example_values() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0], [2.0, 2.0, 2.0]])
    s = RunningStats()
    s.update(x, example_ids=[7, 7, 3])  # tokens 0-1 form one example, token 2 another
    assert s.examples == 2 and s.count == 9
    assert close(s.l1_norm, (5.5 + 6.0) / 2)
    assert close(s.l2_norm, ((math.sqrt(14) + math.sqrt(17)) / 2 + math.sqrt(12)) / 2)
    assert close(s.frobenius_norm, (math.sqrt(31) + math.sqrt(12)) / 2)
    assert close(s.pooled_variance, (1 / 18 + 0.0) / 2)
    assert close(s.mean, 11 / 9)


def test_chan_merge_equals_one_shot() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randn(50, 16, generator=g) * 3 + 0.5
    ids = torch.arange(50) // 5
    one = RunningStats(thresholds=(0.25,))
    one.update(data, ids)
    parts = [RunningStats(thresholds=(0.25,)) for _ in range(3)]
    for part, rows in zip(parts, (slice(0, 10), slice(10, 35), slice(35, 50)), strict=True):
        part.update(data[rows], ids[rows])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    streamed = RunningStats(thresholds=(0.25,))
    for k in range(0, 50, 5):  # one example per update call
        streamed.update(data[k : k + 5])
    x = data.double()
    for s in (merged, streamed):
        assert s.count == one.count == 800
        assert close(s.mean, x.mean().item(), 1e-12) and close(s.mean, one.mean, 1e-12)
        assert close(s.m2, ((x - x.mean()) ** 2).sum().item(), 1e-12)
        assert close(s.variance, one.variance, 1e-12)
        assert close(s.sum_abs, x.abs().sum().item()) and close(s.sum_sq, (x * x).sum().item())
        assert s.max_abs == pytest.approx(x.abs().max().item(), rel=1e-7)
        assert np.array_equal(s.hist, one.hist) and np.array_equal(s.below, one.below)
        assert s.examples == 10
        assert close(s.pooled_variance, one.pooled_variance, 1e-12)
        assert close(s.l1_norm, one.l1_norm, 1e-12) and close(s.frobenius_norm, one.frobenius_norm, 1e-12)
    assert one.below[0] == int((data.abs() < 0.25).sum())


def test_subtract_inverts_merge() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 8, generator=g), torch.randn(6, 8, generator=g) * 10
    sa, sb = RunningStats(), RunningStats()
    sa.update(a)
    sb.update(b)
    total = sa.copy().merge(sb)
    back = total.subtract(sb)
    assert back.count == sa.count and close(back.mean, sa.mean, 1e-10) and close(back.m2, sa.m2, 1e-10)
    assert np.array_equal(back.hist, sa.hist)
    assert math.isnan(back.max_abs) and math.isnan(back.pooled_variance)  # cannot be taken apart


def test_float64_and_float32_inputs_agree() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 12, generator=g)
    s32, s64 = RunningStats(thresholds=(0.5,)), RunningStats(thresholds=(0.5,))
    s32.update(x)
    s64.update(x.double())
    assert close(s32.mean, s64.mean) and close(s32.m2, s64.m2) and close(s32.sum_abs, s64.sum_abs)
    assert np.array_equal(s32.hist, s64.hist) and np.array_equal(s32.below, s64.below)
    bf = RunningStats()
    bf.update(x.to(torch.bfloat16))
    assert bf.count == s32.count


def test_histogram_spec_and_exact_binning() -> None:
    spec = HistogramSpec.from_bins(64)
    assert spec.per_octave == 2 and spec.bins == 86 and spec.slots == 88
    assert spec.lo == 2.0**-27 and spec.hi == 2.0**16
    edges = spec.edges
    assert edges[0] == spec.lo and edges[-1] == spec.hi and edges[1] == 1.5 * spec.lo
    assert np.all(np.diff(edges) > 0)
    assert HistogramSpec.from_bins(8).per_octave == 1
    assert HistogramSpec.from_bins(1024).per_octave == 32
    with pytest.raises(ValueError):
        HistogramSpec(per_octave=3)
    # 1.0 and 1.5 are edges: each lands in the bin starting at it; 0, tiny -> underflow; inf, NaN, huge -> overflow
    s = RunningStats(spec)
    s.update(torch.tensor([[1.0, 1.5, 1.4999999, 0.0, 1e-12, 2.0**16, float("inf"), float("nan")]]))
    k1 = int(np.searchsorted(edges, 1.0)) + 1  # slot of the bin [1, 1.5)
    assert s.hist[k1] == 2 and s.hist[k1 + 1] == 1
    assert s.hist[0] == 2 and s.hist[-1] == 3 and s.hist.sum() == 8


def test_sparsity_exact_and_interpolated() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 25, generator=g).abs() * torch.logspace(-3, 1, 25)
    s = RunningStats(thresholds=(0.01,))
    s.update(x)
    true = lambda t: float((x < t).double().mean())  # noqa: E731
    assert s.sparsity(0.01) == true(0.01)  # counted exactly at update time
    assert s.sparsity(0.0) == 0.0 and s.sparsity(-1.0) == 0.0
    assert s.sparsity(float(x.max()) * 2) == 1.0
    for edge in s.spec.edges[20:60:7]:  # at a bin edge the histogram is exact
        assert s.sparsity(float(edge)) == pytest.approx(true(float(edge)), abs=1e-12)
    edges = s.spec.edges
    for t in (0.003, 0.04, 0.5, 2.2):  # between edges: error at most the bin's share
        k = int(np.searchsorted(edges, t, side="right"))
        bin_share = s.hist[k] / s.count
        assert abs(s.sparsity(t) - true(t)) <= bin_share + 1e-12
    # the median read from the histogram lies in the true median's bin
    med = float(x.flatten().median())
    k = int(np.searchsorted(edges, med, side="right"))
    assert edges[k - 1] <= s.median_abs <= edges[k]
    assert s.max_median_ratio == pytest.approx(float(x.max()) / s.median_abs)


def test_below_lo_counts_underflow_and_tiny_thresholds() -> None:
    s = RunningStats()
    s.update(torch.tensor([[0.0, 0.0, 1e-12, 1.0]]))
    assert s.sparsity(1e-9) == 0.75  # the underflow slot [0, 2**-27) counts as zero-like
    assert s.median_abs == 0.0
    assert s.max_median_ratio == math.inf


def test_size_does_not_grow_with_data() -> None:
    s = RunningStats(thresholds=(1e-5,))
    s.update(torch.randn(3, 10))
    size = len(json.dumps(s.to_dict()))
    for _ in range(50):
        s.update(torch.randn(17, 10) * 100)
    assert len(json.dumps(s.to_dict())) <= size + 200  # only digits of the scalars change
    assert s.hist.shape == (s.spec.slots,) and s.below.shape == (1,)
    back = RunningStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.count == s.count and back.m2 == s.m2 and np.array_equal(back.hist, s.hist)
    assert back.thresholds == s.thresholds and back.spec == s.spec


def test_incompatible_merge_refused() -> None:
    a = RunningStats()
    a.update(torch.randn(2, 4))
    b = RunningStats()
    b.update(torch.randn(2, 5))
    with pytest.raises(ValueError):
        a.merge(b)
    with pytest.raises(ValueError):
        a.merge(RunningStats(thresholds=(0.1,)))


def test_reduce_masks_padding_and_splits_leading_positions() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, generator=g)
    x[1, 3] = float("nan")  # padding may hold anything
    spec = HistogramSpec()
    plan = BatchPlan.build([4, 3], 4, spec=spec, skip_positions=1, lead_positions=1, starts=[0, 2])
    # main: example 0 positions 1-3, example 1 position 2; lead: example 0 position 0
    assert plan.main_tokens == 4 and plan.lead_tokens == 1 and plan.example_tokens == [3, 1]
    vec, hist = reduce_activations(x, plan)[:2]
    main = RunningStats(spec)
    main.absorb(vec.numpy(), hist.numpy(), plan, 3, column=0)
    lead = RunningStats(spec)
    lead.absorb(vec.numpy(), hist.numpy(), plan, 3, column=1)
    ref = torch.cat([x[0, 1:], x[1, 2:3]]).double()
    assert main.count == 12 and close(main.mean, ref.mean().item())
    assert close(main.m2, ((ref - ref.mean()) ** 2).sum().item())
    assert lead.count == 3 and close(lead.sum_sq, (x[0, 0].double() ** 2).sum().item())
    assert main.hist.sum() == 12 and lead.hist.sum() == 3
    assert main.examples == 2 and math.isnan(main.pooled_variance)  # NaN padding reaches only the pooled sum
    x[1, 3] = 1e30  # finite garbage in padding is masked everywhere
    vec, hist = reduce_activations(x, plan)[:2]
    again = RunningStats(spec)
    again.absorb(vec.numpy(), hist.numpy(), plan, 3, column=0)
    assert again.m2 == main.m2
    ex0, ex1 = x[0, 1:].double().mean(0), x[1, 2].double()
    assert close(again.pooled_variance, (ex0.var(unbiased=False) + ex1.var(unbiased=False)).item() / 2, 1e-6)


def test_sliced_reduction_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.profiler.stats as stats_module

    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 7, 6, generator=g)
    spec = HistogramSpec()
    plan = BatchPlan.build(
        [7, 5, 6, 1, 3], 7, spec=spec, thresholds=(0.3,), skip_positions=1, lead_positions=1, want_pooled=True
    )
    whole = reduce_activations(x, plan)
    monkeypatch.setattr(stats_module, "CPU_SLICE_ELEMENTS", 2 * 7 * 6)  # two examples per slice
    sliced = reduce_activations(x, plan)
    assert torch.allclose(whole.vec, sliced.vec, rtol=1e-13, atol=0)
    assert torch.equal(whole.hist, sliced.hist)
    assert torch.equal(whole.pooled, sliced.pooled) and whole.pooled.shape == (5, 6)


def test_accelerator_counting_matches_bincount(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-sync counting used off the CPU (histc on the integer codes, in chunks below 2**24
    so float32 counts stay exact) gives bincount's integers, here run on the CPU."""
    import worker.profiler.stats as stats_module

    g = torch.Generator().manual_seed(7)
    code = torch.randint(0, 300, (5000,), generator=g, dtype=torch.int32)
    code[:2000] = 299  # one heavy slot
    monkeypatch.setattr(stats_module, "_HISTC_CHUNK", 1024)  # several chunks
    got = stats_module._count_without_sync(code, 300)
    assert got.dtype == torch.int64 and torch.equal(got, torch.bincount(code, minlength=300))
