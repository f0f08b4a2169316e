"""Bootstrap percentile confidence intervals over examples.

`bootstrap_ci(fn, *arrays)` resamples the N examples (the rows shared by every
array) with replacement `n_boot` times, evaluates `fn` on each resample and
returns the percentile interval `[alpha/2, 1 - alpha/2]` of the values.

Undefined resamples: a resample on which the metric is undefined (`fn` returns
None or NaN, e.g. AUROC on a resample that drew only correct answers) is left
out, and the interval is taken over the remaining ones. `n_valid` says how many
were used; when none is valid the interval is (None, None). Leaving them out
conditions the interval on the metric being defined, which is the usual
practice; a small `n_valid / n_boot` means the interval deserves little trust.

Determinism: the resample indices come from `numpy.random.default_rng(seed)`;
the same seed, N and n_boot give the same resamples (also across metrics, so
intervals of different metrics in one report are paired).

Two calling conventions:
- `batched=False` (default): `fn(*arrays_1d) -> float | None`, one call per
  resample.
- `batched=True`: `fn(*arrays_2d) -> array[B]`, each array of shape (B, N) is a
  block of B resamples (rows); NaN marks an undefined resample. Blocks are
  limited to about `max_block_elems` elements so memory stays bounded.

`bootstrap_cis(fn, *arrays)` is the batched form for several metrics at once:
`fn` returns (B, M) and every metric gets its interval from the same resamples
(this is how `calibration_report` shares one sort across its metrics).

Paired: `paired_bootstrap_ci(fn, a, b)` compares two systems measured on the same
N examples (e.g. a model before and after pruning): both systems' per-example
arrays are resampled with the *same* indices, so what the examples share (an easy
or a hard text) cancels in a ratio or a difference instead of widening its
interval. `fn(a_blocks, b_blocks) -> array[B]` (lists of (B, N) blocks, batched).
Its resamples are `bootstrap_ci`'s for the same seed, N and n_boot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np


class BootstrapCI(NamedTuple):
    low: float | None
    high: float | None
    n_valid: int
    n_boot: int


def _check_params(n_boot: int, alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")


def _n_examples(arrays: tuple[Any, ...]) -> int:
    if not arrays:
        raise ValueError("bootstrap needs at least one array")
    shapes = [np.shape(a) for a in arrays]
    if any(len(sh) == 0 for sh in shapes) or len({sh[0] for sh in shapes}) != 1:
        raise ValueError("all arrays must share their first dimension (the examples)")
    return int(shapes[0][0])


def bootstrap_ci(
    fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    batched: bool = False,
    max_block_elems: int = 2_000_000,
) -> BootstrapCI:
    """Percentile bootstrap interval of `fn` over resampled examples (see module doc)."""
    n = _n_examples(arrays)
    if n == 0 or n_boot == 0:
        _check_params(n_boot, alpha)
        return BootstrapCI(None, None, 0, n_boot)
    if batched:
        return bootstrap_cis(
            lambda *a: np.asarray(fn(*a), dtype=np.float64).reshape(-1, 1),
            *arrays,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            max_block_elems=max_block_elems,
        )[0]

    def one_by_one(*blocks: np.ndarray) -> np.ndarray:
        out = np.empty((blocks[0].shape[0], 1), dtype=np.float64)
        for i in range(out.shape[0]):
            v = fn(*(blk[i] for blk in blocks))
            out[i, 0] = np.nan if v is None else float(v)
        return out

    return bootstrap_cis(
        one_by_one, *arrays, n_boot=n_boot, seed=seed, alpha=alpha, max_block_elems=max_block_elems
    )[0]


def bootstrap_cis(
    fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_block_elems: int = 2_000_000,
) -> list[BootstrapCI]:
    """Several metrics on the same resamples: batched `fn(*arrays_2d) -> array[B, M]`
    (NaN = undefined); returns one `BootstrapCI` per column m. Resamples are the
    same as `bootstrap_ci`'s for the same seed, N and n_boot."""
    _check_params(n_boot, alpha)
    n = _n_examples(arrays)
    arrs = [np.asarray(a) for a in arrays]
    if n == 0 or n_boot == 0:
        # No resamples: learn the number of metrics from the data itself as one row.
        probe = np.asarray(fn(*(a[None] for a in arrs)), dtype=np.float64)
        m = probe.shape[1] if probe.ndim == 2 else 1
        return [BootstrapCI(None, None, 0, n_boot)] * m

    rng = np.random.default_rng(seed)
    chunks: list[np.ndarray] = []
    block = max(1, min(n_boot, max_block_elems // n))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        out = np.asarray(fn(*(a[idx] for a in arrs)), dtype=np.float64)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != b:
            raise ValueError(f"batched fn returned shape {out.shape} for {b} resamples")
        chunks.append(out)
    values = np.concatenate(chunks, axis=0)

    result: list[BootstrapCI] = []
    for col in values.T:
        valid = col[np.isfinite(col)]
        if valid.size == 0:
            result.append(BootstrapCI(None, None, 0, n_boot))
            continue
        low, high = np.percentile(valid, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
        result.append(BootstrapCI(float(low), float(high), int(valid.size), n_boot))
    return result


def paired_bootstrap_ci(
    fn: Callable[[list[np.ndarray], list[np.ndarray]], Any],
    a: Sequence[Any],
    b: Sequence[Any],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_block_elems: int = 2_000_000,
) -> BootstrapCI:
    """Percentile interval of `fn(a_blocks, b_blocks)` where the per-example arrays of
    system `a` and of system `b` (the same N examples, in the same order) are resampled
    with the same indices (module doc). `fn` returns one value per resample (NaN =
    undefined, left out)."""
    if not a or not b:
        raise ValueError("paired_bootstrap_ci needs at least one array per system")
    k = len(a)
    return bootstrap_ci(
        lambda *blocks: fn(list(blocks[:k]), list(blocks[k:])),
        *a,
        *b,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
        batched=True,
        max_block_elems=max_block_elems,
    )
