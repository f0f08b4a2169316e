"""The hook-based activation profiler (docs/method.md section 1).

`profile()` runs the model over the examples in length-sorted, right-padded batches
under `torch.inference_mode`, with forward hooks on the chosen capture sites of every
block. Each hook reduces its activation on the device (`stats.reduce_activations`);
after each batch the reductions of all hooks are copied to the host in one transfer
and merged into float64 `RunningStats`. Nothing of an activation outlives its batch,
so memory does not grow with the number of examples (except the per-example pooled
vectors, kept only when `collect_pooled` asks for them).

Which tokens count: real tokens (the attention mask), from position
`max(options.skip_positions, token_start[e])` on. Positions are indices into the
tokenized example (special tokens such as BOS included), truncated to `max_tokens`.
The leading positions (< max(skip_positions, 1)) are also accumulated apart
(`Profile.lead`), so a result can show its ranking with and without them
(`Profile.alternative_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.lm.batching import AutoBatch
from worker.lm.model import forward_callable, model_device
from worker.lm.tokens import encode_texts, length_batches, pad_batch, pad_id
from worker.profiler.hooks import capture
from worker.profiler.stats import (
    BatchPlan,
    FineSpec,
    HistogramSpec,
    Reduced,
    RunningStats,
    reduce_activations,
    vector_length,
)
from worker.stage import JobContext, JobFailed

if TYPE_CHECKING:
    from app.schemas import ProfileOptions
    from worker.modelzoo import LoadedModel

STAGE = "profile"


@dataclass
class Profile:
    """Per-(layer, site) statistics of one profiling run. Layers are in block order;
    `layer_indices[i]` / `block_names[i]` identify block i."""

    block_names: list[str]
    layer_indices: list[int]
    sites: list[str]
    stats: dict[tuple[int, str], RunningStats]  # key: (block position, site)
    lead: dict[tuple[int, str], RunningStats]  # the leading positions, see module docstring
    spec: HistogramSpec
    thresholds: tuple[float, ...] = ()
    skip_positions: int = 0
    lead_positions: int = 1
    n_examples: int = 0  # examples given
    n_profiled_examples: int = 0  # examples with at least one counted token
    n_tokens: int = 0  # counted token positions (per site and layer)
    n_batches: int = 0
    max_tokens: int = 0
    answer_only: bool = False  # token_start was given
    pooled: dict[str, np.ndarray] | None = None  # site -> [examples, layers, width] float32
    pooled_tokens: np.ndarray | None = None  # [examples] counted tokens behind each pooled vector
    warnings: list[str] = field(default_factory=list)
    fine: FineSpec | None = None  # the fine |a| windows around the relative thresholds

    @property
    def n_layers(self) -> int:
        return len(self.block_names)

    def site_stats(self, site: str) -> list[RunningStats]:
        self._check_site(site)
        return [self.stats[(i, site)] for i in range(self.n_layers)]

    @property
    def alternative_skip(self) -> int:
        """skip_positions of the alternative view: 1 when nothing is skipped, else 0."""
        return 1 if self.skip_positions == 0 else 0

    def alternative_stats(self, site: str) -> list[RunningStats]:
        """Statistics as if the leading positions were toggled: without position 0 when
        skip_positions == 0, with the skipped positions when skip_positions > 0. max|a| and
        the per-example values are unknown (NaN) in this view."""
        self._check_site(site)
        out = []
        for i in range(self.n_layers):
            s = self.stats[(i, site)].copy()
            lead = self.lead[(i, site)]
            if self.skip_positions == 0:
                s.subtract(lead)
            else:
                s.merge(lead)
                s.per_example = False
                s.max_abs = math.nan
            out.append(s)
        return out

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"site {site!r} was not profiled (profiled: {self.sites})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metadata plus every accumulator (histograms included); no pooled vectors."""
        return {
            "block_names": list(self.block_names),
            "layer_indices": list(self.layer_indices),
            "sites": list(self.sites),
            "histogram": {
                "per_octave": self.spec.per_octave,
                "lo_exp": self.spec.lo_exp,
                "hi_exp": self.spec.hi_exp,
            },
            "thresholds": list(self.thresholds),
            "fine": None if self.fine is None else self.fine.to_dict(),
            "skip_positions": self.skip_positions,
            "lead_positions": self.lead_positions,
            "n_examples": self.n_examples,
            "n_profiled_examples": self.n_profiled_examples,
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "max_tokens": self.max_tokens,
            "answer_only": self.answer_only,
            "warnings": list(self.warnings),
            "stats": {
                site: [self.stats[(i, site)].to_dict() for i in range(self.n_layers)] for site in self.sites
            },
            "lead": {
                site: [self.lead[(i, site)].to_dict() for i in range(self.n_layers)] for site in self.sites
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        sites = list(d["sites"])
        n = len(d["block_names"])
        return cls(
            block_names=list(d["block_names"]),
            layer_indices=list(d["layer_indices"]),
            sites=sites,
            stats={(i, s): RunningStats.from_dict(d["stats"][s][i]) for s in sites for i in range(n)},
            lead={(i, s): RunningStats.from_dict(d["lead"][s][i]) for s in sites for i in range(n)},
            spec=HistogramSpec(**d["histogram"]),
            thresholds=tuple(d.get("thresholds", ())),
            skip_positions=d["skip_positions"],
            lead_positions=d["lead_positions"],
            n_examples=d["n_examples"],
            n_profiled_examples=d["n_profiled_examples"],
            n_tokens=d["n_tokens"],
            n_batches=d["n_batches"],
            max_tokens=d.get("max_tokens", 0),
            answer_only=d.get("answer_only", False),
            warnings=list(d.get("warnings", [])),
            fine=FineSpec.from_dict(d["fine"]) if d.get("fine") else None,
        )


# --------------------------------------------------------------------- helpers


def example_text(example: Any) -> str:
    """`Example.as_text()`, or the string itself."""
    return example if isinstance(example, str) else example.as_text()


Reduction = tuple[int, str, np.ndarray, np.ndarray, np.ndarray | None, list[int] | None, torch.Tensor | None, int]


class _Collector:
    """Hook callback: reduces each captured tensor on the device for the current batch.

    Keeps each hook's fine-window starts (placed on the device from the hook's first completed
    batch with counted tokens; a batch that fails, e.g. out of memory, places none, so a retried
    run equals one started at the smaller size) and, for a second pass, each hook's own exact
    thresholds."""

    def __init__(self, thresholds: dict[tuple[int, str], tuple[float, ...]] | None = None) -> None:
        self.plan: BatchPlan | None = None
        self.shape: tuple[int, int] = (0, 0)
        self.pending: list[tuple[int, str, Reduced, int]] = []
        self.starts: dict[tuple[int, str], torch.Tensor] = {}
        self.placed: dict[tuple[int, str], torch.Tensor] = {}  # starts placed by the current batch
        self.thresholds = thresholds or {}

    def begin(self, plan: BatchPlan, batch: int, positions: int) -> None:
        self.plan = plan
        self.shape = (batch, positions)
        self.pending = []
        self.placed = {}

    def __call__(self, position: int, site: str, tensor: torch.Tensor) -> None:
        plan = self.plan
        if plan is None:
            return
        b, p = self.shape
        x = tensor
        if x.dim() >= 3 and x.shape[0] == b and x.shape[1] == p:
            x = x.reshape(b, p, -1)
        elif x.numel() % (b * p) == 0 and x.dim() == 2 and x.shape[0] == b * p:
            x = x.reshape(b, p, -1)
        else:
            raise RuntimeError(
                f"cannot read capture site {site!r} of shape {tuple(x.shape)} as [{b}, {p}, width]"
            )
        if x.device != plan.weights.device:
            x = x.to(plan.weights.device)
        key = (position, site)
        red = reduce_activations(x, plan, starts=self.starts.get(key), thresholds=self.thresholds.get(key))
        if red.starts is not None and key not in self.starts and plan.main_tokens > 0:
            self.placed[key] = red.starts
        self.pending.append((position, site, red, x.shape[-1]))

    def finish(self) -> list[Reduction]:
        """Host copies of this batch's reductions: one device-to-host transfer for all hooks
        (float64 sums, int64 histograms and window starts, each stacked over the hooks)."""
        pending, self.pending, self.plan = self.pending, [], None
        self.starts.update(self.placed)  # the batch completed: its window placements hold
        self.placed = {}
        if not pending:
            return []
        vec = torch.stack([p[2].vec for p in pending])
        ints = [torch.stack([p[2].hist for p in pending]).to(torch.int64)]
        has_fine = pending[0][2].fine is not None
        if has_fine:
            ints.append(torch.stack([p[2].fine.flatten() for p in pending]))  # type: ignore[union-attr]
            ints.append(torch.stack([p[2].starts for p in pending]))  # type: ignore[misc]
        vec_h = vec.cpu().numpy()
        ints_h = torch.cat(ints, dim=1).cpu().numpy()
        n_hist = pending[0][2].hist.numel()
        n_fine = pending[0][2].fine.numel() if has_fine else 0  # type: ignore[union-attr]
        out: list[Reduction] = []
        for k, (pos, site, red, width) in enumerate(pending):
            row = ints_h[k]
            fine = row[n_hist : n_hist + n_fine] if has_fine else None
            starts = row[n_hist + n_fine :].tolist() if has_fine else None
            out.append((pos, site, vec_h[k], row[:n_hist], fine, starts, red.pooled, width))
        return out


# --------------------------------------------------------------------- profile


def profile(
    loaded: LoadedModel,
    examples: Sequence[Any],
    options: ProfileOptions,
    ctx: JobContext,
    *,
    max_tokens: int,
    token_start: Sequence[int] | None = None,
    collect_pooled: bool = False,
    thresholds: Sequence[float] = (),
    relative: Sequence[tuple[float, str]] = ((0.01, "rms"),),
    hook_thresholds: Mapping[tuple[int, str], Sequence[float]] | None = None,
) -> Profile:
    """Profile `options.sites` of every block of `loaded` on `examples`.

    loaded: a `LoadedModel` (model, tokenizer, adapter, device, ...).
    examples: `worker.datasets.Example`s (their `.as_text()`) or strings.
    options: `app.schemas.ProfileOptions` (sites, batch_size, histogram_bins, skip_positions).
    token_start: per example, the first token position counted (e.g. where the answer
      starts in prompt + answer); None counts every position from skip_positions on.
    collect_pooled: also keep each example's mean-pooled vector per layer and site
      (`Profile.pooled`), e.g. for hallucination probes.
    thresholds: absolute |a| thresholds counted exactly (e.g. AvssOptions.sparsity_eps);
      any other threshold is read from the histogram, with a bound on its error.
    relative: the relative thresholds that will be read, as (factor, "rms" | "median"):
      each gets fine |a| windows (`fine_spec`) placed from every hook's first batch, so
      its sparsity is read within a small stated bound (`RunningStats.sparsity_bounded`).
    hook_thresholds: per (block position, site), thresholds counted exactly for that hook
      only (the second pass of `exact_sparsity`); every hook must give as many.
    Progress: ctx.progress("profile", rows done, rows in all); ctx.check_cancelled()
    runs before every batch.
    """
    model = loaded.model
    tokenizer = loaded.tokenizer
    blocks = list(loaded.adapter.blocks(model))
    sites = list(options.sites)
    spec = HistogramSpec.from_bins(int(options.histogram_bins))
    thresholds = tuple(sorted({float(t) for t in thresholds}))
    fine = fine_spec(relative)
    per_hook = {k: tuple(float(t) for t in v) for k, v in (hook_thresholds or {}).items()}
    skip = int(options.skip_positions)
    lead_positions = skip if skip > 0 else 1
    n_examples = len(examples)
    _check_inputs(blocks, sites, per_hook, token_start, n_examples)
    result = _new_profile(blocks, sites, spec, thresholds, per_hook, fine, skip, lead_positions, n_examples,
                          max_tokens, answer_only=token_start is not None)

    lengths = _lengths(tokenizer, examples, max_tokens)
    batcher = AutoBatch(STAGE, model, int(options.batch_size))  # OOM back-off, see worker/lm/batching.py
    batches = length_batches(lengths, batcher.size)
    if collect_pooled:
        result.pooled_tokens = np.zeros(n_examples, dtype=np.int64)

    device = model_device(model)
    # MPS has no float64: reduce there on the CPU (one copy per hook), exact but slower.
    stats_device = torch.device("cpu") if device.type == "mps" else device
    collector = _Collector({k: thresholds + v for k, v in per_hook.items()})
    order = [i for batch in batches for i in batch]
    ctx.progress(STAGE, 0, len(order))  # rows, as AutoBatch.progress counts them
    one = _BatchRun(
        tokenizer=tokenizer, examples=examples, token_start=token_start, max_tokens=max_tokens,
        pad=pad_id(tokenizer), forward=forward_callable(model, blocks), device=device, collector=collector, ctx=ctx,
        plan_options={"spec": spec, "thresholds": thresholds, "skip_positions": skip,
                      "lead_positions": lead_positions, "device": stats_device, "want_pooled": collect_pooled,
                      "fine": fine},
    )

    _run_pass(result, one, batcher, order, blocks, sites, model)
    _check_coverage(result)
    if batcher.warning():
        result.warnings.append(str(batcher.warning()))
    return result


@dataclass
class _BatchRun:
    """One batch of a pass: encode it, plan what is counted, forward it with the hooks on. Nothing
    is merged until the forward completed, so an out-of-memory retry counts nothing twice."""

    tokenizer: Any
    examples: Sequence[Any]
    token_start: Sequence[int] | None
    max_tokens: int | None
    pad: int
    forward: Callable[[torch.Tensor, torch.Tensor], Any]
    device: torch.device
    collector: _Collector
    ctx: JobContext
    plan_options: dict[str, Any]

    def run(self, batch: list[int]) -> tuple[list[Reduction], BatchPlan]:
        self.ctx.check_cancelled()
        ids = encode_texts(self.tokenizer, [example_text(self.examples[i]) for i in batch], self.max_tokens)
        input_ids, mask = pad_batch(ids, self.pad)
        starts = None if self.token_start is None else [max(0, int(self.token_start[i])) for i in batch]
        plan = BatchPlan.build([len(x) for x in ids], input_ids.shape[1], starts=starts, **self.plan_options)
        self.collector.begin(plan, len(batch), input_ids.shape[1])
        try:
            self.forward(input_ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True))
            return self.collector.finish(), plan
        except BaseException:
            self.collector.pending, self.collector.plan = [], None  # free the failed batch's reductions
            raise


def _run_pass(
    result: Profile, one: _BatchRun, batcher: AutoBatch, order: list[int], blocks: Sequence[Any],
    sites: Sequence[str], model: torch.nn.Module,
) -> None:
    """Every batch through the hooks, in eval mode (restored after), merged as each completes."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), capture(blocks, sites, one.collector):
            for batch, (reduced, plan) in batcher.run(order, one.run):
                _merge_batch(result, reduced, plan, batch)
                result.n_batches += 1
                result.n_tokens += plan.main_tokens
                result.n_profiled_examples += plan.examples
                one.ctx.progress(STAGE, *batcher.progress)
    finally:
        one.collector.plan = None
        if was_training:
            model.train()


def _check_inputs(
    blocks: Sequence[Any], sites: Sequence[str], per_hook: Mapping[tuple[int, str], tuple[float, ...]],
    token_start: Sequence[int] | None, n_examples: int,
) -> None:
    """Arguments that fit together, and every block offering every requested capture site (a
    typed error names the missing ones)."""
    if len({len(v) for v in per_hook.values()}) > 1:
        raise ValueError("hook_thresholds must give every hook as many thresholds")
    if token_start is not None and len(token_start) != n_examples:
        raise ValueError(f"token_start has {len(token_start)} entries for {n_examples} examples")
    if not blocks:
        raise JobFailed(
            "model_unsupported", "the architecture adapter found no transformer blocks in this model"
        )
    for block in blocks:
        absent = [s for s in sites if s not in block.sites]
        if absent:
            raise JobFailed(
                "site_unavailable",
                f"capture site(s) {absent} are not available for block {block.name!r} of this architecture "
                f"(available: {sorted(block.sites)}); choose profile.sites among those.",
            )


def _new_profile(
    blocks: Sequence[Any], sites: Sequence[str], spec: HistogramSpec, thresholds: tuple[float, ...],
    per_hook: Mapping[tuple[int, str], tuple[float, ...]], fine: FineSpec | None, skip: int, lead_positions: int,
    n_examples: int, max_tokens: int, *, answer_only: bool,
) -> Profile:
    """An empty profile: one RunningStats per (block, site) for the counted tokens and one for the
    view with the leading positions toggled."""

    def hooks() -> dict[tuple[int, str], RunningStats]:
        return {
            (i, s): RunningStats(spec, thresholds + per_hook.get((i, s), ()), fine=fine)
            for i in range(len(blocks))
            for s in sites
        }

    return Profile(
        block_names=[b.name for b in blocks],
        layer_indices=[int(b.index) for b in blocks],
        sites=[str(s) for s in sites],
        stats=hooks(),
        lead=hooks(),
        spec=spec,
        thresholds=thresholds,
        fine=fine,
        skip_positions=skip,
        lead_positions=lead_positions,
        n_examples=n_examples,
        max_tokens=max_tokens,
        answer_only=answer_only,
    )


def _lengths(tokenizer: Any, examples: Sequence[Any], max_tokens: int | None) -> list[int]:
    """Pass 1: token counts only (ids are re-encoded per batch, so nothing per-token is kept)."""
    lengths: list[int] = []
    for i in range(0, len(examples), 256):
        chunk = [example_text(e) for e in examples[i : i + 256]]
        lengths.extend(len(ids) for ids in encode_texts(tokenizer, chunk, max_tokens))
    return lengths


def count_exactly(
    prof: Profile,
    wanted: dict[tuple[int, str], list[float]],
    loaded: LoadedModel,
    examples: Sequence[Any],
    options: ProfileOptions,
    ctx: JobContext,
    **kwargs: Any,
) -> Profile:
    """The exact two-pass count: run `profile` again over the same examples (same kwargs)
    counting, per hook, the thresholds `wanted` (read off `prof`, e.g. 0.01 x its RMS) by
    comparison, and record the counts in `prof`'s main and leading-position statistics
    (`RunningStats.add_exact`), where reading those thresholds is then exact. About twice
    the cost of one pass. Returns `prof`."""
    width = max((len(v) for v in wanted.values()), default=0)
    if width == 0:
        return prof
    per_hook = {k: (list(v) + [0.0] * width)[:width] for k, v in wanted.items()}
    again = profile(loaded, examples, options, ctx, hook_thresholds=per_hook, **kwargs)
    n_global = len(prof.thresholds)
    for key, ts in wanted.items():
        for j, t in enumerate(ts):
            prof.stats[key].add_exact(t, int(again.stats[key].below[n_global + j]))
            prof.lead[key].add_exact(t, int(again.lead[key].below[n_global + j]))
    return prof


def fine_spec(relative: Sequence[tuple[float, str]]) -> FineSpec | None:
    """The fine window for relative thresholds (factor, reference): anchored at factor x RMS
    of the counted tokens and of the alternative view (leading positions toggled), or at
    factor x the median |a| (which itself is read off the coarse histogram); None when
    there are none."""
    anchors: list[tuple[str, float]] = []
    for factor, reference in relative:
        if reference == "rms":
            wanted = [("rms", float(factor)), ("rms_alt", float(factor))]
        elif reference == "median":
            wanted = [("median", float(factor))]
        else:
            raise ValueError(f"unknown relative-threshold reference {reference!r}")
        anchors.extend(a for a in wanted if a not in anchors)
    return FineSpec(anchors=tuple(anchors)) if anchors else None


def _merge_batch(
    result: Profile,
    reduced: list[Reduction],
    plan: BatchPlan,
    batch: Sequence[int],
) -> None:
    pooled_by_site: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for position, site, vec, hist, fine, starts, pooled, width in reduced:
        result.stats[(position, site)].absorb(vec, hist, plan, width, column=0, fine=fine, starts=starts)
        result.lead[(position, site)].absorb(vec, hist, plan, width, column=1, fine=fine, starts=starts)
        if pooled is not None:
            pooled_by_site.setdefault(site, []).append((position, pooled))
    if not pooled_by_site:
        return
    assert result.pooled_tokens is not None
    result.pooled_tokens[batch] = plan.example_tokens
    if result.pooled is None:
        result.pooled = {}
    rows = np.asarray(batch)
    for site, items in pooled_by_site.items():
        stacked = torch.stack([t for _, t in items]).cpu().numpy()  # [hooks, B, width]
        store = result.pooled.get(site)
        if store is None:
            store = np.zeros((result.n_examples, result.n_layers, stacked.shape[-1]), dtype=np.float32)
            result.pooled[site] = store
        for k, (position, _) in enumerate(items):
            store[rows, position, :] = stacked[k]


def _check_coverage(result: Profile) -> None:
    if result.n_tokens == 0:
        result.warnings.append(
            "no token was counted (empty examples, or token_start/skip_positions past the end)"
        )
        return
    for site in result.sites:
        missing = [
            result.block_names[i] for i in range(result.n_layers) if result.stats[(i, site)].count == 0
        ]
        if missing:
            result.warnings.append(f"capture site {site!r} never fired for blocks {missing}")


__all__ = ["Profile", "count_exactly", "fine_spec", "profile", "vector_length"]
