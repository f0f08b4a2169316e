"""Streaming activation statistics (docs/method.md section 1).

Two halves:

* `reduce_activations` runs on the device, inside a forward hook: it reduces one
  batch's activation tensor `[batch, pos, width]` to a short float64 vector of sums
  plus integer histograms (the coarse one and the fine windows), with a fixed, small
  number of kernels and no host synchronisation. Which positions count is given by a `BatchPlan`, built once per
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
* Fine window (`FineSpec`): 4096 bins per octave over 8 octaves, from one octave below
  the lowest anchor (e.g. 0.01 x RMS of the counted tokens and of the alternative view)
  as estimated on the device from a hook's first batch, so a relative threshold, known
  only at the end, still falls in a narrow bin.
* `sparsity(t)` = #(|a| < t) / N, `sparsity_bounded(t)` adds the bound on its absolute
  error. Exact (bound 0) when `t` is one of the `thresholds` given up front (counted by
  comparison at update time, or recorded by a second pass: `add_exact`), when t is a
  bin edge or its bin is empty, when t <= 0 or t > max_abs; otherwise read from the
  finest histogram covering t: whole bins below t plus an interpolated share of the bin
  holding t, the bound being that bin's count x max(share, 1 - share). With 2 bins per
  octave a coarse bin spans a factor 1.33-1.5; a fine bin a factor 1.00017. Below lo
  every value of the underflow slot counts as zero-like (below any t > 0), with the
  slot as the bound; above hi the share is log-linear between hi and max_abs.

Precision: the per-token moment sums (sum a, sum a^2 via the L2 norm, sum |a| via the L1
norm) are float64 reductions of a float64 image of each slice (float32/bf16/fp16 values
are exact in float64); per-token float32 reductions promoted afterwards were measured at
up to 1.6e-6 relative error on SmolLM2 (bench/bench_profiler.py (c)), so only max|a|, the
threshold counts and the histograms skip float64 (exact in the input's type or on
integers). The batch M2 is sum_sq - sum^2/n, whose relative error is about
1e-16 x (1 + mean^2/variance), merged with Chan's formula. The
pooled mean vectors are summed in the activation's float precision (float32 matmul);
that sum multiplies padding by 0, so it assumes padding positions hold finite values
(true for right padding; every other statistic masks padding with `where`).
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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


# Anchors of the fine windows: what a window is centred on, estimated from a hook's first
# batch. "rms": factor x the RMS of the counted tokens; "rms_alt": the same for the
# alternative view (leading positions toggled, see Profile.alternative_stats); "median":
# factor x the median |a| (read off the first batch's coarse histogram).
ANCHOR_KINDS = ("rms", "rms_alt", "median")


@dataclass(frozen=True)
class FineSpec:
    """A fine |a| window: `2**bits` bins per octave over `octaves` octaves from one octave
    below the lowest anchor (ANCHOR_KINDS, estimated from a hook's first batch), plus a
    below-window and an above-window slot. Bins are read from the float's bits like
    HistogramSpec's (exact), at a resolution where a threshold's bin holds a small share of
    the values: with 4096 bins per octave a bin spans a factor 1.00017 (measured on SmolLM2
    outputs at 0.01 x RMS: at most 7.6e-5 of N, against 2.5e-4 with 1024 bins per
    octave; bench/bench_profiler.py (c)). One window, not one per anchor: each window is one
    more count over the activation (`_fine_counts`). 8 octaves
    hold 0.01 x RMS and 0.01 x RMS of the view without position 0 (4.1 octaves lower on
    SmolLM2's massive-activation layers) with room for the first batch's estimate to drift
    (up to a factor 4 upward seen when a later batch brings a massive activation); a
    threshold outside the window is read off the coarse histogram, its bound says so."""

    anchors: tuple[tuple[str, float], ...] = (("rms", 0.01), ("rms_alt", 0.01))
    bits: int = 12
    octaves: int = 8

    def __post_init__(self) -> None:
        if not (0 <= self.bits <= 20 and 1 <= self.octaves <= 16):
            raise ValueError(f"bad fine spec {self}")
        for kind, factor in self.anchors:
            if kind not in ANCHOR_KINDS or not (0 < float(factor) < 1e6):
                raise ValueError(f"bad fine-window anchor {(kind, factor)}")

    @property
    def per_octave(self) -> int:
        return 1 << self.bits

    @property
    def bins(self) -> int:
        return self.octaves << self.bits

    @property
    def slots(self) -> int:
        return self.bins + 2

    def edge(self, code: int) -> float:
        """Lower edge of fine code `code` (float32 code space: biased exponent, then `bits`
        leading mantissa bits)."""
        e, j = divmod(int(code), self.per_octave)
        return math.ldexp(1.0 + j / self.per_octave, e - 127)

    def locate(self, value: float) -> tuple[int, float]:
        """(fine code of the bin holding value > 0, linear position of value inside it in [0, 1))."""
        m, ex = math.frexp(value)  # value = m * 2**ex, m in [0.5, 1)
        pos = (2.0 * m - 1.0) * self.per_octave  # exact: a power-of-two scaling
        j = int(math.floor(pos))
        return ((ex - 1 + 127) << self.bits) + j, pos - j

    def to_dict(self) -> dict[str, Any]:
        return {"anchors": [[k, float(f)] for k, f in self.anchors], "bits": self.bits, "octaves": self.octaves}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FineSpec:
        return cls(anchors=tuple((str(k), float(f)) for k, f in d["anchors"]), bits=d["bits"], octaves=d["octaves"])


@dataclass
class Window:
    """One fine window's counts: slot 0 = |a| below edge(start), slots 1..bins = the fine
    bins from code `start` on, slot bins + 1 = at or above the window's top (NaN too)."""

    start: int
    counts: np.ndarray

    def copy(self) -> Window:
        return Window(self.start, self.counts.copy())

    @property
    def bins(self) -> int:
        return len(self.counts) - 2

    def covers(self, spec: FineSpec, value: float) -> bool:
        return self.bins > 0 and spec.edge(self.start) <= value < spec.edge(self.start + self.bins)

    def count_below(self, spec: FineSpec, value: float) -> tuple[float, float]:
        """(#(|a| < value), bound on its error) for a covered value: whole bins below plus a
        linear share of the bin holding it; the true count lies between the bin's two ends."""
        code, frac = spec.locate(value)
        k = code - self.start
        below = float(self.counts[: k + 1].sum())  # slot 0 and the bins before k
        h = float(self.counts[k + 1])
        if frac == 0.0:
            return below, 0.0
        return below + frac * h, max(frac, 1.0 - frac) * h

    def resliced(self, start: int, end: int) -> Window:
        """The same counts over the sub-range [start, end) of fine codes (inside this window;
        empty when end <= start)."""
        end = max(end, start)
        a, b = start - self.start, end - self.start
        c = self.counts
        mid = c[1 + a : 1 + b]
        return Window(start, np.concatenate([[c[: 1 + a].sum()], mid, [c[1 + b :].sum()]]).astype(np.int64))


def _common_windows(a: list[Window], b: list[Window]) -> tuple[list[Window], list[Window]]:
    """Both lists cut to the intersection of each pair of windows (empty where they do not
    overlap), so their counts can be added or subtracted bin by bin."""
    if len(a) != len(b):
        return [], []
    out_a: list[Window] = []
    out_b: list[Window] = []
    for wa, wb in zip(a, b, strict=True):
        if wa.start == wb.start and wa.bins == wb.bins:
            out_a.append(wa)
            out_b.append(wb)
            continue
        start = max(wa.start, wb.start)
        end = min(wa.start + wa.bins, wb.start + wb.bins)
        out_a.append(wa.resliced(start, end))
        out_b.append(wb.resliced(start, end))
    return out_a, out_b


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
    fine: FineSpec | None = None
    fine_base: torch.Tensor | None = None  # [B, P, 1] int32: category * fine.slots
    alt_sign: int = -1  # the alternative view is main - lead (skip_positions 0) or main + lead

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
        fine: FineSpec | None = None,
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
            fine=fine if fine is not None and fine.anchors else None,
            fine_base=None
            if fine is None or not fine.anchors
            else (fine.slots * cat)[..., None].to(dev, non_blocking=True),
            alt_sign=-1 if skip_positions == 0 else 1,
        )


def vector_length(n_thresholds: int) -> int:
    """Length of the vector `reduce_activations` returns."""
    return 2 * (_N_BASE_ROWS + n_thresholds) + 2 + 4


# On the CPU a batch is reduced in slices of whole examples of about this many elements,
# so the passes over each slice run from cache instead of memory (about 2x faster for wide
# sites); on an accelerator the whole batch goes at once (fewer launches).
CPU_SLICE_ELEMENTS = 1 << 18
# torch.histc counts in the input's float type: below 2**24 elements per call every count
# is an exact integer in float32.
_HISTC_CHUNK = (1 << 24) - 1


class Reduced(NamedTuple):
    """One hook's reduction of one batch, all on the device (see `reduce_activations`)."""

    vec: torch.Tensor
    hist: torch.Tensor
    fine: torch.Tensor | None  # int64 [windows, 4 * fine.slots]: per token category (see BatchPlan)
    starts: torch.Tensor | None  # int64 [windows]: each window's first fine code
    pooled: torch.Tensor | None


def reduce_activations(
    x: torch.Tensor,
    plan: BatchPlan,
    starts: torch.Tensor | None = None,
    thresholds: Sequence[float] | None = None,
) -> Reduced:
    """Reduce one batch `x[B, P, width]` on its device; no host sync.

    Returns `Reduced`:
    * vec float64 [vector_length]: the per-row sums for main and lead tokens (rows:
      sum a, sum a^2, sum |a|, sum of per-token L2 norms, then #(|a| < t) per threshold;
      flattened row-major as [row, column]), then max|a| for main and lead, then the sums
      over examples of l1_e, l2_e, fro_e and the pooled variance v_e (main tokens only).
    * hist int64 [4 * slots]: |a| histograms per token category (see BatchPlan).
    * fine, starts: the fine windows (plan.fine), per window 4 category histograms; `starts`
      given (a hook's later batches) or, when None, placed from this batch (its first).
    * pooled float32 [B, width]: mean-pooled activation per example (main tokens), if asked.
    `thresholds` replaces plan.thresholds for this hook (same count for every hook).

    Precision: the moment sums (sum a, sum a^2, sum |a|) are float64 reductions of a float64
    image of each slice: float32 reductions per token were measured at up to 1.6e-6 relative
    error on SmolLM2 (1e-9 is the target), see bench/bench_profiler.py (c). Every other
    quantity is exact without float64: max|a| in the input's type, threshold counts and
    histogram bins on integers (the float's bits).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    ths = plan.thresholds if thresholds is None else tuple(float(t) for t in thresholds)
    per_example = x.shape[1] * x.shape[2]
    step = max(1, CPU_SLICE_ELEMENTS // max(per_example, 1)) if x.device.type == "cpu" else x.shape[0]
    ranges = [slice(b, min(b + step, x.shape[0])) for b in range(0, x.shape[0], step)]
    fine_now = plan.fine is not None and starts is not None
    parts = [_reduce_slice(x[r], plan, r, ths, starts if fine_now else None) for r in ranges]
    if len(parts) == 1:
        sums, mxw, ex, hist, fine, pooled = parts[0]
    else:
        sums = torch.stack([p[0] for p in parts]).sum(0)
        mxw = torch.stack([p[1] for p in parts]).amax(0)
        ex = torch.stack([p[2] for p in parts]).sum(0)
        hist = torch.stack([p[3] for p in parts]).sum(0)
        fine = torch.stack([p[4] for p in parts]).sum(0) if fine_now else None  # type: ignore[misc]
        pooled = torch.cat([p[5] for p in parts]) if plan.want_pooled else None  # type: ignore[misc]
    if plan.fine is not None and starts is None:  # a hook's first batch: place its window from it
        starts = _window_starts(sums, hist, plan, x.shape[-1])
        fine = torch.stack([_fine_counts(x[r].abs(), plan, r, starts) for r in ranges]).sum(0)
    return Reduced(torch.cat([sums.flatten(), mxw, ex]), hist, fine, starts, pooled)


def _count(code: torch.Tensor, n_slots: int) -> torch.Tensor:
    """int64 counts of the integer codes 0..n_slots-1 (no host sync on an accelerator)."""
    flat = code.flatten()
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=n_slots)
    return _count_without_sync(flat, n_slots)


def _count_without_sync(flat: torch.Tensor, n_slots: int) -> torch.Tensor:
    """bincount sizes its output from a device-to-host max(); histc with a fixed range does
    not sync. The codes are small integers (exact in float32), one unit-wide bin each, and
    each call sees fewer than 2**24 of them, so every float32 count is exact."""
    out = torch.zeros(n_slots, dtype=torch.int64, device=flat.device)
    for piece in flat.split(_HISTC_CHUNK):
        out += torch.histc(piece.float(), bins=n_slots, min=0, max=n_slots).to(torch.int64)
    return out


def _float_codes(a: torch.Tensor, bits: int) -> torch.Tensor:
    """|a|'s bits >> (mantissa bits - bits): biased exponent then `bits` mantissa bits, in the
    float32 code space for float32 and float64 alike (exact, monotone in |a|)."""
    if a.dtype == torch.float64:
        return (a.view(torch.int64) >> (52 - bits)) - ((1023 - 127) << bits)
    return a.view(torch.int32) >> (23 - bits)


def _reduce_slice(
    x: torch.Tensor,
    plan: BatchPlan,
    rows_: slice,
    thresholds: tuple[float, ...],
    starts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    f64 = torch.float64
    spec = plan.spec
    counted = plan.counted[rows_]
    w = plan.weights[rows_]
    counts = plan.counts[rows_]

    x64 = x if x.dtype == f64 else x.to(f64)
    s1 = x64.sum(-1)
    l2 = torch.linalg.vector_norm(x64, 2, dim=-1)
    sa = torch.linalg.vector_norm(x64, 1, dim=-1)
    del x64
    a = x.abs()
    mx = a.amax(-1)
    rows = [s1, l2 * l2, sa, l2]
    for t in thresholds:
        rows.append((a < _round_up(t, a.dtype)).sum(-1).to(f64))
    table = torch.where(counted, torch.stack(rows), 0.0)  # [R, B, P]; drops NaN from padding
    sums = table.flatten(1) @ w.flatten(0, 1)  # [R, 2]
    mxw = (torch.where(counted, mx.to(f64), 0.0)[..., None] * w).amax(dim=(0, 1))  # [2]

    main = w[..., 0]
    per_ex = (table[[_R_ABS, _R_L2, _R_SQ]] * main).sum(-1)  # [3, B]
    pooled_sum = torch.bmm(main.to(x.dtype)[:, None, :], x)[:, 0, :]  # [B, width]
    pooled_mean = pooled_sum.to(f64) / counts[:, None]
    pooled_var = pooled_mean.var(dim=-1, correction=0)
    ex = torch.stack([per_ex[0] / counts, per_ex[1] / counts, per_ex[2].sqrt(), pooled_var]) @ plan.has[rows_]

    # Histogram: bin code = top bits of |a| (exponent + leading mantissa bits), integers only.
    shift, lo_code = spec.code_offset(a.dtype)
    bits = a.view(torch.int64 if a.dtype == f64 else torch.int32)
    code = bits >> shift
    code.clamp_(lo_code - 1, lo_code + spec.bins).add_(plan.category[rows_].to(code.dtype) - lo_code)
    hist = _count(code, _N_CATS * spec.slots)
    del code
    fine = _fine_counts(a, plan, rows_, starts) if starts is not None else None

    pooled = pooled_mean.to(torch.float32) if plan.want_pooled else None
    return sums, mxw, ex, hist, fine, pooled


def _fine_counts(a: torch.Tensor, plan: BatchPlan, rows_: slice, starts: torch.Tensor) -> torch.Tensor:
    """The fine window's histogram of |a| per token category ([1, 4 * fine.slots]): shift,
    clamp to the two outer slots, offset by the window start and the category, count. Scalar clamps and a
    broadcast add only: measured on the CPU, a tensor-bounded clamp or a torch.where
    merging this count into the coarse one cost more than the second count."""
    fine = plan.fine
    assert fine is not None and plan.fine_base is not None
    code = _float_codes(a, fine.bits)
    base = plan.fine_base[rows_].to(code.dtype)
    if code.device.type == "cpu":  # the start as a scalar (no sync to pay here): one pass fewer, ~14% faster
        low = int(starts[0]) - 1
        code.clamp_(low, low + fine.bins + 1).add_(base - low)
    else:
        code.sub_(starts[0].to(code.dtype) - 1).clamp_(0, fine.bins + 1).add_(base)
    return _count(code, _N_CATS * fine.slots)[None]


def _window_starts(sums: torch.Tensor, hist: torch.Tensor, plan: BatchPlan, width: int) -> torch.Tensor:
    """First fine code of each window, centred on its anchor as estimated from this batch
    (device ops only, no host sync)."""
    fine = plan.fine
    assert fine is not None
    spec = plan.spec
    dev = sums.device
    n_main = max(plan.main_tokens * width, 1)
    n_alt = (plan.main_tokens + plan.alt_sign * plan.lead_tokens) * width
    centres = []
    for kind, factor in fine.anchors:
        if kind == "median":
            h = hist.view(_N_CATS, spec.slots)
            cum = (h[CAT_MAIN] + h[CAT_BOTH]).cumsum(0)
            k = torch.searchsorted(cum, (cum[-1:] + 1) // 2)[0]  # slot holding the median
            _, lo_code = spec.code_offset(torch.float32)
            up = fine.bits - spec.bits
            centre = ((lo_code + k - 1) << up) + (1 << up) // 2 + round(math.log2(factor) * fine.per_octave)
            centre = centre.clamp(max=(127 + 64) << fine.bits)  # the median in the overflow slot: as above
        else:
            sq, n = sums[_R_SQ, 0], n_main
            if kind == "rms_alt" and n_alt > 0:
                sq, n = sums[_R_SQ, 0] + plan.alt_sign * sums[_R_SQ, 1], n_alt
            # a NaN or inf in the batch gives no estimate: anchor at factor x 1; the clamp keeps the
            # window's top far below inf, so NaN and inf always land above it
            value = torch.nan_to_num(float(factor) * (sq.clamp(min=0.0) / n).sqrt(), nan=float(factor))
            value = value.clamp(2.0**-126, 2.0**64).float()
            centre = _float_codes(value.reshape(1), fine.bits)[0].to(torch.int64)
        centres.append(centre)
    return (torch.stack(centres).to(dev, torch.int64).amin() - fine.per_octave).reshape(1)  # an octave below


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
    hist: np.ndarray = field(default=None)  # type: ignore[arg-type]
    below: np.ndarray = field(default=None)  # type: ignore[arg-type]
    examples: int = 0
    ex_l1: float = 0.0
    ex_l2: float = 0.0
    ex_fro: float = 0.0
    ex_pooled_var: float = 0.0
    per_example: bool = True  # False once the per-example sums no longer describe these tokens
    fine: FineSpec | None = None  # the fine windows' layout (None: coarse histogram only)
    windows: list[Window] = field(default_factory=list)  # one per fine.anchors, once placed

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
            fine=self.fine,
        )
        starts = torch.as_tensor([w.start for w in self.windows], dtype=torch.int64) if self.windows else None
        with torch.inference_mode():
            red = reduce_activations(x3, plan, starts=starts)
        self.absorb(
            red.vec.cpu().numpy(),
            red.hist.cpu().numpy(),
            plan,
            x3.shape[-1],
            column=0,
            fine=None if red.fine is None else red.fine.cpu().numpy(),
            starts=None if red.starts is None else red.starts.cpu().tolist(),
        )

    def absorb(
        self,
        vec: np.ndarray,
        hist: np.ndarray,
        plan: BatchPlan,
        width: int,
        column: int,
        fine: np.ndarray | None = None,
        starts: Sequence[int] | None = None,
    ) -> None:
        """Merge one batch reduction (host copies of `reduce_activations`' output).

        column 0: the main tokens, column 1: the lead tokens (no per-example sums).
        fine [windows, 4 * fine.slots] and starts: the fine window of this batch, if any.
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
        if fine is not None and starts is not None and self.fine is not None:
            hf = fine.reshape(len(starts), _N_CATS, self.fine.slots)
            mine = CAT_MAIN if column == 0 else CAT_LEAD
            batch = [Window(int(s0), (hf[k, CAT_BOTH] + hf[k, mine]).astype(np.int64)) for k, s0 in enumerate(starts)]
            self._add_windows(batch, first=self.count == n_b)
        elif self.windows:
            self.windows = []  # this batch has no fine counts: the windows no longer cover every token
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

    def _add_windows(self, other: list[Window], first: bool, sign: int = 1) -> None:
        if first:
            self.windows = [w.copy() for w in other]
            return
        mine, theirs = _common_windows(self.windows, other)
        for w, o in zip(mine, theirs, strict=True):
            w.counts = w.counts + sign * o.counts
        self.windows = [w.copy() for w in mine]

    def _check_width(self, width: int) -> None:
        if self.width is None:
            self.width = int(width)
        elif self.width != width:
            raise ValueError(f"activation width changed from {self.width} to {width}")

    def _check_compatible(self, other: RunningStats) -> None:
        if other.spec != self.spec or other.thresholds != self.thresholds or other.fine != self.fine:
            raise ValueError("cannot combine statistics with different histogram specs or thresholds")
        if other.width is not None:
            self._check_width(other.width)

    def merge(self, other: RunningStats) -> RunningStats:
        """Add `other`'s tokens into self (Chan merge); returns self."""
        self._check_compatible(other)
        if other.count == 0:
            return self
        self._add_windows(other.windows, first=self.count == 0)
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
        self._add_windows(other.windows, first=False, sign=-1)
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

    def add_exact(self, threshold: float, count: int) -> None:
        """Record #(|a| < threshold) counted exactly elsewhere (a second pass over the same
        tokens); `count_below(threshold)` then returns it with bound 0."""
        t = float(threshold)
        if t in self.thresholds:
            self.below[self.thresholds.index(t)] = int(count)
            return
        self.thresholds = (*self.thresholds, t)
        self.below = np.append(self.below, np.int64(count))

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
        """#(|a| < threshold), see `count_below_bounded`."""
        return self.count_below_bounded(threshold)[0]

    def count_below_bounded(self, threshold: float) -> tuple[float, float]:
        """(#(|a| < threshold), bound on its error): the true count lies within the bound.

        Exact (bound 0) for the up-front thresholds, for t <= 0 and t > max|a|, at a bin edge
        and in an empty bin. Otherwise read from the finest histogram covering t: a fine
        window (bins a factor 2**(1/4096) wide), else the coarse histogram; whole bins below
        t plus an interpolated share of the bin holding t, whose count bounds the error
        (times max(frac, 1 - frac), frac the interpolated share). Below the coarse range
        (t < lo) the whole underflow slot counts, with its count as the bound."""
        t = float(threshold)
        if self.count == 0 or t <= 0.0 or math.isnan(t):
            return 0.0, 0.0
        for i, known in enumerate(self.thresholds):
            if t == known:
                return float(self.below[i]), 0.0
        if not math.isnan(self.max_abs) and t > self.max_abs:
            return float(self.count), 0.0
        if self.fine is not None:
            for w in self.windows:
                if w.covers(self.fine, t):
                    return w.count_below(self.fine, t)
        spec = self.spec
        h = self.hist
        if t < spec.lo:
            return float(h[0]), float(h[0])
        if t >= spec.hi:
            below_hi = float(h[:-1].sum())
            if math.isnan(self.max_abs) or self.max_abs <= spec.hi:
                return below_hi + float(h[-1]), float(h[-1])
            frac = min(max(math.log(t / spec.hi) / math.log(self.max_abs / spec.hi), 0.0), 1.0)
            return below_hi + float(h[-1]) * frac, float(h[-1]) * max(frac, 1.0 - frac)
        p = spec.position(t)
        k = min(int(math.floor(p)), spec.bins - 1)  # 0-based bin holding t, slot k + 1
        frac = p - k
        below, hk = float(h[: k + 1].sum()), float(h[k + 1])
        if frac == 0.0:
            return below, 0.0
        return below + hk * frac, hk * max(frac, 1.0 - frac)

    def sparsity(self, threshold: float) -> float:
        """Share of activations with |a| < threshold (METHOD eq. 4)."""
        return self.count_below(threshold) / self.count if self.count else math.nan

    def sparsity_bounded(self, threshold: float) -> tuple[float, float]:
        """(sparsity, bound on its absolute error); bound 0 means exact."""
        if not self.count:
            return math.nan, math.nan
        c, b = self.count_below_bounded(threshold)
        return c / self.count, b / self.count

    def quantile_abs(self, q: float) -> float:
        """q-quantile of |a| read from the histogram (inverse of `count_below`'s
        interpolation; 0 inside the underflow slot); from a fine window when the quantile
        falls inside one (then within one fine bin of the true value)."""
        if self.count == 0:
            return math.nan
        target = min(max(q, 0.0), 1.0) * self.count
        if self.fine is not None:
            for w in self.windows:
                mid = w.counts[1:-1].astype(np.float64)
                if not (w.counts[0] < target <= w.counts[0] + mid.sum()):
                    continue
                cum = w.counts[0] + np.cumsum(mid)
                k = int(np.searchsorted(cum, target, side="left"))
                prev = cum[k - 1] if k else float(w.counts[0])
                frac = (target - prev) / mid[k] if mid[k] else 0.0
                lo_edge, hi_edge = self.fine.edge(w.start + k), self.fine.edge(w.start + k + 1)
                value = lo_edge + frac * (hi_edge - lo_edge)
                return min(value, self.max_abs) if not math.isnan(self.max_abs) else value
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
            "fine": None if self.fine is None else self.fine.to_dict(),
            "windows": [{"start": w.start, "counts": _pack(w.counts)} for w in self.windows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunningStats:
        values = dict(d)
        spec = HistogramSpec(**values.pop("spec"))
        hist = np.asarray(values.pop("hist"), dtype=np.int64)
        below = np.asarray(values.pop("below"), dtype=np.int64)
        if values.get("max_abs") is None:
            values["max_abs"] = math.nan
        fine = values.pop("fine", None)
        windows = [Window(int(w["start"]), _unpack(w["counts"])) for w in values.pop("windows", [])]
        return cls(
            spec=spec,
            hist=hist,
            below=below,
            thresholds=tuple(values.pop("thresholds")),
            fine=None if fine is None else FineSpec.from_dict(fine),
            windows=windows,
            **values,
        )


def _pack(counts: np.ndarray) -> str:
    """int64 counts as base64 of their zlib-compressed little-endian bytes (JSON-safe, small)."""
    return base64.b64encode(zlib.compress(counts.astype("<i8").tobytes(), 6)).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").astype(np.int64)
