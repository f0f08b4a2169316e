"""Layer pruning (docs/method.md section 3; paper section 3.2, appendix D.3 and H).

Removing blocks: `worker.modelzoo.surgery` (`remove_blocks`, `pruned_view`; re-exported here).

Selecting layers (conventions of `worker.scoring.agreement`, the same as the avss
stage: a score is higher = more important; a *ranking* lists the layer indices least
important first, i.e. in pruning order; rank 1 = first pruning candidate)
- `fraction`: drop the floor(p x L) lowest-ranked layers (p = 0.25 by default), i.e.
  the first floor(p x L) of the ranking.
- `cumulative`: scores normalized to sum 1 (shifted by their minimum first if any is
  negative, with a warning); walking the ranking from its first layer, drop layers
  while the cumulative normalized score C_l <= tau (C_l in rank order, eq. 8).
- `iterative` (appendix H, eq. 53-60): take the lowest-ranked remaining candidate,
  remove it, re-evaluate the metric; if the degradation relative to the current
  model exceeds `delta` (absolute, in metric units) or, when `delta` is unset,
  `lam x` the initial metric (eq. 58), restore it and mark it kept. Stop when
  `budget` layers are removed (default floor(p x L)), when the candidates are
  exhausted, or (when `epsilon` is set) when a removal changed the metric by less
  than `epsilon` relative to the model before it (eq. 59; a restored layer leaves
  the model unchanged and is not a convergence step). **(choice)** `epsilon` is
  off by default: taken literally, eq. 59 stops at the first removal that costs
  (almost) nothing, which is exactly when pruning could go on.

Measuring
- parameter reduction (%) = removed parameters / original parameters (each tensor
  counted once, so tied embeddings are not double-counted);
- parameter reduction is exact (a count: its interval is the value itself, N the
  original's parameters);
- speed-up = median time of the original model's forward pass / median time of the
  pruned model's, on the same batch, `runs` timed runs after one warm-up each, in
  the same process: a measured number, noisy on a shared CPU, reported as measured,
  with a 95% bootstrap interval over the runs (`speedup_interval`, N = runs) and
  `speedup_includes_one` (plus a warning) when that interval includes 1.0;
- the random baseline (`random_seeds` seeds, as many random layers as AVSS removed)
  is the MEDIAN over seeds (`median_retained`), with the per-seed range, and each
  scorer's `beats_random_share` is the share of seeds whose retained performance
  it exceeds (Wilson 95% interval, N = seeds);
- retained performance (%) = pruned / original x 100 for higher-is-better metrics,
  original / pruned x 100 for perplexity; its 95% interval is a paired bootstrap
  over the examples (`retained_metric`): the original's and the pruned model's
  per-example values (the task's per-example contract, worker.evaluation.tasks.base)
  are resampled with the same indices and the ratio recomputed on each resample.
"""

from __future__ import annotations

import io
import math
import statistics
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:
    import transformers

from app.schemas import PruneOptions
from worker.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_ci
from worker.evaluation.tasks import TASKS, MetricValue, TaskResult, TaskRun, lm_texts, qa_pairs
from worker.lm.model import is_causal_lm, model_device
from worker.lm.tokens import encode_texts, pad_batch, pad_id
from worker.modelcard import Provenance, write_export_card
from worker.modelzoo import LoadedModel, adapter_for
from worker.modelzoo.adapters import ArchitectureAdapter
from worker.modelzoo.surgery import block_count, pruned_view, remove_blocks
from worker.progress import PhasedProgress
from worker.scoring.agreement import (
    Ranking,
    importance_from_order,
    pairwise_agreement,
    pruning_order,
    ranks_from_order,
)
from worker.scoring.scorers import SCORERS, ScoreTable, random_scores
from worker.stage import ArtifactFile, JobContext, JobFailed, LayerRow, MetricRow, StageResult, finite_or_none

__all__ = [
    "IterativeResult",
    "IterativeStep",
    "block_count",
    "count_parameters",
    "export_pruned_model",
    "measure_speedup",
    "pruning_order",
    "pruned_view",
    "ranks_from_order",
    "remove_blocks",
    "retained_metric",
    "retained_pct",
    "run_prune_stage",
    "PruneOptions",
    "select_cumulative",
    "select_fraction",
    "select_iterative",
]

