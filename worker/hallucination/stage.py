"""The `hallucination` stage (docs/method.md sections 4-6; paper section 2.4-2.6, table 2,
appendix A).

Data flow (`analyze_hallucination`; `run_hallucination_stage` returns its StageResult):

1. Split. The caller passes a training and a test split (`split_examples` makes them
   from one dataset by distinct normalized question, so a question repeated in the
   data never lands on both sides). A test question that also occurs in the training
   split is dropped with a warning. `n_shots` training examples (seeded) become the
   few-shot prompt and are not answered; every other training example and every test
   example is answered.
2. Generate (greedy, batched, stop at newline, token cap; `generation.generate`) and
   label each answer with the correctness rules (`label_answer`, first rule that says
   correct is recorded; the judge only when configured).
3. Test split only: verbalized confidence (one more short greedy generation per answer)
   and self-consistency (K samples at temperature T).
4. Profile prompt + answer of the training answers, correct and hallucinated apart, and
   of the test answers, on `options.site`, counting the answer tokens only
   (`token_scope="answer"`, via the profiler's `token_start`) or every token, keeping
   each example's mean-pooled vector per layer. The prompt is the generation prompt
   (`profile_context="prompt"`, default: the answer tokens in the context they were
   generated in) or just `Question: q\nAnswer:` (`"question"`, **(choice)** about
   n_shots times cheaper: on CPU the profiling pass over the few-shot prompt costs more
   than the generation itself, which reuses the shared prompt's KV cache).
5. Layer scores on the TRAINING answers (so that the eavss_probe's layer choice never
   sees a test label): per group variance and sparsity (sparsity thresholds per layer
   from the avss options, computed once on all answered examples and shared by both
   groups **(choice)**, so HSS compares the same |a| cut-off), nAVSS from the AVSS of
   all answered examples (training and test; it uses no label), then HSAV, HSS, HCS,
   EAVSS (`compute_eavss`), with group sizes and small-group warnings.
6. Probes (trained on the training answers, scored on the test answers): P(IK) on the
   last prompt token's final hidden state, the length baseline, the eavss_probe on the
   concatenated pooled vectors of the top-k EAVSS layers, and one probe per layer (the
   appendix-A table).
7. Metrics per detector on the test split (`calibration_report`: acc@q, cov@p, ECE,
   ece_litcab, Brier, AUROC, accuracy, each with a bootstrap 95% interval and N) as
   MetricRows with scope `detector=<name>`, the per-layer table as LayerRows
   (scorer `layer_probe`), EAVSS as LayerRows (scorer `eavss`), the table-2 layout in
   `summary["table"]`, and the per-answer table as `answers.jsonl` / `answers.csv` and
   as `StageResult.answers` (stored as rows of the `answers` table; also
   `HallucinationRun.answers`).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.config import unknown_judge
from app.schemas import HallucinationOptions
from worker.evaluation.calibration import calibration_report, to_metric_rows
from worker.evaluation.correctness import (
    JudgeError,
    OpenAIJudge,
    label_answer,
    normalize_answer,
    split_aliases,
    tally_rules,
)
from worker.hallucination.detectors import (
    length_features,
    probe_confidence,
    self_consistency,
    sequence_likelihood,
    verbalized_confidence,
)
from worker.hallucination.generation import (
    Generation,
    build_prompt,
    first_alias,
    generate,
    pick_shots,
    verbalized_prompt,
)
from worker.progress import PhasedProgress
from worker.scoring.eavss import EAVSSResult, compute_eavss, to_layer_rows
from worker.stage import (  # AnswerRecord lives in worker.stage; re-exported here for existing imports
    AnswerRecord,
    ArtifactFile,
    JobContext,
    JobFailed,
    LayerRow,
    MetricRow,
    StageResult,
    finite_or_none,
)

__all__ = [
    "STAGE",
    "AnswerRecord",
    "HallucinationRun",
    "QAItem",
    "analyze_hallucination",
    "run_hallucination_stage",
    "split_examples",
    "table_markdown",
]

STAGE = "hallucination"
LAYER_PROBE = "layer_probe"


# ------------------------------------------------------------------ data


@dataclass
class QAItem:
    question: str
    gold: str  # aliases joined by '; '
    aliases: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _field(example: Any, name: str) -> Any:
    if isinstance(example, dict):
        return example.get(name)
    return getattr(example, name, None)


def qa_item(example: Any, where: str) -> QAItem:
    question = _field(example, "question")
    gold = _field(example, "answer")
    if not isinstance(question, str) or not question.strip():
        raise JobFailed(
            "dataset_invalid",
            f"{where} has no question: the hallucination stage needs question and answer fields "
            "(map them with dataset.fields, e.g. {\"question\": \"q\", \"answer\": \"a\"})",
        )
    if isinstance(gold, (list, tuple)):
        aliases = split_aliases([str(g) for g in gold])
    elif isinstance(gold, str):
        aliases = split_aliases(gold)
    else:
        aliases = []
    if not aliases:
        raise JobFailed("dataset_invalid", f"{where} (question {question[:80]!r}) has no gold answer")
    meta = _field(example, "meta")
    return QAItem(question.strip(), "; ".join(aliases), aliases, dict(meta) if isinstance(meta, dict) else {})


def question_key(question: str) -> str:
    return normalize_answer(question) or question.strip().lower()


def split_examples(examples: Sequence[Any], test_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, test): distinct normalized questions shuffled with `seed`, round(test_fraction x
    questions) of them (at least 1, and at least 1 left for training) go to the test split,
    with every example carrying one of them. Order inside each split follows the input."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    keys: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        q = _field(ex, "question")
        keys.setdefault(question_key(q) if isinstance(q, str) else f"\x00{i}", []).append(i)
    groups = sorted(keys)
    if len(groups) < 2:
        raise JobFailed("dataset_too_small", "the hallucination stage needs at least 2 distinct questions")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    n_test = min(max(1, int(round(test_fraction * len(groups)))), len(groups) - 1)
    test_idx = {i for g in order[:n_test] for i in keys[groups[int(g)]]}
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


@dataclass
class HallucinationRun:
    result: StageResult
    answers: list[AnswerRecord]
    eavss: EAVSSResult | None
    shots: list[tuple[str, str]]


# ------------------------------------------------------------------ progress


def _batches(n: int, size: int) -> int:
    return (n + size - 1) // size if n > 0 else 0


# ------------------------------------------------------------------ helpers


def _opt(options: Any, name: str) -> Any:
    if hasattr(options, name):
        return getattr(options, name)
    return getattr(HallucinationOptions(), name)


def _options_dict(options: Any) -> dict[str, Any]:
    dump = getattr(options, "model_dump", None)
    if callable(dump):
        d = dump()
    else:
        d = {k: _opt(options, k) for k in HallucinationOptions.model_fields}
    judge = d.get("judge")
    if isinstance(judge, dict):
        d["judge"] = {k: v for k, v in judge.items() if k != "api_key"}
    return d


def open_judge(options: Any, judges: Mapping[str, Any] | None) -> OpenAIJudge:
    """The judge `options.judge.name` names among the operator's `judges` (`Settings.judges`).
    A spec never supplies an endpoint or a secret; an unknown name is `judge_not_configured`."""
    cfg = _opt(options, "judge")
    name = _field(cfg, "name") if cfg is not None else None
    if not name:
        raise JobFailed("judge_not_configured", "correctness rule 'judge' needs judge.name, a judge configured on the server")
    endpoint = (judges or {}).get(name)
    if endpoint is None:
        raise JobFailed("judge_not_configured", unknown_judge(name, dict(judges or {})))
    try:
        return OpenAIJudge.from_endpoint(name, endpoint)
    except JudgeError as exc:
        raise JobFailed("judge_failed", f"cannot set up the correctness judge: {exc}") from exc


def _profile_options(profile_options: Any, site: str, batch_size: int) -> Any:
    from app.schemas import ProfileOptions

    base = profile_options if profile_options is not None else ProfileOptions(batch_size=batch_size)
    return ProfileOptions(
        sites=[site],
        batch_size=int(getattr(base, "batch_size", batch_size)),
        histogram_bins=int(getattr(base, "histogram_bins", 64)),
        skip_positions=int(getattr(base, "skip_positions", 0)),
    )


def _metric_table(
    reports: dict[str, dict[str, Any]], dataset: str | None, detectors: Sequence[str]
) -> dict[str, Any]:
    rows: list[str] = []
    for report in reports.values():
        for name in report:
            if name not in rows:
                rows.append(name)
    values = {
        m: {
            d: {
                "value": finite_or_none(reports[d][m].value),
                "ci_low": finite_or_none(reports[d][m].ci_low),
                "ci_high": finite_or_none(reports[d][m].ci_high),
                "n": reports[d][m].n,
            }
            for d in detectors
            if d in reports and m in reports[d]
        }
        for m in rows
    }
    return {"dataset": dataset, "columns": [d for d in detectors if d in reports], "rows": rows, "values": values}


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("value") is None:
        return "n/a"
    text = f"{cell['value']:.3f}"
    if cell.get("ci_low") is not None and cell.get("ci_high") is not None:
        text += f" [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"
    return text


def table_markdown(table: dict[str, Any]) -> str:
    """The table-2 layout (rows = metrics, columns = detectors) as Markdown."""
    cols = table["columns"]
    title = f"dataset: {table.get('dataset') or 'unnamed'}"
    lines = [title, "", "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in table["rows"]:
        lines.append(f"| {m} | " + " | ".join(_fmt(table["values"][m].get(d)) for d in cols) + " |")
    return "\n".join(lines) + "\n"


def _answers_csv(records: Sequence[AnswerRecord], detectors: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["id", "split", "question", "gold", "answer", "correct", "rule", "n_tokens", "stop"]
        + [f"confidence_{d}" for d in detectors]
    )
    for r in records:
        conf = [finite_or_none(r.confidence.get(d)) for d in detectors]
        writer.writerow(
            [r.id, r.split, r.question, "; ".join(r.gold), r.answer, int(r.correct), r.rule or "", r.n_tokens, r.stop]
            + ["" if c is None else f"{c:.6g}" for c in conf]
        )
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------ layer statistics


def _group_layer_values(
    stats: Sequence[Any], thresholds: np.ndarray, variance_mode: str
) -> tuple[list[float], list[float]]:
    from worker.scoring.avss import layer_sparsity, layer_variance

    var = layer_variance(stats, variance_mode)  # type: ignore[arg-type]
    sp = layer_sparsity(stats, thresholds)
    var = np.where(np.isfinite(var), np.maximum(var, 0.0), 0.0)
    sp = np.where(np.isfinite(sp), np.clip(sp, 0.0, 1.0), 0.0)
    return [float(v) for v in var], [float(s) for s in sp]


# ------------------------------------------------------------------ the stage


def run_hallucination_stage(
    loaded: Any,
    train_examples: Sequence[Any],
    test_examples: Sequence[Any],
    options: Any = None,
    ctx: JobContext | None = None,
    **kw: Any,
) -> StageResult:
    """The hallucination stage's StageResult (see `analyze_hallucination`)."""
    return analyze_hallucination(loaded, train_examples, test_examples, options, ctx, **kw).result


