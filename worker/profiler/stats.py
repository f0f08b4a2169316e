"""Streaming activation statistics (docs/method.md section 1).

Two halves:

* `reduce_activations` runs on the device, inside a forward hook: it reduces one
  batch's activation tensor `[batch, pos, width]` to a short float64 vector of sums
  plus an integer histogram, with a fixed, small number of kernels and no host
  synchronisation. Which positions count is given by a `BatchPlan`, built once per
  batch and shared by every hook (padding, `skip_positions`, per-example `token_start`).
* `RunningStats` lives on the host: it absorbs those per-batch reductions into float64
  accumulators (Chan's parallel merge for mean and M2), merges with another
  `RunningStats`, and answers variance, RMS, sparsity at any threshold, quantiles of
  |a| and the per-example norms. Its size is fixed up front: it never grows with the
  number of examples or tokens.

Definitions (N = counted tokens x width; an "element" is one activation scalar):

* `count` = N. `mean`, `variance` (population, ddof=0, METHOD eq. 1), `m2` = N x variance.
* `sum_abs` = sum |a|, `sum_sq` = sum a^2, `max_abs` = max |a|.
* `rms` = sqrt(sum_sq / N), `mean_abs` = sum_abs / N.
* `pooled_variance` (the reference code's variance): for each example e with T_e >= 1
  counted tokens, m_e = mean over its tokens of the activation vector (length width);
  v_e = population variance of m_e over the hidden units; pooled_variance = mean_e v_e.
* Per-example norms, averaged over examples (paper appendix E/F), for the example's
  counted activation matrix A_e (T_e x width) with token rows a_t:
  - `l1_norm` = mean_e [ (1/T_e) sum_t ||a_t||_1 ]  (mean per-token L1 norm)
  - `l2_norm` = mean_e [ (1/T_e) sum_t ||a_t||_2 ]  (mean per-token Euclidean norm)
  - `frobenius_norm` = mean_e ||A_e||_F = mean_e sqrt(sum_{t,j} a_tj^2)  (grows with T_e)
* Histogram of |a| (`HistogramSpec`): slot 0 holds [0, lo) (zeros and values too small
  to matter), slots 1..bins the bins [edge_{i-1}, edge_i), slot bins+1 holds [hi, inf]
  and NaN. Binning is exact (read from the float's bits, see HistogramSpec).
* `sparsity(t)` = #(|a| < t) / N. Exact when `t` is one of the `thresholds` given up
  front (counted by comparison at update time), when t is a bin edge, when t <= 0 or
  t > max_abs; otherwise read from the histogram: whole bins below t plus a log-linear
  share of the bin holding t (error at most that bin's share of N; with 2 bins per
  octave a bin spans a factor 1.33-1.5). Below lo every value of the underflow slot
  counts as zero-like (below any t > 0); above hi the share is log-linear between hi
  and max_abs.

Precision: per-token sums are float64 reductions of a float64 copy of the activation
(float32/bf16/fp16 values are exact in float64); the batch M2 is sum_sq - sum^2/n, whose
relative error is about 1e-16 x (1 + mean^2/variance), merged with Chan's formula. The
pooled mean vectors are summed in the activation's float precision (float32 matmul);
that sum multiplies padding by 0, so it assumes padding positions hold finite values
(true for right padding; every other statistic masks padding with `where`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Rows of the per-token table reduced by `reduce_activations` (before the thresholds).
_R_SUM, _R_SQ, _R_ABS, _R_L2 = range(4)
_N_BASE_ROWS = 4
# Token categories inside one batch (see BatchPlan): which accumulators a token feeds.
CAT_MAIN, CAT_BOTH, CAT_LEAD, CAT_NONE = range(4)
_N_CATS = 4


@dataclass(frozen=True)
class HistogramSpec:
    """Fixed bins of |a| from 2**lo_exp to 2**hi_exp, `per_octave` (a power of two) bins per
    octave, plus an underflow slot [0, lo) and an overflow slot [hi, inf] (NaN too).

    Within an octave [2**e, 2**(e+1)) the edges are 2**e * (1 + j / per_octave): a value's
    bin is read from the top bits of its float representation (exponent and leading
    mantissa bits), so binning is exact (no rounding at edges) and costs one integer
    shift per activation. The spacing is log-like: bin widths within an octave differ by
    at most a factor 2 in ratio terms (factor 1.5 and 1.33 with 2 per octave).
    """

    per_octave: int = 2
    lo_exp: int = -27
    hi_exp: int = 16

    def __post_init__(self) -> None:
        k = self.per_octave.bit_length() - 1
        if (
            self.per_octave < 1
            or (1 << k) != self.per_octave
            or k > 10
            or not (-126 <= self.lo_exp < self.hi_exp <= 127)
        ):
            raise ValueError(f"bad histogram spec {self}")

    @classmethod
    def from_bins(cls, bins: int, lo_exp: int = -27, hi_exp: int = 16) -> HistogramSpec:
        """The smallest power-of-two `per_octave` giving at least `bins` bins over the range."""
        octaves = hi_exp - lo_exp
        per_octave = 1
        while per_octave * octaves < bins and per_octave < 1024:
            per_octave *= 2
        return cls(per_octave=per_octave, lo_exp=lo_exp, hi_exp=hi_exp)

    @property
    def bits(self) -> int:
        """log2(per_octave): mantissa bits kept in a bin code."""
        return self.per_octave.bit_length() - 1

    @property
    def bins(self) -> int:
        return (self.hi_exp - self.lo_exp) * self.per_octave

    @property
    def lo(self) -> float:
        return 2.0**self.lo_exp

    @property
    def hi(self) -> float:
        return 2.0**self.hi_exp

    @property
    def slots(self) -> int:
        return self.bins + 2

    @property
    def edges(self) -> np.ndarray:
        """The bins + 1 bin edges, edges[0] = lo, edges[-1] = hi (all exact in float32)."""
        i = np.arange(self.bins + 1)
        octave, j = np.divmod(i, self.per_octave)
        return np.ldexp(1.0 + j / self.per_octave, self.lo_exp + octave)

    def code_offset(self, dtype: torch.dtype) -> tuple[int, int]:
        """(right shift, code of lo) turning the bits of |a| in `dtype` into a bin code."""
        if dtype == torch.float64:
            return 52 - self.bits, (self.lo_exp + 1023) << self.bits
        return 23 - self.bits, (self.lo_exp + 127) << self.bits

    def position(self, value: float) -> float:
        """Continuous bin coordinate of |a| = value in [lo, hi): bin k covers [k, k+1),
        log-linear within a bin."""
        edges = self.edges
        k = int(np.searchsorted(edges, value, side="right")) - 1
        k = min(max(k, 0), self.bins - 1)
        return k + math.log(value / edges[k]) / math.log(edges[k + 1] / edges[k])

    def value_at(self, position: float) -> float:
        """Inverse of `position`."""
        edges = self.edges
        k = min(max(int(math.floor(position)), 0), self.bins - 1)
        return float(edges[k] * (edges[k + 1] / edges[k]) ** (position - k))


def _round_up(threshold: float, dtype: torch.dtype) -> float:
    """The smallest value of `dtype` >= threshold: for a in dtype, a < t iff a < this."""
    if dtype == torch.float64:
        return float(threshold)
    t32 = np.float32(threshold)
    if float(t32) < threshold:
        t32 = np.nextafter(t32, np.float32(np.inf))
    return float(t32)


# ----------------------------------------------------------------- device side


@dataclass
class BatchPlan:
    """Which positions of a right-padded batch count, shared by all hooks of one forward pass.

    `main`: real tokens at positions >= max(skip_positions, token_start[e]).
    `lead`: real tokens at positions < lead_positions and >= token_start[e] (the leading
    positions, kept apart so a result can show its ranking with and without them).
    """

    weights: torch.Tensor  # [B, P, 2] float64: column 0 main, column 1 lead
    counted: torch.Tensor  # [B, P] bool: main or lead
    category: torch.Tensor  # [B, P, 1] int32: 1 + slots * category
    counts: torch.Tensor  # [B] float64: main tokens per example (clamped to >= 1)
    has: torch.Tensor  # [B] float64: 1 where the example has main tokens
    spec: HistogramSpec
    thresholds: tuple[float, ...]
    main_tokens: int
    lead_tokens: int
    examples: int
    example_tokens: list[int]  # main tokens per example (host copy)
    want_pooled: bool = False

    @classmethod
    def build(
        cls,
        lengths: Sequence[int],
        width: int,
        *,
        spec: HistogramSpec,
        thresholds: Sequence[float] = (),
        starts: Sequence[int] | None = None,
        skip_positions: int = 0,
        lead_positions: int = 0,
        device: torch.device | str = "cpu",
        want_pooled: bool = False,
    ) -> BatchPlan:
        """`width` is the padded length P of the batch (positions 0..P-1)."""
        lens = torch.as_tensor(list(lengths), dtype=torch.long)[:, None]
        if starts is None:
            st = torch.zeros_like(lens)
        else:
            st = torch.as_tensor(list(starts), dtype=torch.long)[:, None]
        pos = torch.arange(width, dtype=torch.long)[None, :]
        real = (pos < lens) & (pos >= st)
        main = real & (pos >= skip_positions)
        lead = real & (pos < lead_positions)
        cat = torch.full(main.shape, CAT_NONE, dtype=torch.int32)
        cat[lead] = CAT_LEAD
        cat[main] = CAT_MAIN
        cat[main & lead] = CAT_BOTH
        per_example = main.sum(1)
        weights = torch.stack([main, lead], dim=-1).to(torch.float64)
        dev = torch.device(device)
        return cls(
            weights=weights.to(dev, non_blocking=True),
            counted=(main | lead).to(dev, non_blocking=True),
            category=(1 + spec.slots * cat)[..., None].to(dev, non_blocking=True),
            counts=per_example.clamp(min=1).to(torch.float64).to(dev, non_blocking=True),
            has=(per_example > 0).to(torch.float64).to(dev, non_blocking=True),
            spec=spec,
            thresholds=tuple(float(t) for t in thresholds),
            main_tokens=int(main.sum()),
            lead_tokens=int(lead.sum()),
            examples=int((per_example > 0).sum()),
            example_tokens=[int(v) for v in per_example],
            want_pooled=want_pooled,
        )


def vector_length(n_thresholds: int) -> int:
    """Length of the vector `reduce_activations` returns."""
    return 2 * (_N_BASE_ROWS + n_thresholds) + 2 + 4


# On the CPU a batch is reduced in slices of whole examples of about this many elements,
# so the dozen passes over each slice run from cache instead of memory (about 2x faster
# for wide sites); on an accelerator the whole batch goes at once (fewer launches).
CPU_SLICE_ELEMENTS = 1 << 18


def reduce_activations(
    x: torch.Tensor, plan: BatchPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reduce one batch `x[B, P, width]` on its device; no host sync.

    Returns (vec, hist, pooled):
    * vec float64 [vector_length]: the per-row sums for main and lead tokens (rows:
      sum a, sum a^2, sum |a|, sum of per-token L2 norms, then #(|a| < t) per threshold;
      flattened row-major as [row, column]), then max|a| for main and lead, then the sums
      over examples of l1_e, l2_e, fro_e and the pooled variance v_e (main tokens only).
    * hist int64 [4 * slots]: |a| histograms per token category (see BatchPlan).
    * pooled float32 [B, width]: mean-pooled activation per example (main tokens), if asked.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    per_example = x.shape[1] * x.shape[2]
    step = max(1, CPU_SLICE_ELEMENTS // max(per_example, 1)) if x.device.type == "cpu" else x.shape[0]
    if step >= x.shape[0]:
        sums, mxw, ex, hist, pooled = _reduce_slice(x, plan, slice(None))
    else:
        parts = [_reduce_slice(x[b : b + step], plan, slice(b, b + step)) for b in range(0, x.shape[0], step)]
        sums = torch.stack([p[0] for p in parts]).sum(0)
        mxw = torch.stack([p[1] for p in parts]).amax(0)
        ex = torch.stack([p[2] for p in parts]).sum(0)
        hist = torch.stack([p[3] for p in parts]).sum(0)
        pooled = torch.cat([p[4] for p in parts]) if plan.want_pooled else None  # type: ignore[misc]
    return torch.cat([sums.flatten(), mxw, ex]), hist, pooled


def _reduce_slice(
    x: torch.Tensor, plan: BatchPlan, rows_: slice
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    f64 = torch.float64
    spec = plan.spec
    counted = plan.counted[rows_]
    w = plan.weights[rows_]
    counts = plan.counts[rows_]

    x64 = x.clone() if x.dtype == f64 else x.to(f64)
    s1 = x64.sum(-1)
    l2 = torch.linalg.vector_norm(x64, 2, dim=-1)
    sa = x64.abs_().sum(-1)
    a = x.abs()
    mx = a.amax(-1)
    rows = [s1, l2 * l2, sa, l2]
    for t in plan.thresholds:
        rows.append((a < _round_up(t, a.dtype)).sum(-1, dtype=f64))
    table = torch.where(counted, torch.stack(rows), 0.0)  # [R, B, P]; drops NaN from padding
    sums = table.flatten(1) @ w.flatten(0, 1)  # [R, 2]
    mxw = (torch.where(counted, mx.to(f64), 0.0)[..., None] * w).amax(dim=(0, 1))  # [2]

    main = w[..., 0]
    per_ex = (table[[_R_ABS, _R_L2, _R_SQ]] * main).sum(-1)  # [3, B]
    pooled_sum = torch.bmm(main.to(x.dtype)[:, None, :], x)[:, 0, :]  # [B, width]
    pooled_mean = pooled_sum.to(f64) / counts[:, None]
    pooled_var = pooled_mean.var(dim=-1, correction=0)
    ex = torch.stack([per_ex[0] / counts, per_ex[1] / counts, per_ex[2].sqrt(), pooled_var]) @ plan.has[rows_]

    # Histogram: bin code = top bits of |a| (exponent + leading mantissa bits), one pass.
    shift, lo_code = spec.code_offset(a.dtype)
    bits = a.view(torch.int64 if a.dtype == f64 else torch.int32)
    code = bits >> shift
    code.clamp_(lo_code - 1, lo_code + spec.bins).add_(plan.category[rows_].to(code.dtype) - lo_code)
    n_slots = _N_CATS * spec.slots
    if code.device.type == "cpu":
        hist = torch.bincount(code.flatten(), minlength=n_slots)
    else:  # bincount sizes its output from a device-to-host max(); histc with a fixed range does not sync
        exact = torch.float32 if code.numel() < 2**24 else torch.float64
        hist = torch.histc(code.flatten().to(exact), bins=n_slots, min=0, max=n_slots).to(torch.int64)

    pooled = pooled_mean.to(torch.float32) if plan.want_pooled else None
    return sums, mxw, ex, hist, pooled


# ------------------------------------------------------------------- host side


def _chan(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float) -> tuple[float, float]:
    """Chan et al. parallel merge of (count, mean, M2); returns (mean, M2) of the union."""
    if n_b == 0:
        return mean_a, m2_a
    if n_a == 0:
        return mean_b, m2_b
    n = n_a + n_b
    d = mean_b - mean_a
    return mean_a + d * (n_b / n), m2_a + m2_b + d * d * (n_a / n) * n_b


@dataclass
class RunningStats:
    """Streaming statistics of one (layer, site), merged in float64. See the module docstring."""

    spec: HistogramSpec = field(default_factory=HistogramSpec)
    thresholds: tuple[float, ...] = ()
    width: int | None = None
    count: int = 0
    tokens: int = 0
    mean: float = 0.0
    m2: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    max_abs: float = 0.0  # NaN when unknown (after `subtract`)
    hist: np.ndarray = field(default=None)  # type: ignore[assignment]
    below: np.ndarray = field(default=None)  # type: ignore[assignment]
    examples: int = 0
    ex_l1: float = 0.0
    ex_l2: float = 0.0
    ex_fro: float = 0.0
    ex_pooled_var: float = 0.0
    per_example: bool = True  # False once the per-example sums no longer describe these tokens

    def __post_init__(self) -> None:
        self.thresholds = tuple(float(t) for t in self.thresholds)
        if self.hist is None:
            self.hist = np.zeros(self.spec.slots, dtype=np.int64)
        if self.below is None:
            self.below = np.zeros(len(self.thresholds), dtype=np.int64)

    # ------------------------------------------------------------ updating

    def update(self, x: torch.Tensor, example_ids: torch.Tensor | Sequence[int] | None = None) -> None:
        """Add activations `x[tokens, width]` (any leading shape is flattened to tokens).

        `example_ids[tokens]` says which example each token row belongs to (for the
        per-example pooled variance and norms); None means all rows are one example.
        Convenience path (tests, offline use); the profiler uses `reduce_activations`.
        """
        x = x.detach()
        if x.dim() == 1:
            x = x[None, :]
        x2 = x.reshape(-1, x.shape[-1])
        if example_ids is None:
            groups = [x2]
        else:
            ids = torch.as_tensor(example_ids).reshape(-1).cpu()
            if ids.numel() != x2.shape[0]:
                raise ValueError("example_ids must give one id per token row")
            order = torch.argsort(ids, stable=True)
            _, sizes = torch.unique_consecutive(ids[order], return_counts=True)
            groups = list(torch.split(x2[order.to(x2.device)], sizes.tolist()))
        x3 = torch.nn.utils.rnn.pad_sequence(groups, batch_first=True)
        plan = BatchPlan.build(
            [g.shape[0] for g in groups],
            x3.shape[1],
            spec=self.spec,
            thresholds=self.thresholds,
            device=x3.device,
        )
        with torch.inference_mode():
            vec, hist, _ = reduce_activations(x3, plan)
        self.absorb(vec.cpu().numpy(), hist.cpu().numpy(), plan, x3.shape[-1], column=0)

    def absorb(self, vec: np.ndarray, hist: np.ndarray, plan: BatchPlan, width: int, column: int) -> None:
        """Merge one batch reduction (host copies of `reduce_activations`' output).

        column 0: the main tokens, column 1: the lead tokens (no per-example sums).
        """
        tokens = plan.main_tokens if column == 0 else plan.lead_tokens
        if tokens == 0:
            return
        self._check_width(width)
        n_rows = _N_BASE_ROWS + len(self.thresholds)
        sums = vec[: 2 * n_rows].reshape(n_rows, 2)[:, column]
        max_b = float(vec[2 * n_rows + column])
        slots = self.spec.slots
        h = hist.reshape(_N_CATS, slots)
        h_b = h[CAT_BOTH] + (h[CAT_MAIN] if column == 0 else h[CAT_LEAD])
        n_b = tokens * width
        s1, sq = float(sums[_R_SUM]), float(sums[_R_SQ])
        mean_b = s1 / n_b
        m2_b = max(sq - s1 * mean_b, 0.0)
        self.mean, self.m2 = _chan(self.count, self.mean, self.m2, n_b, mean_b, m2_b)
        self.count += n_b
        self.tokens += tokens
        self.sum_abs += float(sums[_R_ABS])
        self.sum_sq += sq
        self.max_abs = max(self.max_abs, max_b) if not math.isnan(self.max_abs) else self.max_abs
        self.hist += h_b.astype(np.int64)
        if self.thresholds:
            self.below += np.rint(sums[_N_BASE_ROWS:]).astype(np.int64)
        if column == 0:
            ex = vec[2 * n_rows + 2 :]
            self.examples += plan.examples
            self.ex_l1 += float(ex[0])
            self.ex_l2 += float(ex[1])
            self.ex_fro += float(ex[2])
            self.ex_pooled_var += float(ex[3])
        else:
            self.per_example = False

    def _check_width(self, width: int) -> None:
        if self.width is None:
            self.width = int(width)
        elif self.width != width:
            raise ValueError(f"activation width changed from {self.width} to {width}")

    def _check_compatible(self, other: RunningStats) -> None:
        if other.spec != self.spec or other.thresholds != self.thresholds:
            raise ValueError("cannot combine statistics with different histogram specs or thresholds")
        if other.width is not None:
            self._check_width(other.width)

    def merge(self, other: RunningStats) -> RunningStats:
        """Add `other`'s tokens into self (Chan merge); returns self."""
        self._check_compatible(other)
        if other.count == 0:
            return self
        self.mean, self.m2 = _chan(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        self.count += other.count
        self.tokens += other.tokens
        self.sum_abs += other.sum_abs
        self.sum_sq += other.sum_sq
        self.max_abs = (
            max(self.max_abs, other.max_abs)
            if not (math.isnan(self.max_abs) or math.isnan(other.max_abs))
            else math.nan
        )
        self.hist = self.hist + other.hist
        self.below = self.below + other.below
        self.examples += other.examples
        self.ex_l1 += other.ex_l1
        self.ex_l2 += other.ex_l2
        self.ex_fro += other.ex_fro
        self.ex_pooled_var += other.ex_pooled_var
        self.per_example = self.per_example and other.per_example
        return self

    def subtract(self, other: RunningStats) -> RunningStats:
        """Remove a subset's tokens (`other` must be contained in self); returns self.

        Counts, moments, sums and the histogram are exact inverses of `merge`; max|a| and
        the per-example values cannot be taken apart and become unknown (NaN / None).
        """
        self._check_compatible(other)
        if other.count == 0:
            return self
        n = self.count
        n_b = other.count
        n_a = n - n_b
        if n_a < 0:
            raise ValueError("cannot subtract more elements than there are")
        if n_a == 0:
            self.mean, self.m2 = 0.0, 0.0
        else:
            mean_a = (n * self.mean - n_b * other.mean) / n_a
            d = other.mean - mean_a
            self.m2 = max(self.m2 - other.m2 - d * d * (n_a / n) * n_b, 0.0)
            self.mean = mean_a
        self.count = n_a
        self.tokens -= other.tokens
        self.sum_abs -= other.sum_abs
        self.sum_sq -= other.sum_sq
        self.max_abs = math.nan
        self.hist = self.hist - other.hist
        self.below = self.below - other.below
        self.per_example = False
        return self

    def copy(self) -> RunningStats:
        return RunningStats.from_dict(self.to_dict())

    # ------------------------------------------------------------ reading

    @property
    def variance(self) -> float:
        """Population variance over every activation scalar (METHOD eq. 1)."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.count else math.nan

    @property
    def rms(self) -> float:
        return math.sqrt(max(self.sum_sq, 0.0) / self.count) if self.count else math.nan

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else math.nan

    def _per_example(self, total: float) -> float:
        return total / self.examples if (self.examples and self.per_example) else math.nan

    @property
    def pooled_variance(self) -> float:
        """The reference code's variance: mean over examples of var_j(mean over tokens)."""
        return self._per_example(self.ex_pooled_var)

    @property
    def l1_norm(self) -> float:
        return self._per_example(self.ex_l1)

    @property
    def l2_norm(self) -> float:
        return self._per_example(self.ex_l2)

    @property
    def frobenius_norm(self) -> float:
        return self._per_example(self.ex_fro)

    def count_below(self, threshold: float) -> float:
        """#(|a| < threshold): exact for the up-front thresholds and at bin edges, else
        interpolated in the histogram (see the module docstring)."""
        t = float(threshold)
        if self.count == 0 or t <= 0.0 or math.isnan(t):
            return 0.0
        for i, known in enumerate(self.thresholds):
            if t == known:
                return float(self.below[i])
        if not math.isnan(self.max_abs) and t > self.max_abs:
            return float(self.count)
        spec = self.spec
        h = self.hist
        if t < spec.lo:
            return float(h[0])
        if t >= spec.hi:
            below_hi = float(h[:-1].sum())
            if math.isnan(self.max_abs) or self.max_abs <= spec.hi:
                return below_hi + float(h[-1])
            frac = math.log(t / spec.hi) / math.log(self.max_abs / spec.hi)
            return below_hi + float(h[-1]) * min(max(frac, 0.0), 1.0)
        p = spec.position(t)
        k = min(int(math.floor(p)), spec.bins - 1)  # 0-based bin holding t, slot k + 1
        return float(h[: k + 1].sum()) + float(h[k + 1]) * (p - k)

    def sparsity(self, threshold: float) -> float:
        """Share of activations with |a| < threshold (METHOD eq. 4)."""
        return self.count_below(threshold) / self.count if self.count else math.nan

    def quantile_abs(self, q: float) -> float:
        """q-quantile of |a| read from the histogram (inverse of `count_below`'s
        interpolation; 0 inside the underflow slot)."""
        if self.count == 0:
            return math.nan
        target = min(max(q, 0.0), 1.0) * self.count
        spec = self.spec
        h = self.hist.astype(np.float64)
        if target <= h[0]:
            return 0.0
        cum = np.cumsum(h)
        k = int(np.searchsorted(cum, target, side="left"))  # first slot with cum >= target
        if k >= spec.slots - 1:  # overflow slot
            if math.isnan(self.max_abs) or self.max_abs <= spec.hi or h[-1] == 0:
                return spec.hi
            frac = (target - cum[-2]) / h[-1]
            return spec.hi * (self.max_abs / spec.hi) ** frac
        frac = (target - cum[k - 1]) / h[k] if h[k] else 0.0
        value = spec.value_at(k - 1 + frac)
        return min(value, self.max_abs) if not math.isnan(self.max_abs) else value

    @property
    def median_abs(self) -> float:
        return self.quantile_abs(0.5)

    @property
    def max_median_ratio(self) -> float:
        """max|a| / median|a| (massive-activation indicator; inf when the median is 0)."""
        med = self.median_abs
        if math.isnan(med) or math.isnan(self.max_abs):
            return math.nan
        return self.max_abs / med if med > 0 else math.inf

    def summary(self) -> dict[str, float]:
        """The scalar statistics (may hold NaN/inf; pass through finite_or_none for clients)."""
        return {
            "count": float(self.count),
            "tokens": float(self.tokens),
            "examples": float(self.examples),
            "mean": self.mean if self.count else math.nan,
            "variance": self.variance,
            "std": self.std,
            "pooled_variance": self.pooled_variance,
            "rms": self.rms,
            "mean_abs": self.mean_abs,
            "max_abs": self.max_abs if self.count else math.nan,
            "median_abs": self.median_abs,
            "max_median_ratio": self.max_median_ratio,
            "underflow_fraction": float(self.hist[0]) / self.count if self.count else math.nan,
            "l1": self.l1_norm,
            "l2": self.l2_norm,
            "frobenius": self.frobenius_norm,
        }

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": {
                "per_octave": self.spec.per_octave,
                "lo_exp": self.spec.lo_exp,
                "hi_exp": self.spec.hi_exp,
            },
            "thresholds": list(self.thresholds),
            "width": self.width,
            "count": self.count,
            "tokens": self.tokens,
            "mean": self.mean,
            "m2": self.m2,
            "sum_abs": self.sum_abs,
            "sum_sq": self.sum_sq,
            "max_abs": None if math.isnan(self.max_abs) else self.max_abs,
            "hist": [int(v) for v in self.hist],
            "below": [int(v) for v in self.below],
            "examples": self.examples,
            "ex_l1": self.ex_l1,
            "ex_l2": self.ex_l2,
            "ex_fro": self.ex_fro,
            "ex_pooled_var": self.ex_pooled_var,
            "per_example": self.per_example,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunningStats:
        values = dict(d)
        spec = HistogramSpec(**values.pop("spec"))
        hist = np.asarray(values.pop("hist"), dtype=np.int64)
        below = np.asarray(values.pop("below"), dtype=np.int64)
        if values.get("max_abs") is None:
            values["max_abs"] = math.nan
        return cls(spec=spec, hist=hist, below=below, thresholds=tuple(values.pop("thresholds")), **values)