def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements, each tensor counted once (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def retained_pct(original: float | None, pruned: float | None, higher_is_better: bool) -> float | None:
    """Pruned / original x 100 (original / pruned x 100 when lower is better)."""
    if original is None or pruned is None:
        return None
    num, den = (pruned, original) if higher_is_better else (original, pruned)
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return 100.0 * num / den


def retained_metric(
    original: TaskResult, pruned: TaskResult, metric: str | None = None, *, n_boot: int = 1000, seed: int = 0,
) -> tuple[MetricValue, str | None]:
    """Retained performance (%) of `metric` (default: the primary) with a paired bootstrap
    95% interval over the examples both results share (module doc), and why there is no
    interval when there is none (no per-example values, or the two results are not over
    the same examples). `n` = the examples the original's metric is over."""
    name = metric or original.primary
    orig_mv, pruned_mv = original.metrics[name], pruned.metrics[name]
    hib = orig_mv.higher_is_better
    value = finite_or_none(retained_pct(orig_mv.value, pruned_mv.value, hib))
    out = MetricValue("retained_pct", value, None, None, orig_mv.n, True)
    if value is None and orig_mv.value is not None and pruned_mv.value is not None:
        return out, (f"{original.task}/{name}: retained_pct is undefined (original {orig_mv.value:.4g}, pruned "
                     f"{pruned_mv.value:.4g}: a ratio to 0 or to a value that is not finite)")
    stat = original.statistics.get(name)
    a, b = original.example_values(name), pruned.example_values(name)
    if stat is None or a is None or b is None or stat != pruned.statistics.get(name):
        return out, f"{original.task}/{name} has no per-example values to pair; retained_pct has no interval"
    if a[0].shape != b[0].shape:
        return out, f"{original.task}/{name}: the original and pruned results are over different examples"
    if n_boot == 0 or value is None:
        return out, None

    def ratio(a_blocks: list[np.ndarray], b_blocks: list[np.ndarray]) -> np.ndarray:
        va, vb = stat(*a_blocks), stat(*b_blocks)
        num, den = (vb, va) if hib else (va, vb)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where((den != 0) & np.isfinite(num) & np.isfinite(den), 100.0 * num / den, np.nan)

    ci = paired_bootstrap_ci(ratio, a, b, n_boot=n_boot, seed=seed)
    out.ci_low, out.ci_high = finite_or_none(ci.low), finite_or_none(ci.high)
    return out, None


def median_retained(
    original: TaskResult, seeds: Sequence[TaskResult], metric: str | None = None, *, n_boot: int = 1000,
    seed: int = 0,
) -> tuple[MetricValue, list[float | None]]:
    """The random baseline's retained performance: the median over seeds of each seed's
    retained_pct (a median, so one bad seed does not dominate), with a 95% interval from
    resampling the examples, with the same indices for the original and every seed, and
    taking the median over seeds on each resample (the interval is over the examples,
    given these seeds; the per-seed spread is reported beside it). Also each seed's value."""
    name = metric or original.primary
    per_seed = [retained_metric(original, r, name, n_boot=0)[0].value for r in seeds]
    defined = [v for v in per_seed if v is not None]
    out = MetricValue(
        "retained_pct", median(defined) if defined else None, None, None, original.metrics[name].n, True
    )
    stat = original.statistics.get(name)
    arrays = [original.example_values(name), *(r.example_values(name) for r in seeds)]
    if (
        stat is None or n_boot == 0 or not seeds or out.value is None
        or any(a is None or a[0].shape != arrays[0][0].shape for a in arrays)  # type: ignore[index]
        or any(r.statistics.get(name) != stat for r in seeds)
    ):
        return out, per_seed
    width = len(stat.keys())
    hib = original.metrics[name].higher_is_better

    def fn(*blocks: np.ndarray) -> np.ndarray:
        base = stat(*blocks[:width])
        kept = []
        for i in range(len(seeds)):
            v = stat(*blocks[width * (i + 1): width * (i + 2)])
            num, den = (v, base) if hib else (base, v)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                kept.append(np.where((den != 0) & np.isfinite(num) & np.isfinite(den), 100.0 * num / den, np.nan))
        with warnings.catch_warnings():  # a resample where no seed is defined is NaN (left out)
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.stack(kept, axis=1), axis=1)

    flat = [x for a in arrays for x in a]  # type: ignore[union-attr]
    ci = bootstrap_ci(fn, *flat, n_boot=n_boot, seed=seed, batched=True)
    out.ci_low, out.ci_high = finite_or_none(ci.low), finite_or_none(ci.high)
    return out, per_seed


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score 95% interval of a share `successes / n` (None, None when n = 0)."""
    if n <= 0:
        return None, None
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def export_pruned_model(
    model: torch.nn.Module, tokenizer: Any | None = None, card: Callable[[Path], Any] | None = None
) -> bytes:
    """`save_pretrained` (safetensors) of `model` (and the tokenizer) as .tar.gz bytes; `card(folder)`
    writes the model card into the folder before it is packed (`worker.modelcard.write_model_card`)."""
    with tempfile.TemporaryDirectory(prefix="layerscope-pruned-") as tmp:
        folder = Path(tmp) / "pruned-model"
        cast("transformers.PreTrainedModel", model).save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        if card is not None:
            card(folder)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
            tar.add(str(folder), arcname="pruned-model")
        return buf.getvalue()


# ------------------------------------------------------------------ rankings


def check_order(order: Sequence[int], n_layers: int, name: str = "ranking") -> list[int]:
    out = [int(i) for i in order]
    if sorted(out) != list(range(n_layers)):
        raise JobFailed(
            "prune_invalid",
            f"{name} must list every layer 0..{n_layers - 1} exactly once (least important first); got {out}",
        )
    return out


# ---------------------------------------------------------------- strategies


def select_fraction(order: Sequence[int], fraction: float = 0.25) -> list[int]:
    """The floor(fraction x L) lowest-ranked layers (the first of the ranking), sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    k = math.floor(fraction * len(order) + 1e-9)
    return sorted(int(i) for i in order[:k])