def analyze_hallucination(
    loaded: Any,
    train_examples: Sequence[Any],
    test_examples: Sequence[Any],
    options: Any = None,
    ctx: JobContext | None = None,
    *,
    profile_options: Any = None,
    avss_options: Any = None,
    dataset_name: str | None = None,
    judge: Any = None,
    judges: Mapping[str, Any] | None = None,
) -> HallucinationRun:
    """Run the whole analysis (module doc). `options`: `HallucinationOptions` (or any object
    with its attributes); `profile_options` / `avss_options`: `app.schemas.ProfileOptions` /
    `AvssOptions` (batch size and histogram of the profiler; variance mode and sparsity
    threshold of the layer scores), defaults when None. `judge`: an object with
    `equivalent(question, answer, gold) -> bool` used instead of opening the `OpenAIJudge`
    that `options.judge.name` names among the operator's `judges` (`Settings.judges`). Raises `JobFailed` for data that cannot be analysed."""
    from app.schemas import AvssOptions
    from worker.profiler import profile
    from worker.scoring.avss import compute_avss, sparsity_thresholds

    options = options if options is not None else HallucinationOptions()
    ctx = ctx or JobContext()
    avss_options = avss_options if avss_options is not None else AvssOptions()
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    warnings: list[str] = []

    if not getattr(loaded, "is_causal_lm", False):
        raise JobFailed(
            "model_unsupported",
            "the hallucination stage generates answers, so it needs a causal language model (this one is an encoder)",
        )

    seed = int(_opt(options, "seed"))
    detectors = list(_opt(options, "detectors"))
    rules = list(_opt(options, "correctness_rules"))
    batch_size = int(_opt(options, "batch_size"))
    max_new = int(_opt(options, "max_new_tokens"))
    p_values = [float(p) for p in _opt(options, "p_values")]
    q_values = [float(q) for q in _opt(options, "q_values")]
    n_boot = int(_opt(options, "n_boot"))
    probe_l2 = _opt(options, "probe_l2")
    probe_l2 = None if probe_l2 is None else float(probe_l2)
    site = str(_opt(options, "site"))
    use_chat = bool(_opt(options, "use_chat_template"))
    instruction = str(_opt(options, "instruction"))
    sc_k = int(_opt(options, "self_consistency_k"))
    answer_only = _opt(options, "token_scope") == "answer"
    profile_context = str(_opt(options, "profile_context"))

    # ---------------------------------------------------------------- split and shots
    train = [qa_item(e, f"training example {i}") for i, e in enumerate(train_examples)]
    test_all = [qa_item(e, f"test example {i}") for i, e in enumerate(test_examples)]
    train_keys = {question_key(x.question) for x in train}
    test = [x for x in test_all if question_key(x.question) not in train_keys]
    if len(test) < len(test_all):
        warnings.append(
            f"{len(test_all) - len(test)} test questions also occur in the training split and were dropped "
            "(probes are never scored on questions they were trained on)"
        )
    n_shots = int(_opt(options, "n_shots"))
    # Shots are drawn from the training questions in a canonical order, so the same split
    # gives the same prompt whatever order the examples came in.
    canon = sorted(range(len(train)), key=lambda i: (question_key(train[i].question), i))
    picked = pick_shots(len(canon), n_shots, seed, eligible=[bool(first_alias(train[i].gold)) for i in canon])
    shot_idx = [canon[k] for k in picked]
    shots = [(train[i].question, first_alias(train[i].gold)) for i in shot_idx]
    shot_set = set(shot_idx)
    pool = [x for i, x in enumerate(train) if i not in shot_set]
    if len(pool) < 2:
        raise JobFailed(
            "dataset_too_small",
            f"the training split has {len(train)} examples; after {len(shots)} few-shot examples fewer than 2 "
            "are left to train the probes. Use more examples, fewer shots or a smaller test_fraction.",
        )
    if not test:
        raise JobFailed("dataset_too_small", "the test split is empty; use more examples or a larger test_fraction")
    if len(shots) < n_shots:
        warnings.append(f"only {len(shots)} few-shot examples available (n_shots={n_shots})")
    chat_ok = bool(getattr(loaded.tokenizer, "chat_template", None))
    if use_chat and not chat_ok:
        warnings.append("use_chat_template was asked for but the tokenizer has no chat template; plain prompts used")
    prompt_format = "chat_template" if use_chat and chat_ok else "plain"

    items = pool + test
    split = ["train"] * len(pool) + ["test"] * len(test)
    n_train, n_test = len(pool), len(test)
    test_rows = np.arange(n_train, n_train + n_test)
    prompts = [
        build_prompt(x.question, shots, instruction=instruction, tokenizer=loaded.tokenizer, use_chat_template=use_chat)
        for x in items
    ]

    # ---------------------------------------------------------------- progress plan
    profile_bs = int(getattr(profile_options, "batch_size", batch_size)) if profile_options is not None else batch_size
    want_verbal = "verbalized" in detectors
    want_sc = "self_consistency" in detectors
    units_gen = _batches(len(items), batch_size)
    units_verbal = _batches(n_test, batch_size) if want_verbal else 0
    units_sc = _batches(n_test * sc_k, batch_size * sc_k) if want_sc else 0
    units_prof = _batches(n_train, profile_bs) + _batches(n_test, profile_bs) + 2
    units_probe = 2 + 1 + (1 if _opt(options, "layer_probes") else 0)
    progress = PhasedProgress(ctx, STAGE, units_gen + units_verbal + units_sc + units_prof + units_probe + 1)

    # ---------------------------------------------------------------- greedy answers
    t0 = time.monotonic()
    greedy_run = generate(
        loaded, prompts, max_new_tokens=max_new, batch_size=batch_size, temperature=0.0, seed=seed,
        capture_last_hidden="p_ik" in detectors, ctx=ctx, on_batch=progress.phase(units_gen),
    )
    gens: list[Generation] = greedy_run.generations
    timings["generate_greedy"] = time.monotonic() - t0

    # ---------------------------------------------------------------- labels
    t0 = time.monotonic()
    own_judge = None
    if "judge" in rules and judge is None:
        own_judge = judge = open_judge(options, judges)
    labels: list[tuple[bool, str | None]] = []
    try:
        for i, (x, g) in enumerate(zip(items, gens, strict=True)):
            if i % 32 == 0:
                ctx.check_cancelled()
            try:
                labels.append(
                    label_answer(
                        x.question, g.text, x.aliases, rules, judge,
                        contains_max_tokens=int(_opt(options, "contains_max_tokens")),
                        f1_threshold=float(_opt(options, "f1_threshold")),
                        rouge_threshold=float(_opt(options, "rouge_threshold")),
                    )
                )
            except JudgeError as exc:
                raise JobFailed("judge_failed", f"the correctness judge gave no verdict: {exc}") from exc
    finally:
        if own_judge is not None:
            own_judge.close()
    y = np.asarray([1.0 if c else 0.0 for c, _ in labels])
    y_train, y_test = y[:n_train], y[n_train:]
    timings["label"] = time.monotonic() - t0

    confidences: dict[str, np.ndarray] = {}  # detector -> [all answers], NaN where not computed
    probes_info: dict[str, Any] = {}

    def full(values_test: np.ndarray, values_train: np.ndarray | None = None) -> np.ndarray:
        out = np.full(len(items), np.nan)
        out[n_train:] = values_test
        if values_train is not None:
            out[:n_train] = values_train
        return out

    if "sequence_likelihood" in detectors:
        confidences["sequence_likelihood"] = sequence_likelihood(gens)

    # ---------------------------------------------------------------- verbalized
    verbal_replies: list[str | None] = [None] * len(items)
    n_unparseable = 0
    if want_verbal:
        t0 = time.monotonic()
        vprompts = [
            verbalized_prompt(items[i].question, gens[i].text, shots, instruction=instruction,
                              tokenizer=loaded.tokenizer, use_chat_template=use_chat)
            for i in test_rows
        ]
        vrun = generate(
            loaded, vprompts, max_new_tokens=int(_opt(options, "verbalized_max_new_tokens")),
            batch_size=batch_size, ctx=ctx, on_batch=progress.phase(units_verbal),
        )
        replies = [g.text for g in vrun.generations]
        conf, n_unparseable = verbalized_confidence(replies)
        confidences["verbalized"] = full(conf)
        for k, i in enumerate(test_rows):
            verbal_replies[i] = replies[k]
        if n_unparseable:
            warnings.append(
                f"verbalized: {n_unparseable} of {n_test} replies had no number in 0-100 and count as 0.5"
            )
        timings["generate_verbalized"] = time.monotonic() - t0

    # ---------------------------------------------------------------- self-consistency
    samples: list[list[str] | None] = [None] * len(items)
    if want_sc:
        t0 = time.monotonic()
        srun = generate(
            loaded, [prompts[i] for i in test_rows], max_new_tokens=max_new, batch_size=batch_size * sc_k,
            temperature=float(_opt(options, "self_consistency_temperature")), num_samples=sc_k, seed=seed,
            ctx=ctx, on_batch=progress.phase(units_sc),
        )
        per_q = [[g.text for g in srun.generations[k * sc_k : (k + 1) * sc_k]] for k in range(n_test)]
        confidences["self_consistency"] = full(
            self_consistency(
                [gens[i].text for i in test_rows], per_q,
                contains_max_tokens=int(_opt(options, "contains_max_tokens")),
                f1_threshold=float(_opt(options, "f1_threshold")),
            )
        )
        for k, i in enumerate(test_rows):
            samples[i] = per_q[k]
        timings["generate_self_consistency"] = time.monotonic() - t0

    # ---------------------------------------------------------------- profile
    t0 = time.monotonic()
    tok = loaded.tokenizer
    if profile_context == "question":
        contexts = [build_prompt(x.question, [], instruction="") for x in items]
        prompt_lens = [len(ids) for ids in tok(contexts, add_special_tokens=True)["input_ids"]]
    else:
        contexts = prompts
        prompt_lens = greedy_run.prompt_tokens
    texts = [contexts[i] + gens[i].completion for i in range(len(items))]
    full_lens = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    max_tokens = max(full_lens) + 1
    starts = [min(int(s), int(n)) for s, n in zip(prompt_lens, full_lens, strict=True)]
    popts = _profile_options(profile_options, site, batch_size)
    thresholds_exact = (float(avss_options.sparsity_eps),) if avss_options.sparsity_threshold == "absolute" else ()
    train_c = [i for i in range(n_train) if y[i] == 1.0]
    train_h = [i for i in range(n_train) if y[i] == 0.0]
    groups = {"train_correct": train_c, "train_hallucinated": train_h, "test": list(test_rows)}
    profiles: dict[str, Any] = {}
    units_left = units_prof
    for name, rows in groups.items():
        units = _batches(len(rows), popts.batch_size) + (1 if name != "test" else 0)
        units_left -= units
        if not rows:
            progress.phase(units)(1, 1)
            continue
        profiles[name] = profile(
            loaded, [texts[i] for i in rows], popts, progress.sub_context(units),
            max_tokens=max_tokens, token_start=[starts[i] for i in rows] if answer_only else None,
            collect_pooled=True, thresholds=thresholds_exact,
        )
        for w in profiles[name].warnings:
            warnings.append(f"profile ({name}): {w}")
    progress.phase(max(units_left, 0))(1, 1)
    any_prof = next(iter(profiles.values()))
    n_layers = any_prof.n_layers
    block_names = list(any_prof.block_names)
    layer_ids = list(any_prof.layer_indices)
    timings["profile"] = time.monotonic() - t0

    # pooled features per answered row: [answers, layers, width]
    width = any_prof.pooled[site].shape[-1]
    pooled = np.zeros((len(items), n_layers, width), dtype=np.float32)
    pooled_tokens = np.zeros(len(items), dtype=np.int64)
    for name, rows in groups.items():
        if name in profiles:
            pooled[rows] = profiles[name].pooled[site]
            pooled_tokens[rows] = profiles[name].pooled_tokens

    # ---------------------------------------------------------------- layer scores
    t0 = time.monotonic()

    def merged(names: Sequence[str]) -> list[Any]:
        out = []
        for layer in range(n_layers):
            acc = None
            for nm in names:
                if nm not in profiles:
                    continue
                s = profiles[nm].stats[(layer, site)]
                acc = s.copy() if acc is None else acc.merge(s)
            out.append(acc)
        return out

    all_stats = merged(list(profiles))
    thresholds = sparsity_thresholds(
        all_stats, avss_options.sparsity_threshold, avss_options.sparsity_eps,
        avss_options.sparsity_rel_eps, avss_options.sparsity_reference,
    )
    mode = avss_options.variance_mode
    var_all, sp_all = _group_layer_values(all_stats, thresholds, mode)
    avss_all = compute_avss(var_all, sp_all, avss_options.delta)
    for w in avss_all.warnings:
        warnings.append(f"AVSS (all answers): {w}")
    zeros = [0.0] * n_layers
    if "train_correct" in profiles:
        var_c, sp_c = _group_layer_values(merged(["train_correct"]), thresholds, mode)
    else:
        var_c, sp_c = zeros, zeros
    if "train_hallucinated" in profiles:
        var_h, sp_h = _group_layer_values(merged(["train_hallucinated"]), thresholds, mode)
    else:
        var_h, sp_h = zeros, zeros
    eav = compute_eavss(
        var_h, var_c, sp_h, sp_c, [float(v) for v in np.nan_to_num(avss_all.navss)],
        n_hallucinated=len(train_h), n_correct=len(train_c),
        alpha=float(_opt(options, "alpha")), beta=float(_opt(options, "beta")),
        combine=_opt(options, "combine"), zero_sum=_opt(options, "zero_sum"),
        min_group=int(_opt(options, "min_group")),
    )
    warnings.extend(f"EAVSS: {w}" for w in eav.warnings)
    layer_rows: list[LayerRow] = to_layer_rows(eav, block_names, layer_ids)
    for row, li in zip(layer_rows, range(n_layers), strict=True):
        row.values.update({
            "var_hallucinated": finite_or_none(var_h[li]),
            "var_correct": finite_or_none(var_c[li]),
            "sparsity_hallucinated": finite_or_none(sp_h[li]),
            "sparsity_correct": finite_or_none(sp_c[li]),
            "sparsity_threshold": finite_or_none(thresholds[li]),
            "navss": finite_or_none(eav.navss[li]),
        })
    top_k = min(int(_opt(options, "top_k_layers")), n_layers)
    top_layers = eav.ranking[:top_k]
    timings["layer_scores"] = time.monotonic() - t0

    # ---------------------------------------------------------------- probes
    t0 = time.monotonic()
    probe_kw = {"l2": probe_l2, "seed": seed}
    single_class = len(set(y_train.tolist())) < 2
    if single_class:
        warnings.append(
            f"every training answer is {'correct' if y_train[0] == 1 else 'hallucinated'}: the probes cannot learn "
            "and predict the training rate"
        )

    def record_probe(name: str, probe: Any, **extra: Any) -> None:
        probes_info[name] = {
            "l2": probe.l2, "degenerate": probe.degenerate, "converged": probe.converged,
            "at_grid_edge": probe.at_grid_edge,
            "cv_log_loss": None if probe.cv_losses is None else {str(k): v for k, v in probe.cv_losses.items()},
            **extra,
        }
        if not probe.converged:
            warnings.append(f"probe {name}: L-BFGS stopped at its iteration limit")
        if probe.at_grid_edge:
            warnings.append(
                f"probe {name}: cross-validation chose L2 = {probe.l2:g}, an end of the grid; a value beyond it "
                "might fit better (set probe_l2 to fix the strength)"
            )

    phase = progress.phase(units_probe)
    if "p_ik" in detectors:
        h = greedy_run.last_hidden
        assert h is not None
        conf, probe = probe_confidence(h[:n_train], y_train, h[n_train:], **probe_kw)
        confidences["p_ik"] = full(conf)
        record_probe("p_ik", probe, features=int(h.shape[1]))
    phase(1, units_probe)
    if "length" in detectors:
        lf = length_features(gens)
        conf, probe = probe_confidence(lf[:n_train], y_train, lf[n_train:], **probe_kw)
        confidences["length"] = full(conf)
        record_probe("length", probe, weight=float(probe.weight[0]) if probe.weight.size else None)
    if "eavss_probe" in detectors:
        feats = pooled[:, top_layers, :].reshape(len(items), -1)
        conf, probe = probe_confidence(feats[:n_train], y_train, feats[n_train:], **probe_kw)
        confidences["eavss_probe"] = full(conf)
        record_probe("eavss_probe", probe, layers=[layer_ids[i] for i in top_layers], features=int(feats.shape[1]))
    phase(2, units_probe)

    probe_rows: list[LayerRow] = []
    if _opt(options, "layer_probes"):
        for li in range(n_layers):
            ctx.check_cancelled()
            conf, probe = probe_confidence(pooled[:n_train, li, :], y_train, pooled[n_train:, li, :], **probe_kw)
            rep = calibration_report(conf, y_test, p_values=p_values, q_values=q_values, n_boot=n_boot, seed=seed)
            values: dict[str, float | None] = {}
            for metric, est in rep.items():
                values[metric] = finite_or_none(est.value)
                if metric in ("auroc", "ece", "brier", "acc@50"):
                    values[f"{metric}_ci_low"] = finite_or_none(est.ci_low)
                    values[f"{metric}_ci_high"] = finite_or_none(est.ci_high)
            values["n"] = float(n_test)
            values["n_train"] = float(n_train)
            values["l2"] = float(probe.l2)
            values["eavss_rank"] = float(eav.rank[li])
            probe_rows.append(LayerRow(layer=layer_ids[li], block_name=block_names[li], scorer=LAYER_PROBE,
                                       values=values))
    phase(3, units_probe)
    timings["probes"] = time.monotonic() - t0

    # ---------------------------------------------------------------- metrics
    t0 = time.monotonic()
    metrics: list[MetricRow] = []
    reports: dict[str, dict[str, Any]] = {}
    if len(set(y_test.tolist())) < 2:
        warnings.append("the test split has a single class: AUROC is undefined")
    for d in detectors:
        conf_test = confidences[d][n_train:]
        rep = calibration_report(conf_test, y_test, p_values=p_values, q_values=q_values, n_boot=n_boot, seed=seed)
        reports[d] = rep
        metrics.extend(to_metric_rows(rep, scope=f"detector={d}"))
    phase(4, units_probe)
    table = _metric_table(reports, dataset_name, detectors)
    timings["metrics"] = time.monotonic() - t0

    # ---------------------------------------------------------------- answers table
    records: list[AnswerRecord] = []
    for i, x in enumerate(items):
        g = gens[i]
        records.append(
            AnswerRecord(
                id=i, split=split[i], question=x.question, gold=list(x.aliases), answer=g.text,
                correct=bool(labels[i][0]), rule=labels[i][1], n_tokens=g.n_tokens, stop=g.stop,
                confidence={d: finite_or_none(confidences[d][i]) for d in detectors},
                verbalized_reply=verbal_replies[i], samples=samples[i], meta=x.meta,
            )
        )
    jsonl = "".join(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n" for r in records).encode("utf-8")
    artifacts = [
        ArtifactFile("answers.jsonl", "application/x-ndjson", jsonl),
        ArtifactFile("answers.csv", "text/csv", _answers_csv(records, detectors)),
        ArtifactFile("table2.md", "text/markdown", table_markdown(table).encode("utf-8")),
    ]

    # ---------------------------------------------------------------- summary
    def counts(rows: Sequence[int]) -> dict[str, int]:
        return tally_rules([labels[i] for i in rows], rules)

    best_layers = sorted(
        (r for r in probe_rows if r.values.get("auroc") is not None),
        key=lambda r: -(r.values["auroc"] or 0.0),
    )[:5]
    summary: dict[str, Any] = {
        "dataset": dataset_name,
        "model": getattr(loaded, "name", None),
        "options": _options_dict(options),
        "prompt_format": prompt_format,
        "shots": [{"question": q, "answer": a} for q, a in shots],
        "counts": {
            "train_examples": len(train),
            "shots": len(shots),
            "train_answered": n_train,
            "test_answered": n_test,
            "train_correct": len(train_c),
            "train_hallucinated": len(train_h),
            "test_correct": int(y_test.sum()),
            "test_hallucinated": int(n_test - y_test.sum()),
            "empty_answers": sum(1 for g in gens if not g.text),
            "stopped_at_max_tokens": sum(1 for g in gens if g.stop == "max_tokens"),
            "verbalized_unparseable": n_unparseable if want_verbal else None,
            "rules": {"train": counts(range(n_train)), "test": counts(test_rows)},
        },
        "generation": {
            "shared_prefix_tokens": greedy_run.shared_prefix_tokens,
            "prompt_tokens_mean": float(np.mean(greedy_run.prompt_tokens)),
            "answer_tokens_mean": float(np.mean([g.n_tokens for g in gens])),
            "max_new_tokens": max_new,
        },
        "layer_scores": {
            "split": "train",
            "site": site,
            "token_scope": "answer" if answer_only else "all",
            "profile_context": profile_context,
            "navss_from": "all answered examples (train + test)",
            "variance_mode": mode,
            "sparsity_threshold": avss_options.sparsity_threshold,
            "sparsity_eps": avss_options.sparsity_eps,
            "sparsity_rel_eps": avss_options.sparsity_rel_eps,
            "sparsity_reference": avss_options.sparsity_reference,
            **eav.options(),
            "ranking": [layer_ids[i] for i in eav.ranking],
            "top_layers": [layer_ids[i] for i in top_layers],
            "answer_tokens_counted": int(pooled_tokens.sum()),
        },
        "probes": probes_info,
        "table": table,
        "layer_probe_top": [
            {"layer": r.layer, "block_name": r.block_name, "auroc": r.values.get("auroc")} for r in best_layers
        ],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    timings["total"] = time.monotonic() - t_start
    summary["timings_s"]["total"] = round(timings["total"], 2)
    progress.finish()

    result = StageResult(
        stage=STAGE,
        layers=layer_rows + probe_rows,
        metrics=metrics,
        artifacts=artifacts,
        answers=records,
        summary=summary,
        warnings=warnings,
    )
    return HallucinationRun(result=result, answers=records, eavss=eav, shots=shots)
