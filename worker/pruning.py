"""Layer pruning (docs/method.md section 3; paper section 3.2, appendix D.3 and H).

Removing blocks
- `remove_blocks(model, indices)` returns a model without the given blocks (0-based
  positions in the adapter's block list). It works on a `copy.deepcopy` of the model
  unless `inplace=True`: **the model a `LoadedModel` holds is shared** (the process
  cache of `worker.modelzoo.load_model` hands the same object to later jobs), so it
  must never be mutated. What changes:
  * the block list (the adapter's `block_list_path`, e.g. `model.layers`,
    `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`, `encoder.layer`) is
    replaced by a new `nn.ModuleList` of the kept blocks, in order;
  * every integer `layer_idx` / `layer_id` attribute inside a kept block (the
    attention's index into the KV cache) is renumbered to the block's new position;
  * the config that describes those blocks (`model.config`, or its `text_config`
    when the blocks live under `language_model`) gets the new count in every
    layer-count field that held the old one (`num_hidden_layers`, `n_layer`,
    `num_layers`, `n_layers`), per-layer lists of the old length whose name contains
    "layer" (e.g. Gemma3's `layer_types`) are subset to the kept blocks, and lists of
    layer indices (`mlp_only_layers`) are remapped.
  The result runs, generates with its KV cache, saves with `save_pretrained` and loads
  back with `from_pretrained` as an ordinary model with fewer layers.
  Refused (`JobFailed("prune_unsupported")`): removing every block, heterogeneous
  per-layer configs, and GPT-2 with `scale_attn_by_inverse_layer_idx` (its attention
  scaling depends on the layer index, so a reloaded pruned model would differ).
- `pruned_view(model, indices)`: the same change applied in place and undone on exit
  (in `finally`); used on the stage's private working copy to evaluate many candidate
  prunings without copying the weights each time.

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
- speed-up = median time of the original model's forward pass / median time of the
  pruned model's, on the same batch, `runs` timed runs after one warm-up each, in
  the same process: a measured number, noisy on a shared CPU, reported as measured;
- retained performance (%) = pruned / original x 100 for higher-is-better metrics,
  original / pruned x 100 for perplexity.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.schemas import PruneOptions
from worker.evaluation.tasks import (
    TaskResult,
    encode_texts,
    evaluate_classification,
    evaluate_perplexity,
    evaluate_qa,
    example_field,
    has_classification_head,
    is_causal_lm,
    model_device,
    pad_batch,
)
from worker.modelzoo import LoadedModel, adapter_for
from worker.modelzoo.adapters import ArchitectureAdapter
from worker.scoring.agreement import (
    Ranking,
    importance_from_order,
    pairwise_agreement,
    pruning_order,
    ranks_from_order,
)
from worker.scoring.baselines import BASELINE_SCORERS, ScoreTable, compute_scores, random_scores
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
    "retained_pct",
    "run_prune_stage",
    "PruneOptions",
    "select_cumulative",
    "select_fraction",
    "select_iterative",
]

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_INDEX_LIST_FIELDS = ("mlp_only_layers",)
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")


# ------------------------------------------------------------ removing blocks


def _adapter(model: torch.nn.Module, adapter: ArchitectureAdapter | None) -> ArchitectureAdapter:
    return adapter if adapter is not None else adapter_for(model)


def block_count(model: torch.nn.Module, adapter: ArchitectureAdapter | None = None) -> int:
    return len(model.get_submodule(_adapter(model, adapter).block_list_path(model)))


def _block_config(model: torch.nn.Module, path: str) -> Any:
    """The config object whose layer fields describe the block list at `path`."""
    config = model.config
    text = getattr(config, "text_config", None)
    if text is not None and text is not config and "language_model" in path:
        return text
    return config


@dataclass
class _Undo:
    parent: torch.nn.Module
    attr: str
    old_list: torch.nn.ModuleList
    index_attrs: list[tuple[torch.nn.Module, str, Any]]
    config: Any
    config_fields: dict[str, Any]


def _check_indices(indices: Iterable[int], n: int) -> list[int]:
    drop = sorted({int(i) for i in indices})
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise JobFailed("prune_invalid", f"layer indices {bad} are out of range for a model with {n} blocks")
    if len(drop) >= n:
        raise JobFailed("prune_unsupported", f"cannot remove all {n} blocks of the model")
    return drop


def _apply(model: torch.nn.Module, indices: Iterable[int], adapter: ArchitectureAdapter | None) -> _Undo:
    """Remove the blocks in place; returns what is needed to undo it."""
    path = _adapter(model, adapter).block_list_path(model)
    old_list = model.get_submodule(path)
    n = len(old_list)
    drop = _check_indices(indices, n)
    keep = [i for i in range(n) if i not in set(drop)]
    new_pos = {old: new for new, old in enumerate(keep)}
    config = _block_config(model, path)
    if getattr(config, "is_heterogeneous", False):
        raise JobFailed(
            "prune_unsupported", "pruning a model with a heterogeneous per-layer config is not supported"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise JobFailed(
            "prune_unsupported",
            "this GPT-2 scales attention by its layer index (scale_attn_by_inverse_layer_idx), so a pruned "
            "model would not reload as the same model; pruning it is not supported",
        )

    # Config fields, computed before anything changes.
    updates: dict[str, Any] = {}
    for name in LAYER_COUNT_FIELDS:
        if getattr(config, name, None) == n:
            updates[name] = len(keep)
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and "layer" in name and name not in updates:
            if name in LAYER_INDEX_LIST_FIELDS:
                continue
            updates[name] = type(value)(value[i] for i in keep)
    for name in LAYER_INDEX_LIST_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            updates[name] = type(value)(new_pos[i] for i in value if i in new_pos)

    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    undo = _Undo(parent, attr, old_list, [], config, {k: getattr(config, k, None) for k in updates})
    try:
        for old in keep:
            for module in old_list[old].modules():
                for name in LAYER_INDEX_ATTRS:
                    value = getattr(module, name, None)
                    if isinstance(value, int) and not isinstance(value, bool):
                        undo.index_attrs.append((module, name, value))
                        setattr(module, name, new_pos[old])
        setattr(parent, attr, torch.nn.ModuleList([old_list[i] for i in keep]))
        for name, value in updates.items():
            setattr(config, name, value)
    except BaseException:
        _undo(undo)
        raise
    return undo


def _undo(undo: _Undo) -> None:
    setattr(undo.parent, undo.attr, undo.old_list)
    for module, name, value in undo.index_attrs:
        setattr(module, name, value)
    # Restore the count before per-layer lists, so a validating config never sees a mismatch.
    for name in sorted(undo.config_fields, key=lambda k: k not in LAYER_COUNT_FIELDS):
        setattr(undo.config, name, undo.config_fields[name])


def remove_blocks(
    model: torch.nn.Module,
    indices: Iterable[int],
    *,
    adapter: ArchitectureAdapter | None = None,
    inplace: bool = False,
) -> torch.nn.Module:
    """A model without the blocks at `indices` (see module doc). Works on a deepcopy
    unless `inplace=True`; never pass `inplace=True` with a `LoadedModel.model`."""
    target = model if inplace else copy.deepcopy(model)
    _apply(target, indices, adapter)
    return target


@contextmanager
def pruned_view(
    model: torch.nn.Module, indices: Iterable[int], *, adapter: ArchitectureAdapter | None = None
) -> Iterator[torch.nn.Module]:
    """Temporarily remove blocks from `model` in place (restored on exit, errors included).
    Only for a private copy: other users of `model` would see the pruned model meanwhile."""
    undo = _apply(model, indices, adapter)
    try:
        yield model
    finally:
        _undo(undo)


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


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def export_pruned_model(model: torch.nn.Module, tokenizer: Any | None = None) -> bytes:
    """`save_pretrained` (safetensors) of `model` (and the tokenizer) as .tar.gz bytes."""
    with tempfile.TemporaryDirectory(prefix="layerscope-pruned-") as tmp:
        folder = Path(tmp) / "pruned-model"
        model.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
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


# ------------------------------------------------------------------ options


# -------------------------------------------------------------------- stage


@dataclass
class _Data:
    texts: list[str] = field(default_factory=list)  # language modeling
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    cls_texts: list[str] = field(default_factory=list)
    cls_labels: list[Any] = field(default_factory=list)


def _collect(examples: Sequence[Any], qa_examples: Sequence[Any] | None, options: PruneOptions) -> _Data:
    data = _Data()
    for ex in examples:
        text, q, a, label = (example_field(ex, k) for k in ("text", "question", "answer", "label"))
        if isinstance(text, str) and text.strip():
            data.texts.append(text)
        elif isinstance(q, str) and isinstance(a, str) and q.strip():
            data.texts.append(options.qa_prompt.format(question=q) + " " + a)
        if label is not None and isinstance(text, str) and text.strip():
            data.cls_texts.append(text)
            data.cls_labels.append(label)
    for ex in qa_examples if qa_examples is not None else examples:
        q, a = example_field(ex, "question"), example_field(ex, "answer")
        if isinstance(q, str) and q.strip() and a is not None and str(a).strip():
            data.questions.append(q)
            data.answers.append(a if isinstance(a, str) else "; ".join(map(str, a)))
    limit = options.eval_examples
    if limit is not None:
        data.texts, data.questions, data.answers = (
            data.texts[:limit],
            data.questions[:limit],
            data.answers[:limit],
        )
        data.cls_texts, data.cls_labels = data.cls_texts[:limit], data.cls_labels[:limit]
    return data


def _runnable_tasks(
    options: PruneOptions, data: _Data, model: torch.nn.Module, warnings: list[str]
) -> list[str]:
    causal = is_causal_lm(model)
    tasks: list[str] = []
    for task in options.tasks:
        if task == "perplexity":
            if not causal:
                warnings.append(f"perplexity skipped: {type(model).__name__} is not a causal LM")
            elif not data.texts:
                warnings.append("perplexity skipped: the dataset has no text")
            else:
                tasks.append(task)
        elif task == "qa":
            if not causal:
                warnings.append(
                    f"qa skipped: generative QA needs a causal LM, {type(model).__name__} is not one"
                )
            elif not data.questions:
                warnings.append("qa skipped: no examples with question and answer fields were given")
            else:
                tasks.append(task)
        else:
            if not data.cls_labels:
                warnings.append("classification skipped: the dataset has no label field")
            elif not has_classification_head(model) and not (causal and options.label_words):
                warnings.append(
                    "classification skipped: a causal LM needs label_words, an encoder a classification head"
                )
            else:
                tasks.append(task)
    if not tasks:
        raise JobFailed(
            "prune_no_task",
            "no task can be evaluated for pruning with this model and data: " + "; ".join(warnings),
        )
    return tasks


def _evaluate_task(
    task: str,
    model: torch.nn.Module,
    tokenizer: Any,
    data: _Data,
    options: PruneOptions,
    ctx: JobContext,
    max_tokens: int,
    *,
    limit: int | None = None,
    n_boot: int | None = None,
    stage: str = "prune:evaluate",
) -> TaskResult:
    n_boot = options.n_boot if n_boot is None else n_boot
    common: dict[str, Any] = {
        "max_tokens": max_tokens,
        "batch_size": options.batch_size,
        "ctx": ctx,
        "progress_stage": f"{stage}:{task}",
        "n_boot": n_boot,
        "seed": options.seed,
    }
    if task == "perplexity":
        texts = data.texts[:limit]
        window = options.ppl_window or None
        if window is not None:
            window = min(window, max_tokens) if max_tokens else window
        stride = options.ppl_stride
        if window is not None and stride is not None:
            stride = min(stride, window)
        return evaluate_perplexity(model, tokenizer, texts, window=window, stride=stride, **common)
    if task == "qa":
        return evaluate_qa(
            model,
            tokenizer,
            data.questions[:limit],
            data.answers[:limit],
            prompt_template=options.qa_prompt,
            max_new_tokens=options.qa_max_new_tokens,
            chat_template=options.qa_chat_template,
            **common,
        )
    return evaluate_classification(
        model,
        tokenizer,
        data.cls_texts[:limit],
        data.cls_labels[:limit],
        label_words=options.label_words,
        prompt_template=options.classification_prompt,
        **common,
    )


def _timing_batch(
    tokenizer: Any, data: _Data, options: PruneOptions, max_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    texts = data.texts or data.cls_texts or [options.qa_prompt.format(question=q) for q in data.questions]
    texts = texts[: options.timing_batch_size]
    encoded = [e for e in encode_texts(tokenizer, texts, max_tokens) if e]
    if not encoded:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_batch(encoded, int(pad))
    return ids.to(device), mask.to(device)


def _time_once(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


def measure_speedup(
    model: torch.nn.Module,
    dropped: Sequence[int],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    runs: int = 5,
    adapter: ArchitectureAdapter | None = None,
) -> dict[str, float]:
    """Median forward time of `model` and of it without `dropped` (via `pruned_view`, so
    on a private copy only), timed alternately (one warm-up each) so drift hits both."""
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
    return {
        "original_seconds": t_orig,
        "pruned_seconds": t_pruned,
        "speedup": t_orig / t_pruned if t_pruned > 0 else math.nan,
        "runs": float(len(original)),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def run_prune_stage(
    loaded: LoadedModel,
    examples: Sequence[Any],
    options: PruneOptions,
    ctx: JobContext,
    rankings: Mapping[str, Ranking],
    *,
    qa_examples: Sequence[Any] | None = None,
    max_tokens: int = 256,
) -> StageResult:
    """The `prune` stage (paper table 1): per task, the original metric and the metric after
    pruning by every scorer, the random-layer baseline, retained performance, parameter
    reduction and measured speed-up; per-layer baseline scores; rank agreement.

    `rankings`: rankings computed by earlier stages (e.g. `{"avss": <the avss stage's
    Ranking>}`), pruned lowest first; their per-layer `scores` (higher = more important,
    e.g. nAVSS) are what the `cumulative` strategy reads. `qa_examples`: question/answer
    examples for the QA task (default: the examples that have `question` and `answer`
    fields). The loaded model is never modified: the stage works on one private deepcopy
    (twice the model's memory)."""
    started = time.perf_counter()
    warnings: list[str] = []
    orders = {name: r.lowest_first() for name, r in rankings.items()}
    scores = {name: list(r.scores) for name, r in rankings.items() if r.scores is not None}
    try:
        work = copy.deepcopy(loaded.model)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise JobFailed(
            "out_of_memory",
            "pruning works on a private copy of the model and there is no memory for it; "
            "use a smaller model, dtype float16, or a worker with more memory",
        ) from exc
    work.eval()
    try:
        return _run(
            loaded, work, examples, options, ctx, orders, scores, qa_examples, max_tokens, warnings, started
        )
    finally:
        del work
        gc.collect()


def _run(
    loaded: LoadedModel,
    work: torch.nn.Module,
    examples: Sequence[Any],
    options: PruneOptions,
    ctx: JobContext,
    rankings: dict[str, list[int]],
    given_scores: dict[str, list[float]],
    qa_examples: Sequence[Any] | None,
    max_tokens: int,
    warnings: list[str],
    started: float,
) -> StageResult:
    tokenizer = loaded.tokenizer
    adapter = adapter_for(work)
    blocks = adapter.blocks(work)
    n_layers = len(blocks)
    block_names = [b.name for b in blocks]
    data = _collect(examples, qa_examples, options)
    tasks = _runnable_tasks(options, data, work, warnings)
    scoring_texts = (data.texts or data.cls_texts)[: options.scoring_examples]

    # ---- rankings: passed in, and the baselines computed here
    tables: dict[str, ScoreTable] = {}
    orders: dict[str, list[int]] = {}
    importance: dict[str, list[float]] = {}
    for name in options.scorers:
        ctx.check_cancelled()
        if name in BASELINE_SCORERS:
            if name in ("gbis", "lrp", "cim") and not is_causal_lm(work):
                warnings.append(f"scorer {name} skipped: it needs a causal LM (the LM loss is its task loss)")
                continue
            if not scoring_texts:
                warnings.append(f"scorer {name} skipped: no text to score layers on")
                continue
            kw: dict[str, Any] = {
                "adapter": adapter,
                "max_tokens": max_tokens,
                "ctx": ctx,
                "progress_stage": f"prune:score:{name}",
                "batch_size": options.batch_size
                if name in ("block_influence", "angular_distance", "cim")
                else max(1, options.batch_size // 2),
            }
            if name == "angular_distance":
                kw["positions"] = options.angular_positions
            if name == "lrp":
                kw["epsilon"] = options.lrp_epsilon
            table = compute_scores(name, work, tokenizer, scoring_texts, **kw)
            warnings.extend(table.warnings)
            tables[name] = table
            orders[name] = table.order()
            importance[name] = list(table.scores)
        else:
            if name not in rankings:
                warnings.append(f"scorer {name} skipped: no {name} ranking was passed to the prune stage")
                continue
            orders[name] = check_order(rankings[name], n_layers, f"the {name} ranking")
            given = given_scores.get(name)
            if given is not None and len(given) != n_layers:
                raise JobFailed(
                    "prune_invalid", f"{name} scores have {len(given)} values for {n_layers} layers"
                )
            importance[name] = (
                [float(v) for v in given] if given is not None else importance_from_order(orders[name])
            )
    if not orders:
        raise JobFailed("prune_no_scorer", "no scorer produced a ranking: " + "; ".join(warnings))

    # ---- original metrics
    original: dict[str, TaskResult] = {}
    for task in tasks:
        original[task] = _evaluate_task(
            task, work, tokenizer, data, options, ctx, max_tokens, stage="prune:original"
        )

    # ---- selection per scorer
    selection_task = tasks[0]
    selection_cache: dict[tuple[int, ...], float | None] = {}

    def selection_metric(dropped: list[int]) -> float | None:
        key = tuple(sorted(dropped))
        if key not in selection_cache:
            with pruned_view(work, key, adapter=adapter):
                res = _evaluate_task(
                    selection_task,
                    work,
                    tokenizer,
                    data,
                    options,
                    ctx,
                    max_tokens,
                    limit=options.scoring_examples,
                    n_boot=0,
                    stage="prune:iterative",
                )
            selection_cache[key] = res.value
        return selection_cache[key]

    dropped_by: dict[str, list[int]] = {}
    selection_details: dict[str, Any] = {}
    default_budget = math.floor(options.fraction * n_layers + 1e-9)
    for name, order in orders.items():
        if options.strategy == "fraction":
            dropped_by[name] = select_fraction(order, options.fraction)
        elif options.strategy == "cumulative":
            if name not in tables and name not in given_scores:
                warnings.append(
                    f"cumulative selection for {name} used L - rank as scores: no {name} scores were passed"
                )
            dropped, cumulative, warns = select_cumulative(importance[name], options.tau)
            warnings.extend(f"{name}: {w}" for w in warns)
            dropped_by[name] = dropped
            selection_details[name] = {"cumulative": cumulative}
        else:
            res = select_iterative(
                order,
                selection_metric,
                higher_is_better=original[selection_task].higher_is_better,
                delta=options.delta,
                lam=options.lam,
                budget=options.budget if options.budget is not None else max(1, default_budget),
                epsilon=options.epsilon,
                check=ctx.check_cancelled,
            )
            dropped_by[name] = res.dropped
            selection_details[name] = {
                "metric": f"{selection_task} on the first {options.scoring_examples} examples",
                "initial": res.initial,
                "final": res.final,
                "tolerance": res.tolerance,
                "stop_reason": res.stop_reason,
                "restored": res.kept_after_trial,
                "steps": [vars(s) for s in res.steps],
            }

    # ---- random-layer baseline: as many layers as AVSS removed (else floor(fraction x L))
    k_random = len(dropped_by["avss"]) if "avss" in dropped_by else default_budget
    random_sets: list[tuple[int, list[int]]] = []
    for s in range(options.random_seeds):
        seed = options.seed + s
        order = random_scores(n_layers, seed).order()
        random_sets.append((seed, sorted(order[:k_random])))

    # ---- evaluate every distinct pruned model once
    distinct = {tuple(d) for d in dropped_by.values()} | {tuple(d) for _, d in random_sets}
    evaluated: dict[tuple[int, ...], dict[str, TaskResult]] = {}
    n_params = count_parameters(work)
    params_after: dict[tuple[int, ...], int] = {}
    timing: dict[tuple[int, ...], dict[str, float]] = {}
    batch = (
        _timing_batch(tokenizer, data, options, max_tokens, model_device(work))
        if options.timing_runs
        else None
    )
    for i, key in enumerate(sorted(distinct)):
        ctx.check_cancelled()
        ctx.progress("prune:pruned_models", i, len(distinct))
        with pruned_view(work, key, adapter=adapter):
            params_after[key] = count_parameters(work)
            evaluated[key] = {
                task: _evaluate_task(task, work, tokenizer, data, options, ctx, max_tokens) for task in tasks
            }
        if batch is not None and key:
            timing[key] = measure_speedup(work, key, *batch, runs=options.timing_runs, adapter=adapter)
    ctx.progress("prune:pruned_models", len(distinct), len(distinct))

    def reduction(key: tuple[int, ...]) -> float:
        return 100.0 * (n_params - params_after[key]) / n_params if n_params else 0.0

    def speedup(key: tuple[int, ...]) -> float | None:
        if not key:
            return 1.0
        return finite_or_none(timing[key]["speedup"]) if key in timing else None

    # ---- assemble rows, table and summary
    metrics: list[MetricRow] = []
    table: list[dict[str, Any]] = []
    for task in tasks:
        orig = original[task]
        hib = orig.higher_is_better
        for mname, mv in orig.metrics.items():
            metrics.append(
                MetricRow(f"task={task},scorer=original", mname, mv.value, mv.ci_low, mv.ci_high, mv.n)
            )
        rows: list[dict[str, Any]] = []
        for name, dropped in dropped_by.items():
            key = tuple(dropped)
            res = evaluated[key][task]
            scope = f"task={task},scorer={name}"
            row: dict[str, Any] = {"scorer": name, "layers_removed": list(dropped)}
            for mname, mv in res.metrics.items():
                metrics.append(MetricRow(scope, mname, mv.value, mv.ci_low, mv.ci_high, mv.n))
                kept = retained_pct(orig.metrics[mname].value, mv.value, mv.higher_is_better)
                suffix = "" if mname == res.primary else f"_{mname}"
                metrics.append(MetricRow(scope, f"retained_pct{suffix}", finite_or_none(kept)))
                row[mname] = mv.value
                row[f"{mname}_ci"] = [mv.ci_low, mv.ci_high]
                row[f"retained_pct{suffix}"] = finite_or_none(kept)
            row["parameter_reduction_pct"] = reduction(key)
            row["speedup"] = speedup(key)
            rows.append(row)
        if random_sets:
            per_seed: dict[str, list[float]] = {}
            for seed, dropped in random_sets:
                res = evaluated[tuple(dropped)][task]
                for mname, mv in res.metrics.items():
                    metrics.append(
                        MetricRow(
                            f"task={task},scorer=random,seed={seed}",
                            mname,
                            mv.value,
                            mv.ci_low,
                            mv.ci_high,
                            mv.n,
                        )
                    )
                    if mv.value is not None:
                        per_seed.setdefault(mname, []).append(mv.value)
            row = {"scorer": "random", "seeds": [s for s, _ in random_sets], "layers_removed_count": k_random}
            for mname, values in per_seed.items():
                mean = float(np.mean(values)) if values else None
                std = float(np.std(values)) if values else None
                kept = retained_pct(orig.metrics[mname].value, mean, orig.metrics[mname].higher_is_better)
                suffix = "" if mname == orig.primary else f"_{mname}"
                scope = f"task={task},scorer=random"
                metrics.append(MetricRow(scope, mname, finite_or_none(mean), n=len(values)))
                metrics.append(MetricRow(scope, f"{mname}_std", finite_or_none(std), n=len(values)))
                metrics.append(MetricRow(scope, f"retained_pct{suffix}", finite_or_none(kept)))
                row[mname] = finite_or_none(mean)
                row[f"{mname}_std"] = finite_or_none(std)
                row[f"{mname}_per_seed"] = values
                row[f"retained_pct{suffix}"] = finite_or_none(kept)
            keys = [tuple(d) for _, d in random_sets]
            row["parameter_reduction_pct"] = float(np.mean([reduction(k) for k in keys]))
            sp = [speedup(k) for k in keys]
            row["speedup"] = (
                float(np.mean([v for v in sp if v is not None])) if any(v is not None for v in sp) else None
            )
            rows.append(row)
        entry = {
            "task": task,
            "metric": orig.primary,
            "higher_is_better": hib,
            "original": orig.value,
            "original_ci": [orig.metrics[orig.primary].ci_low, orig.metrics[orig.primary].ci_high],
            "n": orig.metrics[orig.primary].n,
            "rows": rows,
            "details": orig.details,
        }
        # Does AVSS lose to a baseline here?
        avss_row = next((r for r in rows if r["scorer"] == "avss"), None)
        if avss_row is not None and avss_row.get(orig.primary) is not None:
            a = avss_row[orig.primary]
            better = [
                r["scorer"]
                for r in rows
                if r["scorer"] != "avss"
                and r.get(orig.primary) is not None
                and ((r[orig.primary] > a) if hib else (r[orig.primary] < a))
            ]
            entry["avss_beaten_by"] = better
            if better:
                best = max if hib else min
                b_row = best((r for r in rows if r["scorer"] in better), key=lambda r: r[orig.primary])
                warnings.append(
                    f"AVSS loses on {task}: pruned by AVSS the {orig.primary} is {_fmt(a)}, worse than with "
                    f"{', '.join(better)} (best: {b_row['scorer']} {_fmt(b_row[orig.primary])}; "
                    f"original {_fmt(orig.value)})"
                )
        table.append(entry)

    for name, dropped in dropped_by.items():
        scope = f"scorer={name}"
        key = tuple(dropped)
        metrics.append(MetricRow(scope, "layers_removed", float(len(dropped))))
        metrics.append(MetricRow(scope, "parameter_reduction_pct", finite_or_none(reduction(key))))
        metrics.append(MetricRow(scope, "speedup", speedup(key), n=options.timing_runs or None))
        if name in tables:
            metrics.append(MetricRow(scope, "scoring_seconds", finite_or_none(tables[name].seconds)))

    # ---- per-layer rows
    layers: list[LayerRow] = []
    for name in dropped_by:
        drop = set(dropped_by[name])
        if name in tables:
            rows_l = tables[name].layer_rows()
        else:
            ranks = ranks_from_order(orders[name])
            given = given_scores.get(name)
            rows_l = [
                LayerRow(
                    layer=i,
                    block_name=block_names[i],
                    scorer=name,
                    values={
                        "rank": float(ranks[i]),
                        **({"score": finite_or_none(given[i])} if given else {}),
                    },
                )
                for i in range(n_layers)
            ]
        for r in rows_l:
            r.values["prune"] = 1.0 if r.layer in drop else 0.0
            cum = selection_details.get(name, {}).get("cumulative")
            if cum is not None:
                r.values["cumulative"] = finite_or_none(cum[r.layer])
        layers.extend(rows_l)

    agreement = pairwise_agreement({name: importance[name] for name in orders})

    # ---- optional export
    artifacts: list[ArtifactFile] = []
    if options.export:
        name = options.export_scorer
        if name not in dropped_by:
            warnings.append(f"export skipped: scorer {name} produced no ranking")
        else:
            key = tuple(dropped_by[name])
            est = (
                sum(p.numel() * p.element_size() for p in work.parameters())
                * params_after[key]
                / max(n_params, 1)
            )
            if est > options.export_max_bytes:
                warnings.append(
                    f"export skipped: the pruned model is about {est / 1e6:.0f} MB, above export_max_bytes"
                )
            else:
                ctx.check_cancelled()
                with pruned_view(work, key, adapter=adapter):
                    blob = export_pruned_model(work, tokenizer)
                artifacts.append(ArtifactFile(f"pruned-model-{name}.tar.gz", "application/gzip", blob))

    summary: dict[str, Any] = {
        "strategy": options.strategy,
        "options": options.model_dump(),
        "n_layers": n_layers,
        "original_parameters": n_params,
        "tasks": tasks,
        "table": table,
        "layers_removed": dropped_by,
        "random_baseline": {
            "seeds": [s for s, _ in random_sets],
            "layers_removed_count": k_random,
            "layers_removed": {str(s): d for s, d in random_sets},
            "note": "each seed removes as many random layers as AVSS did (floor(fraction x L) without AVSS)",
        },
        "agreement": agreement,
        "scoring_seconds": {name: t.seconds for name, t in tables.items()},
        "scoring_examples": len(scoring_texts),
        "selection": selection_details,
        "choices": {
            "ranking": "higher score = more important; ties: lower layer index first",
            "angular_distance_positions": options.angular_positions,
            "lrp": "epsilon rule on linear layers, gradient x input elsewhere; relevance of each block's residual "
            "update (approximation, see worker/scoring/baselines.py)",
            "cim": "leave-one-layer-out increase of the mean next-token NLL per context",
            "retained_pct": "pruned / original x 100; original / pruned x 100 for perplexity",
            "speedup": "median original / median pruned forward time on one batch, timed alternately; measured",
            "scoring_data": "the baselines score on the first scoring_examples texts of the evaluated set",
        },
        "seconds": time.perf_counter() - started,
    }
    if timing:
        summary["timing"] = {",".join(map(str, k)): v for k, v in timing.items()}
    return StageResult(
        stage="prune", layers=layers, metrics=metrics, artifacts=artifacts, summary=summary, warnings=warnings
    )