def normalized_scores(scores: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    """Scores shifted to be non-negative (if needed) and divided by their sum."""
    s = np.asarray(scores, dtype=np.float64)
    warnings: list[str] = []
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if s.size and s.min() < 0:
        warnings.append("some scores are negative; cumulative selection used scores shifted by their minimum")
        s = s - s.min()
    total = s.sum()
    if total <= 0:
        warnings.append("scores sum to 0; cumulative selection used uniform shares")
        return np.full(s.size, 1.0 / max(1, s.size)), warnings
    return s / total, warnings


def select_cumulative(scores: Sequence[float], tau: float) -> tuple[list[int], list[float], list[str]]:
    """Drop lowest-ranked layers while the cumulative normalized score C_l <= tau.

    Returns (dropped layers sorted, C_l per layer in layer order, warnings)."""
    norm, warnings = normalized_scores(scores)
    order = pruning_order(list(norm))
    cumulative = [0.0] * len(norm)
    running = 0.0
    drop: list[int] = []
    stopped = False
    for layer in order:  # lowest first
        running += float(norm[layer])
        cumulative[layer] = running
        if not stopped and running <= tau + 1e-12:
            drop.append(layer)
        else:
            stopped = True
    if len(drop) >= len(norm):
        drop = drop[: len(norm) - 1]
        warnings.append("tau would remove every layer; the most important layer was kept")
    return sorted(drop), cumulative, warnings


@dataclass
class IterativeStep:
    layer: int
    metric: float | None
    degradation: float | None
    removed: bool


@dataclass
class IterativeResult:
    dropped: list[int]
    kept_after_trial: list[int]
    initial: float | None
    final: float | None
    tolerance: float
    steps: list[IterativeStep] = field(default_factory=list)
    stop_reason: str = ""


def select_iterative(
    order: Sequence[int],
    evaluate: Callable[[list[int]], float | None],
    *,
    higher_is_better: bool,
    delta: float | None = None,
    lam: float = 0.05,
    budget: int | None = None,
    epsilon: float | None = None,
    initial: float | None = None,
    check: Callable[[], None] | None = None,
) -> IterativeResult:
    """Appendix H: remove the lowest-ranked remaining layer, re-evaluate, restore it if
    the degradation exceeds the tolerance (`delta`, else `lam x` initial). `evaluate(dropped)`
    returns the metric of the model without the layers `dropped`."""
    n = len(order)
    budget = n - 1 if budget is None else max(0, min(int(budget), n - 1))
    base = evaluate([]) if initial is None else initial
    if base is None or not math.isfinite(base):
        raise JobFailed(
            "prune_failed", "the unpruned model's metric is not finite; iterative pruning cannot start"
        )
    tolerance = float(delta) if delta is not None else float(lam) * abs(base)
    result = IterativeResult(dropped=[], kept_after_trial=[], initial=base, final=base, tolerance=tolerance)
    current = base
    if budget == 0:
        result.stop_reason = "budget"
        return result
    for layer in order:
        if check is not None:
            check()
        trial = sorted(result.dropped + [layer])
        value = evaluate(trial)
        if value is None or not math.isfinite(value):
            degradation = math.inf
        else:
            degradation = (current - value) if higher_is_better else (value - current)
        removed = degradation <= tolerance
        result.steps.append(
            IterativeStep(
                layer,
                value if value is not None and math.isfinite(value) else None,
                degradation if math.isfinite(degradation) else None,
                removed,
            )
        )
        previous = current
        if removed:
            result.dropped = trial
            current = float(value)  # type: ignore[arg-type]
        else:
            result.kept_after_trial.append(layer)
        result.final = current
        if len(result.dropped) >= budget:
            result.stop_reason = "budget"
            break
        if removed and epsilon is not None and abs(current - previous) <= epsilon * max(abs(previous), 1e-12):
            result.stop_reason = "converged"
            break
    else:
        result.stop_reason = "exhausted"
    return result


# ------------------------------------------------------------------ measuring


def _time_once(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


def speedup_interval(
    original: Sequence[float], pruned: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> tuple[float | None, float | None]:
    """95% bootstrap interval of median(original) / median(pruned) over the timed runs,
    run i of both resampled together (they were timed back to back); (None, None) under
    3 runs, where a median of a resample says nothing."""
    a, b = np.asarray(original, dtype=np.float64), np.asarray(pruned, dtype=np.float64)
    if a.size < 3 or a.size != b.size or n_boot == 0:
        return None, None

    def ratio(x: list[np.ndarray], y: list[np.ndarray]) -> np.ndarray:
        den = np.median(y[0], axis=1)
        return np.where(den > 0, np.median(x[0], axis=1) / np.where(den > 0, den, 1.0), np.nan)

    ci = paired_bootstrap_ci(ratio, [a], [b], n_boot=n_boot, seed=seed)
    return ci.low, ci.high


def measure_speedup(
    model: torch.nn.Module,
    dropped: Sequence[int],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    runs: int = 5,
    adapter: ArchitectureAdapter | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Median forward time of `model` and of it without `dropped` (via `pruned_view`: blocks
    removed in place and restored), timed alternately (one warm-up each) so drift hits both;
    the speed-up's 95% interval over the runs (`speedup_interval`), and `includes_one` = True
    when that interval (or, without one, fewer than 3 runs) cannot tell it from no change."""
    original: list[float] = []
    pruned: list[float] = []
    with torch.inference_mode():
        _time_once(model, ids, mask)
        with pruned_view(model, dropped, adapter=adapter):
            _time_once(model, ids, mask)
        for _ in range(max(1, runs)):
            original.append(_time_once(model, ids, mask))
            with pruned_view(model, dropped, adapter=adapter):
                pruned.append(_time_once(model, ids, mask))
    t_orig, t_pruned = median(original), median(pruned)
    low, high = speedup_interval(original, pruned, n_boot=n_boot, seed=seed)
    return {
        "original_seconds": t_orig,
        "pruned_seconds": t_pruned,
        "speedup": t_orig / t_pruned if t_pruned > 0 else math.nan,
        "ci_low": low,
        "ci_high": high,
        "runs": len(original),
        "includes_one": low is None or high is None or low <= 1.0 <= high,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# -------------------------------------------------------------------- stage


@dataclass
class _Prune:
    """What every step of the prune stage reads."""

    model: torch.nn.Module  # the loaded (shared) model: blocks are removed in place and restored
    tokenizer: Any
    adapter: ArchitectureAdapter
    options: PruneOptions
    ctx: JobContext
    max_tokens: int
    block_names: list[str]
    warnings: list[str] = field(default_factory=list)
    bar: PhasedProgress | None = None  # the stage's one progress bar, once the phases are known
    provenance: Provenance | None = None  # for the exported model's card

    @property
    def n_layers(self) -> int:
        return len(self.block_names)

    @contextmanager
    def phase(self) -> Iterator[None]:
        """One phase of the stage's bar: what runs inside reports under its own name
        (`prune:score:cim`) with the stage's units, so the bar never goes backwards."""
        outer = self.ctx
        if self.bar is not None:
            self.ctx = self.bar.sub_context(PHASE_UNITS, labelled=True)
        try:
            yield
        finally:
            self.ctx = outer

    def evaluate(
        self, task: str, data: Any, *, stage: str = "prune:evaluate", limit: int | None = None,
        n_boot: int | None = None,
    ) -> TaskResult:
        run = TaskRun(
            max_tokens=self.max_tokens, batch_size=self.options.batch_size, ctx=self.ctx,
            progress_stage=f"{stage}:{task}", n_boot=self.options.n_boot if n_boot is None else n_boot,
            seed=self.options.seed, limit=limit,
        )
        return TASKS[task].evaluate(self.model, self.tokenizer, data, self.options, run)


@dataclass
class _Ranked:
    """Every scorer's ranking: computed here (`tables`) or passed in; `importance` per layer
    (higher = more important: the scores, or L - rank when only an order was given)."""

    orders: dict[str, list[int]] = field(default_factory=dict)
    importance: dict[str, list[float]] = field(default_factory=dict)
    given_scores: dict[str, list[float]] = field(default_factory=dict)
    tables: dict[str, ScoreTable] = field(default_factory=dict)


@dataclass
class _Selection:
    dropped_by: dict[str, list[int]]
    details: dict[str, Any]
    random_sets: list[tuple[int, list[int]]]
    k_random: int


@dataclass
class _Measured:
    """The metrics of every distinct pruned model, its parameters and speed-up."""

    n_params: int
    evaluated: dict[tuple[int, ...], dict[str, TaskResult]]
    params_after: dict[tuple[int, ...], int]
    timing: dict[tuple[int, ...], dict[str, Any]]

    def reduction(self, key: tuple[int, ...]) -> float:
        return 100.0 * (self.n_params - self.params_after[key]) / self.n_params if self.n_params else 0.0

    def speedup(self, key: tuple[int, ...]) -> float | None:
        if not key:
            return 1.0
        return finite_or_none(self.timing[key]["speedup"]) if key in self.timing else None

    def speed(self, key: tuple[int, ...]) -> dict[str, Any]:
        """The speed-up with its interval over the timed runs, their number, and whether the
        interval includes 1.0 (no measurable change)."""
        t = self.timing.get(key, {})
        low, high = finite_or_none(t.get("ci_low")), finite_or_none(t.get("ci_high"))
        return {
            "speedup": self.speedup(key),
            "speedup_ci": [low, high],
            "timing_runs": int(runs) if (runs := t.get("runs")) else None,
            "speedup_includes_one": None if not t else bool(t.get("includes_one")),
        }


def run_prune_stage(
    loaded: LoadedModel,
    examples: Sequence[Any],
    options: PruneOptions,
    ctx: JobContext,
    rankings: Mapping[str, Ranking],
    *,
    qa_examples: Sequence[Any] | None = None,
    perplexity_examples: Sequence[Any] | None = None,
    max_tokens: int = 256,
    heal_examples: Sequence[Any] | None = None,
    provenance: Provenance | None = None,
) -> StageResult:
    """The `prune` stage (paper table 1): per task, the original metric and the metric after
    pruning by every scorer, the random-layer baseline, retained performance, parameter
    reduction and measured speed-up; per-layer baseline scores; rank agreement.

    `rankings`: rankings computed by earlier stages (e.g. `{"avss": <the avss stage's
    Ranking>}`), pruned lowest first; their per-layer `scores` (higher = more important,
    e.g. nAVSS) are what the `cumulative` strategy reads. `qa_examples`: question/answer
    examples for the QA task (default: the examples that have `question` and `answer`
    fields). `perplexity_examples`: held-out text the perplexity task is measured on
    (default: the examples; the scorers always rank on the examples). No copy of the model is made: candidate prunings are evaluated by removing
    blocks in place (`pruned_view`), restored after each, so the loaded model is unchanged
    when the stage returns (or fails)."""
    model = loaded.model
    adapter = adapter_for(model)
    job = _Prune(model, loaded.tokenizer, adapter, options, ctx, max_tokens, [b.name for b in adapter.blocks(model)],
                 provenance=provenance)
    tasks = _runnable_tasks(job, examples, qa_examples, perplexity_examples)
    job.bar = PhasedProgress(ctx, "prune", PHASE_UNITS * _phases(options, len(tasks)))
    texts = lm_texts(examples, options)
    scoring = texts[: options.scoring_examples]
    ranked = _rankings(job, rankings, scoring)
    original = {}
    for task, data in tasks.items():
        with job.phase():
            original[task] = job.evaluate(task, data, stage="prune:original")
    selection = _select(job, ranked, tasks, original)
    timing_texts = texts or [options.qa_prompt.format(question=q) for q in qa_pairs(examples, qa_examples, options).questions]
    measured = _measure(job, tasks, selection, timing_texts)
    curve_plan = _curve_plan(job, ranked, selection) if options.curve_blocks else None
    if curve_plan is not None:
        _evaluate_curve(job, tasks, curve_plan, measured)
    metrics, table = _task_tables(job, original, selection, measured)
    metrics.extend(_scorer_metrics(job, ranked, selection, measured))
    healing = None
    if options.heal is not None:  # LoRA healing of every pruned model (worker.pruning_heal; imports peft)
        from worker.pruning_heal import heal_pruned_models

        healing = heal_pruned_models(
            job, tasks, original, selection, measured, table, heal_examples, examples, qa_examples,
            perplexity_examples=perplexity_examples,
        )
        metrics.extend(healing.metrics)
    job.bar.finish()
    summary: dict[str, Any] = {
        "strategy": options.strategy,
        "options": options.model_dump(),
        "n_layers": job.n_layers,
        "original_parameters": measured.n_params,
        "tasks": list(tasks),
        "table": table,
        "layers_removed": selection.dropped_by,
        "random_baseline": {
            "seeds": [s for s, _ in selection.random_sets],
            "layers_removed_count": selection.k_random,
            "layers_removed": {str(s): d for s, d in selection.random_sets},
            "note": "each seed removes as many random layers as AVSS did (floor(fraction x L) without AVSS); "
            "reported as the median over seeds",
        },
        "agreement": pairwise_agreement({name: ranked.importance[name] for name in ranked.orders}),
        "scoring_seconds": {name: t.seconds for name, t in ranked.tables.items()},
        "scoring_examples": len(scoring),
        "selection": selection.details,
        "choices": _choices(options),
    }
    if healing is not None:
        summary["healing"] = healing.summary
    if measured.timing:
        summary["timing"] = {",".join(map(str, k)): v for k, v in measured.timing.items()}
    artifacts = _export(job, selection, measured, ranked, metrics) + (healing.artifacts if healing else [])
    if curve_plan is not None:
        curve_metrics, summary["curve"] = _tradeoff_curve(job, curve_plan, selection, original, measured)
        metrics.extend(curve_metrics)
        artifacts.extend(_curve_figure(job, summary["curve"]))
    layer_rows = _layer_rows(job, ranked, selection)
    artifacts.extend(_stage_figure(job, metrics, layer_rows, summary))
    return StageResult(
        stage="prune", layers=layer_rows, metrics=metrics,
        artifacts=artifacts, summary=summary, warnings=job.warnings,
    )


def _choices(options: PruneOptions) -> dict[str, Any]:
    return {
        "ranking": "higher score = more important; ties: lower layer index first",
        "angular_distance_positions": options.angular_positions,
        **{name: s.description for name, s in SCORERS.items()},
        "retained_pct": "pruned / original x 100; original / pruned x 100 for perplexity",
        "speedup": "median original / median pruned forward time on one batch, timed alternately; measured, "
        "95% bootstrap interval over the runs",
        "retained_pct_interval": "paired bootstrap over the examples (original and pruned resampled together)",
        "parameter_reduction_pct": "exact (a parameter count)",
        "random_baseline": "median over seeds; interval over the examples given these seeds; per-seed range beside it",
        "scoring_data": "the baselines score on the first scoring_examples texts of the evaluated set",
    }


def _runnable_tasks(
    job: _Prune, examples: Sequence[Any], qa_examples: Sequence[Any] | None,
    perplexity_examples: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Each asked-for task's data; a task that cannot run here is skipped with a warning.
    The perplexity task reads `perplexity_examples` (held-out text) when given."""
    tasks: dict[str, Any] = {}
    for name in job.options.tasks:
        own = perplexity_examples if name == "perplexity" and perplexity_examples is not None else examples
        data = TASKS[name].prepare(job.model, own, qa_examples, job.options)
        if isinstance(data, str):
            job.warnings.append(f"{name} skipped: {data}")
        else:
            tasks[name] = data
    if not tasks:
        raise JobFailed(
            "prune_no_task",
            "no task can be evaluated for pruning with this model and data: " + "; ".join(job.warnings),
        )
    return tasks


def _rankings(job: _Prune, given: Mapping[str, Ranking], texts: Sequence[str]) -> _Ranked:
    """The rankings of the asked-for scorers: computed here, or passed in by an earlier stage."""
    ranked = _Ranked()
    for name in job.options.scorers:
        job.ctx.check_cancelled()
        scorer = SCORERS[name]
        if scorer.from_stage is None:
            if scorer.needs_causal_lm and not is_causal_lm(job.model):
                job.warnings.append(f"scorer {name} skipped: it needs a causal LM (the LM loss is its task loss)")
                continue
            if not texts:
                job.warnings.append(f"scorer {name} skipped: no text to score layers on")
                continue
            with job.phase():
                table = scorer.score(
                    job.model, job.tokenizer, texts, adapter=job.adapter, max_tokens=job.max_tokens, ctx=job.ctx,
                    progress_stage=f"prune:score:{name}", batch_size=scorer.batch_size(job.options.batch_size),
                    **scorer.options(job.options),
                )
            job.warnings.extend(table.warnings)
            ranked.tables[name] = table
            ranked.orders[name] = table.order()
            ranked.importance[name] = list(table.scores)
            continue
        if name not in given:
            job.warnings.append(f"scorer {name} skipped: no {name} ranking was passed to the prune stage")
            continue
        ranked.orders[name] = check_order(given[name].lowest_first(), job.n_layers, f"the {name} ranking")
        scores = given[name].scores
        if scores is not None and len(scores) != job.n_layers:
            raise JobFailed("prune_invalid", f"{name} scores have {len(scores)} values for {job.n_layers} layers")
        if scores is not None:
            ranked.given_scores[name] = [float(v) for v in scores]
        ranked.importance[name] = (
            list(ranked.given_scores[name]) if scores is not None else importance_from_order(ranked.orders[name])
        )
    if not ranked.orders:
        raise JobFailed("prune_no_scorer", "no scorer produced a ranking: " + "; ".join(job.warnings))
    return ranked


def _select(
    job: _Prune, ranked: _Ranked, tasks: Mapping[str, Any], original: Mapping[str, TaskResult]
) -> _Selection:
    """The layers each scorer's ranking drops under the strategy, and the random baseline."""
    options = job.options
    dropped_by: dict[str, list[int]] = {}
    details: dict[str, Any] = {}
    default_budget = math.floor(options.fraction * job.n_layers + 1e-9)
    metric = _selection_metric(job, next(iter(tasks)), tasks[next(iter(tasks))])
    for name, order in ranked.orders.items():
        if options.strategy == "fraction":
            dropped_by[name] = select_fraction(order, options.fraction)
        elif options.strategy == "cumulative":
            if name not in ranked.tables and name not in ranked.given_scores:
                job.warnings.append(
                    f"cumulative selection for {name} used L - rank as scores: no {name} scores were passed"
                )
            dropped, cumulative, warns = select_cumulative(ranked.importance[name], options.tau)
            job.warnings.extend(f"{name}: {w}" for w in warns)
            dropped_by[name] = dropped
            details[name] = {"cumulative": cumulative}
        else:
            task = next(iter(tasks))
            with job.phase():
                res = select_iterative(
                    order, metric, higher_is_better=original[task].higher_is_better, delta=options.delta,
                    lam=options.lam, budget=options.budget if options.budget is not None else max(1, default_budget),
                    epsilon=options.epsilon, check=job.ctx.check_cancelled,
                )
            dropped_by[name] = res.dropped
            details[name] = {
                "metric": f"{task} on the first {options.scoring_examples} examples",
                "initial": res.initial,
                "final": res.final,
                "tolerance": res.tolerance,
                "stop_reason": res.stop_reason,
                "restored": res.kept_after_trial,
                "steps": [vars(s) for s in res.steps],
            }
    # The random-layer baseline: as many layers as AVSS removed (else floor(fraction x L)).
    k_random = len(dropped_by["avss"]) if "avss" in dropped_by else default_budget
    random_sets = [
        (seed, sorted(random_scores(job.n_layers, seed).order()[:k_random]))
        for seed in range(options.seed, options.seed + options.random_seeds)
    ]
    return _Selection(dropped_by, details, random_sets, k_random)


def _selection_metric(job: _Prune, task: str, data: Any) -> Callable[[list[int]], float | None]:
    """The iterative strategy's metric of the model without `dropped` (the first task on the
    first scoring_examples examples, no bootstrap), each pruning evaluated once."""
    cache: dict[tuple[int, ...], float | None] = {}

    def metric(dropped: list[int]) -> float | None:
        key = tuple(sorted(dropped))
        if key not in cache:
            with pruned_view(job.model, key, adapter=job.adapter):
                res = job.evaluate(task, data, stage="prune:iterative", limit=job.options.scoring_examples, n_boot=0)
            cache[key] = res.value
        return cache[key]

    return metric


PHASE_UNITS = 20  # progress units per phase of the prune stage


def _phases(options: PruneOptions, n_tasks: int) -> int:
    """The prune stage's phases, in order: each scorer computed here, each task on the original
    model, each scorer's iterative selection, each task on every distinct pruned model (at most
    one per scorer and random seed; fewer when prunings coincide, and the bar then jumps), and
    with `heal` the healing of each pruned model and each task on it again."""
    computed = sum(1 for name in options.scorers if SCORERS[name].from_stage is None)
    iterative = len(options.scorers) if options.strategy == "iterative" else 0
    models = len(options.scorers) + options.random_seeds
    healed = 0  # healing (worker.pruning_heal): per healed model, its training and each task again
    if options.heal is not None:
        seeds = options.random_seeds if options.heal.random_seeds is None else min(options.heal.random_seeds,
                                                                                    options.random_seeds)
        healed = (len(options.scorers) + seeds) * (1 + n_tasks)
    curve = len(options.curve_blocks) * models  # at most; fewer when a curve pruning was already evaluated
    return computed + n_tasks + iterative + (models + curve) * n_tasks + healed


def _measure(job: _Prune, tasks: Mapping[str, Any], selection: _Selection, timing_texts: Sequence[str]) -> _Measured:
    """Evaluate every distinct pruned model once (blocks removed in place, restored after)."""
    distinct = {tuple(d) for d in selection.dropped_by.values()} | {tuple(d) for _, d in selection.random_sets}
    measured = _Measured(count_parameters(job.model), {}, {}, {})
    batch = _timing_batch(job, timing_texts) if job.options.timing_runs else None
    for i, key in enumerate(sorted(distinct)):
        job.ctx.check_cancelled()
        with pruned_view(job.model, key, adapter=job.adapter):
            measured.params_after[key] = count_parameters(job.model)
            measured.evaluated[key] = {}
            for task, data in tasks.items():
                with job.phase():
                    measured.evaluated[key][task] = job.evaluate(task, data, stage=f"prune:pruned {i + 1}/{len(distinct)}")
        if batch is not None and key:
            measured.timing[key] = measure_speedup(
                job.model, key, *batch, runs=job.options.timing_runs, adapter=job.adapter,
                n_boot=job.options.n_boot, seed=job.options.seed,
            )
    return measured


def _timing_batch(job: _Prune, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    encoded = [e for e in encode_texts(job.tokenizer, texts[: job.options.timing_batch_size], job.max_tokens) if e]
    if not encoded:
        return None
    ids, mask = pad_batch(encoded, pad_id(job.tokenizer))
    device = model_device(job.model)
    return ids.to(device), mask.to(device)


def _metric_rows(scope: str, res: TaskResult) -> list[MetricRow]:
    return [MetricRow(scope, name, mv.value, mv.ci_low, mv.ci_high, mv.n) for name, mv in res.metrics.items()]


def _scorer_row(
    job: _Prune, task: str, name: str, dropped: list[int], orig: TaskResult, measured: _Measured,
    metrics: list[MetricRow], random_kept: Sequence[float | None],
) -> dict[str, Any]:
    key = tuple(dropped)
    res = measured.evaluated[key][task]
    scope = f"task={task},scorer={name}"
    row: dict[str, Any] = {"scorer": name, "layers_removed": list(dropped)}
    for mname, mv in res.metrics.items():
        metrics.append(MetricRow(scope, mname, mv.value, mv.ci_low, mv.ci_high, mv.n))
        kept, why = retained_metric(orig, res, mname, n_boot=job.options.n_boot, seed=job.options.seed)
        if why is not None and why not in job.warnings:
            job.warnings.append(why)
        suffix = "" if mname == res.primary else f"_{mname}"
        metrics.append(MetricRow(scope, f"retained_pct{suffix}", kept.value, kept.ci_low, kept.ci_high, kept.n))
        row[mname] = mv.value
        row[f"{mname}_ci"] = [mv.ci_low, mv.ci_high]
        row[f"retained_pct{suffix}"] = kept.value
        row[f"retained_pct{suffix}_ci"] = [kept.ci_low, kept.ci_high]
    beaten = [v for v in random_kept if v is not None]
    if beaten and row.get("retained_pct") is not None:
        wins = sum(1 for v in beaten if row["retained_pct"] > v)
        low, high = wilson_interval(wins, len(beaten))
        metrics.append(MetricRow(scope, "beats_random_share", wins / len(beaten), low, high, len(beaten)))
        row["beats_random_share"] = wins / len(beaten)
        row["beats_random_share_ci"] = [low, high]
    row["parameter_reduction_pct"] = measured.reduction(key)
    row.update(measured.speed(key))
    return row


def _random_row(
    job: _Prune, task: str, orig: TaskResult, selection: _Selection, measured: _Measured,
    metrics: list[MetricRow],
) -> tuple[dict[str, Any], list[float | None]]:
    """The random baseline: per seed its metrics and retained_pct; over seeds the median
    (with the per-seed spread) and the median retained_pct with its interval. Returns the
    row and each seed's primary retained_pct (what `beats_random_share` counts)."""
    results = [(seed, measured.evaluated[tuple(dropped)][task]) for seed, dropped in selection.random_sets]
    options = job.options
    row: dict[str, Any] = {
        "scorer": "random", "seeds": [s for s, _ in selection.random_sets],
        "layers_removed_count": selection.k_random,
    }
    scope = f"task={task},scorer=random"
    primary_kept: list[float | None] = []
    for mname in orig.metrics:
        suffix = "" if mname == orig.primary else f"_{mname}"
        for seed, res in results:
            seed_scope = f"{scope},seed={seed}"
            mv = res.metrics[mname]
            metrics.append(MetricRow(seed_scope, mname, mv.value, mv.ci_low, mv.ci_high, mv.n))
            kept_s, _ = retained_metric(orig, res, mname, n_boot=options.n_boot, seed=options.seed)
            metrics.append(
                MetricRow(seed_scope, f"retained_pct{suffix}", kept_s.value, kept_s.ci_low, kept_s.ci_high, kept_s.n)
            )
        values = [v for v in (res.metrics[mname].value for _, res in results) if v is not None]
        kept, per_seed = median_retained(orig, [r for _, r in results], mname, n_boot=options.n_boot, seed=options.seed)
        if mname == orig.primary:
            primary_kept = per_seed
        mid = median(values) if values else None
        lo, hi = (min(values), max(values)) if values else (None, None)
        metrics.append(MetricRow(scope, mname, finite_or_none(mid), n=len(values)))
        metrics.append(MetricRow(scope, f"{mname}_seed_min", finite_or_none(lo), n=len(values)))
        metrics.append(MetricRow(scope, f"{mname}_seed_max", finite_or_none(hi), n=len(values)))
        metrics.append(MetricRow(scope, f"retained_pct{suffix}", kept.value, kept.ci_low, kept.ci_high, kept.n))
        kept_defined = [v for v in per_seed if v is not None]
        if kept_defined:
            metrics.append(MetricRow(scope, f"retained_pct{suffix}_seed_min", min(kept_defined), n=len(kept_defined)))
            metrics.append(MetricRow(scope, f"retained_pct{suffix}_seed_max", max(kept_defined), n=len(kept_defined)))
        row[mname] = finite_or_none(mid)
        row[f"{mname}_seed_range"] = [finite_or_none(lo), finite_or_none(hi)]
        row[f"{mname}_per_seed"] = values
        row[f"retained_pct{suffix}"] = kept.value
        row[f"retained_pct{suffix}_ci"] = [kept.ci_low, kept.ci_high]
        row[f"retained_pct{suffix}_per_seed"] = per_seed
    keys = [tuple(d) for _, d in selection.random_sets]
    row["parameter_reduction_pct"] = median([measured.reduction(k) for k in keys])
    sp = [v for v in (measured.speedup(k) for k in keys) if v is not None]
    row["speedup"] = median(sp) if sp else None
    row["speedup_seed_range"] = [min(sp), max(sp)] if sp else [None, None]
    row["speedup_per_seed"] = sp
    return row, primary_kept


def _task_tables(
    job: _Prune, original: Mapping[str, TaskResult], selection: _Selection, measured: _Measured
) -> tuple[list[MetricRow], list[dict[str, Any]]]:
    """Per task: the original metrics, a row per scorer and the random baseline's row."""
    metrics: list[MetricRow] = []
    table: list[dict[str, Any]] = []
    for task, orig in original.items():
        metrics.extend(_metric_rows(f"task={task},scorer=original", orig))
        random_row, random_kept = (
            _random_row(job, task, orig, selection, measured, metrics) if selection.random_sets else (None, [])
        )
        rows = [
            _scorer_row(job, task, name, dropped, orig, measured, metrics, random_kept)
            for name, dropped in selection.dropped_by.items()
        ]
        if random_row is not None:
            rows.append(random_row)
        primary = orig.metrics[orig.primary]
        entry = {
            "task": task,
            "metric": orig.primary,
            "higher_is_better": orig.higher_is_better,
            "original": orig.value,
            "original_ci": [primary.ci_low, primary.ci_high],
            "n": primary.n,
            "rows": rows,
            "details": orig.details,
        }
        _compare_avss(job, task, orig, rows, entry)
        table.append(entry)
    return metrics, table


def _compare_avss(job: _Prune, task: str, orig: TaskResult, rows: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """Does AVSS lose to a baseline here? (`avss_beaten_by`, and a warning when it does)."""
    avss_row = next((r for r in rows if r["scorer"] == "avss"), None)
    if avss_row is None or avss_row.get(orig.primary) is None:
        return
    a, hib, primary = avss_row[orig.primary], orig.higher_is_better, orig.primary
    better = [
        r["scorer"] for r in rows
        if r["scorer"] != "avss" and r.get(primary) is not None and ((r[primary] > a) if hib else (r[primary] < a))
    ]
    entry["avss_beaten_by"] = better
    if better:
        best = max if hib else min
        b_row = best((r for r in rows if r["scorer"] in better), key=lambda r: r[primary])
        job.warnings.append(
            f"AVSS loses on {task}: pruned by AVSS the {primary} is {_fmt(a)}, worse than with "
            f"{', '.join(better)} (best: {b_row['scorer']} {_fmt(b_row[primary])}; original {_fmt(orig.value)})"
        )


def _scorer_metrics(job: _Prune, ranked: _Ranked, selection: _Selection, measured: _Measured) -> list[MetricRow]:
    """Per scorer (and the random baseline): layers removed, parameter reduction (exact: a
    count, its interval is the value itself, n = the original's parameters), the speed-up
    with its interval over the timed runs (n = runs) and whether that interval includes 1.0."""
    metrics: list[MetricRow] = []

    def speed_rows(scope: str, key: tuple[int, ...]) -> None:
        reduction = finite_or_none(measured.reduction(key))
        metrics.append(MetricRow(scope, "parameter_reduction_pct", reduction, reduction, reduction, measured.n_params))
        sp = measured.speed(key)
        low, high = sp["speedup_ci"]
        metrics.append(MetricRow(scope, "speedup", sp["speedup"], low, high, sp["timing_runs"]))
        if sp["speedup_includes_one"] is not None:
            metrics.append(MetricRow(scope, "speedup_includes_one", float(sp["speedup_includes_one"])))

    for name, dropped in selection.dropped_by.items():
        scope, key = f"scorer={name}", tuple(dropped)
        metrics.append(MetricRow(scope, "layers_removed", float(len(dropped))))
        speed_rows(scope, key)
        if measured.speed(key)["speedup_includes_one"]:
            job.warnings.append(
                f"speed-up of {name} ({_fmt(measured.speedup(key))}) is not distinguishable from 1.0: its 95% "
                f"interval over {measured.speed(key)['timing_runs']} timed runs includes 1.0"
            )
        if name in ranked.tables:
            metrics.append(MetricRow(scope, "scoring_seconds", finite_or_none(ranked.tables[name].seconds)))
    for seed, dropped in selection.random_sets:
        speed_rows(f"scorer=random,seed={seed}", tuple(dropped))
    return metrics


def _layer_rows(job: _Prune, ranked: _Ranked, selection: _Selection) -> list[LayerRow]:
    """Per scorer and layer: its score or rank, whether it is pruned, the cumulative share."""
    layers: list[LayerRow] = []
    for name, dropped in selection.dropped_by.items():
        drop = set(dropped)
        if name in ranked.tables:
            rows = ranked.tables[name].layer_rows()
        else:
            ranks = ranks_from_order(ranked.orders[name])
            given = ranked.given_scores.get(name)
            rows = [
                LayerRow(
                    layer=i, block_name=job.block_names[i], scorer=name,
                    values={"rank": int(ranks[i]), **({"score": finite_or_none(given[i])} if given else {})},
                )
                for i in range(job.n_layers)
            ]
        cumulative = selection.details.get(name, {}).get("cumulative")
        for r in rows:
            r.values["prune"] = r.layer in drop
            if cumulative is not None:
                r.values["cumulative"] = finite_or_none(cumulative[r.layer])
        layers.extend(rows)
    return layers


def _scope_parts(scope: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in scope.split(",") if "=" in p)


def _export(
    job: _Prune, selection: _Selection, measured: _Measured, ranked: Any, metrics: Sequence[MetricRow]
) -> list[ArtifactFile]:
    """The pruned model of `export_scorer` (save_pretrained, .tar.gz, with its model card), when asked
    and small enough, and its card as the artifact `pruned-model-<scorer>.card.md` (worker.modelcard)."""
    options = job.options
    if not options.export:
        return []
    name = options.export_scorer
    if name not in selection.dropped_by:
        job.warnings.append(f"export skipped: scorer {name} produced no ranking")
        return []
    key = tuple(selection.dropped_by[name])
    size = sum(p.numel() * p.element_size() for p in job.model.parameters())
    est = size * measured.params_after[key] / max(measured.n_params, 1)
    if est > options.export_max_bytes:
        job.warnings.append(f"export skipped: the pruned model is about {est / 1e6:.0f} MB, above export_max_bytes")
        return []
    job.ctx.check_cancelled()
    provenance = job.provenance or Provenance(base_model=str(getattr(job.model.config, "_name_or_path", "") or "unknown"))
    importance = ranked.importance.get(name)
    scores: dict[str, dict[int, float | None]] | None = (
        {str(name): {i: float(v) for i, v in enumerate(importance)}} if importance is not None else None
    )
    mine = [m for m in metrics if _scope_parts(m.scope).get("scorer") in (name, "original")]

    archive = f"pruned-model-{name}.tar.gz"
    standalone: list[ArtifactFile] = []  # the card again, as its own artifact: the verdicts are written into it

    def card(folder: Path) -> None:
        standalone.append(write_export_card(
            folder, provenance, archive, options.push_to_hub, job.warnings, kind="pruned", removed_layers=list(key),
            scores=scores, metrics=mine,
            extra={"scorer": name, "parameters": {"original": measured.n_params, "after": measured.params_after[key]}},
        ))

    with pruned_view(job.model, key, adapter=job.adapter):
        blob = export_pruned_model(job.model, job.tokenizer, card)
    return [ArtifactFile(archive, "application/gzip", blob), *standalone]


# ------------------------------------------------------------- trade-off curve


@dataclass
class _CurvePlan:
    """The trade-off curve's prunings: per block count k, each scorer's first k layers and
    each random seed's first k."""

    counts: list[int]
    by_scorer: dict[int, dict[str, tuple[int, ...]]]
    random: dict[int, list[tuple[int, ...]]]


def _curve_plan(job: _Prune, ranked: _Ranked, selection: _Selection) -> _CurvePlan:
    """Per k of `curve_blocks` (below the layer count; the rest skipped with a warning): the
    first k of each scorer's ranking (computed once, reused) and of each seed's random order."""
    options = job.options
    counts = [k for k in options.curve_blocks if k < job.n_layers]
    if len(counts) < len(options.curve_blocks):
        job.warnings.append(
            f"curve: block counts {[k for k in options.curve_blocks if k >= job.n_layers]} skipped: "
            f"the model has {job.n_layers} layers"
        )
    orders = {s: random_scores(job.n_layers, s).order() for s, _ in selection.random_sets}
    return _CurvePlan(
        counts,
        {k: {name: tuple(sorted(order[:k])) for name, order in ranked.orders.items()} for k in counts},
        {k: [tuple(sorted(order[:k])) for order in orders.values()] for k in counts},
    )


def _evaluate_curve(job: _Prune, tasks: Mapping[str, Any], plan: _CurvePlan, measured: _Measured) -> None:
    """Every curve pruning not evaluated yet, once, every task (a phase of the stage's bar each)."""
    wanted = sorted(
        {key for k in plan.counts for key in (*plan.by_scorer[k].values(), *plan.random[k])} - set(measured.evaluated)
    )
    for i, key in enumerate(wanted):
        job.ctx.check_cancelled()
        with pruned_view(job.model, key, adapter=job.adapter):
            measured.params_after[key] = count_parameters(job.model)
            measured.evaluated[key] = {}
            for task, data in tasks.items():
                with job.phase():
                    measured.evaluated[key][task] = job.evaluate(task, data, stage=f"prune:curve {i + 1}/{len(wanted)}")


def _tradeoff_curve(
    job: _Prune, plan: _CurvePlan, selection: _Selection, original: Mapping[str, TaskResult], measured: _Measured,
) -> tuple[list[MetricRow], dict[str, Any]]:
    """Retained performance after removing k blocks, for each k of the plan: per scorer and for
    the random control (median over seeds), every task, paired intervals. Scope
    `task=<t>,scorer=<s>,removed=<k>`."""
    options = job.options
    metrics: list[MetricRow] = []
    curve: dict[str, Any] = {"blocks": plan.counts, "n_layers": job.n_layers, "tasks": {}}
    for task, orig in original.items():
        per_scorer: dict[str, list[dict[str, Any]]] = {}
        for k in plan.counts:
            for name, key in plan.by_scorer[k].items():
                kept, _ = retained_metric(orig, measured.evaluated[key][task], n_boot=options.n_boot, seed=options.seed)
                scope = f"task={task},scorer={name},removed={k}"
                metrics.append(MetricRow(scope, "retained_pct", kept.value, kept.ci_low, kept.ci_high, kept.n))
                per_scorer.setdefault(name, []).append({
                    "removed": k, "layers_removed": list(key), "retained_pct": kept.value,
                    "ci": [kept.ci_low, kept.ci_high], "n": kept.n,
                    "parameter_reduction_pct": measured.reduction(key),
                })
            if selection.random_sets:
                results = [measured.evaluated[key][task] for key in plan.random[k]]
                kept, per_seed = median_retained(orig, results, n_boot=options.n_boot, seed=options.seed)
                scope = f"task={task},scorer=random,removed={k}"
                metrics.append(MetricRow(scope, "retained_pct", kept.value, kept.ci_low, kept.ci_high, kept.n))
                defined = [v for v in per_seed if v is not None]
                per_scorer.setdefault("random", []).append({
                    "removed": k, "retained_pct": kept.value, "ci": [kept.ci_low, kept.ci_high], "n": kept.n,
                    "per_seed": per_seed, "seed_range": [min(defined), max(defined)] if defined else [None, None],
                    "parameter_reduction_pct": median([measured.reduction(key) for key in plan.random[k]]),
                })
        curve["tasks"][task] = {"metric": orig.primary, "original": orig.value, "scorers": per_scorer}
    return metrics, curve


def _stage_figure(
    job: _Prune, metrics: Sequence[MetricRow], layers: Sequence[LayerRow], summary: Mapping[str, Any]
) -> list[ArtifactFile]:
    """prune.png/.svg: the dashboard's prune panel (worker/plots.py, prune_figure)."""
    from worker.plots import prune_figure, stage_figures

    return stage_figures(job.warnings, "prune", lambda: prune_figure(
        metrics, layers, summary["agreement"], tasks=summary["tasks"]))


def _curve_figure(job: _Prune, curve: Mapping[str, Any]) -> list[ArtifactFile]:
    from worker.plots import tradeoff_figure

    if not curve.get("blocks"):
        return []
    return tradeoff_figure(curve, title=f"Pruning trade-off ({job.n_layers} layers)")
