"""The `hallucination` stage (docs/method.md sections 4-6; paper section 2.4-2.6, table 2,
appendix A).

Data flow (`analyze_hallucination`; `run_hallucination_stage` returns its StageResult):

1. Split. The caller passes a training and a test split (`split_examples` makes them
   from one dataset by distinct normalized question, so a question repeated in the
   data never lands on both sides). A test question that also occurs in the training
   split is dropped with a warning. `n_shots` training examples (seeded) become the
   few-shot prompt and are not answered; every other training example and every test
   example is answered.
2. Generate (greedy, batched, stop at newline, token cap; `worker.lm.generate`) and
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
   concatenated pooled vectors of the top-k EAVSS layers, the best_layer_probe on the layer
   (or window of layers) with the lowest cross-validated log-loss on the training answers,
   the all_layers_probe on every layer at once, and one probe per layer (the appendix-A
   table; the best_layer_probe's single-layer fits). `summary["layer_choice"]`: the layers
   each chose and the rank of EAVSS's layers among all layers (by that training CV, and, for
   reporting only, by the table's test AUROC).
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.config import JudgeEndpoint
from app.layervalues import LayerValue
from app.schemas import AvssOptions, HallucinationOptions, ProfileOptions
from worker.evaluation.calibration import (
    MetricEstimate,
    auroc_difference,
    calibration_report,
    metric_name,
    to_metric_rows,
)
from worker.evaluation.correctness import tally_rules
from worker.hallucination import probe as probes
from worker.hallucination.answers import (
    Answers,
    Judge,
    QAExample,
    QAItem,
    QASet,
    label_answers,
    open_judge,
    prepare_questions,
    qa_item,
    question_key,
    split_examples,
)
from worker.hallucination.detectors import DETECTORS, Detector, DetectorInput, LayerFeatures, Scored
from worker.hallucination.generation import build_prompt, generate
from worker.modelzoo import LoadedModel
from worker.profiler.profiler import Profile
from worker.profiler.stats import RunningStats
from worker.progress import PhasedProgress
from worker.scoring.avss import VarianceMode
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
    "open_judge",
    "qa_item",
    "question_key",
    "run_hallucination_stage",
    "split_examples",
    "table_markdown",
]

STAGE = "hallucination"
LAYER_PROBE = "layer_probe"
Report = dict[str, MetricEstimate]  # metric name -> estimate (`calibration_report`)


@dataclass
class HallucinationRun:
    result: StageResult
    answers: list[AnswerRecord]
    eavss: EAVSSResult  # the layer scores on the training answers (positions = block order)
    layer_ids: list[int]  # block index of each EAVSS position
    shots: list[tuple[str, str]]

    @property
    def ranking(self) -> list[int]:
        """Block indices by EAVSS, most hallucination-prone first."""
        return [self.layer_ids[i] for i in self.eavss.ranking]


class _Timings(dict[str, float]):
    """Seconds per step, for summary["timings_s"]."""

    @contextmanager
    def __call__(self, name: str | None) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        if name is not None:
            self[name] = self.get(name, 0.0) + time.monotonic() - t0


def _batches(n: int, size: int) -> int:
    return (n + size - 1) // size if n > 0 else 0


# ------------------------------------------------------------------ the stage


def run_hallucination_stage(
    loaded: LoadedModel,
    train_examples: Sequence[QAExample],
    test_examples: Sequence[QAExample],
    options: HallucinationOptions | None = None,
    ctx: JobContext | None = None,
    **kw: Any,
) -> StageResult:
    """The hallucination stage's StageResult (see `analyze_hallucination`)."""
    return analyze_hallucination(loaded, train_examples, test_examples, options, ctx, **kw).result


def analyze_hallucination(
    loaded: LoadedModel,
    train_examples: Sequence[QAExample],
    test_examples: Sequence[QAExample],
    options: HallucinationOptions | None = None,
    ctx: JobContext | None = None,
    *,
    profile_options: ProfileOptions | None = None,
    avss_options: AvssOptions | None = None,
    dataset_name: str | None = None,
    judge: Judge | None = None,
    judges: Mapping[str, JudgeEndpoint] | None = None,
) -> HallucinationRun:
    """Run the whole analysis (module doc). `profile_options` / `avss_options`: batch size and
    histogram of the profiler; variance mode and sparsity threshold of the layer scores
    (defaults when None). `judge`: used instead of opening the `OpenAIJudge` that
    `options.judge.name` names among the operator's `judges` (`Settings.judges`). Raises
    `JobFailed` for data that cannot be analysed."""
    options = options if options is not None else HallucinationOptions()
    ctx = ctx or JobContext()
    avss_options = avss_options if avss_options is not None else AvssOptions()
    t_start = time.monotonic()
    timed, warnings = _Timings(), list[str]()
    if not loaded.is_causal_lm:
        raise JobFailed(
            "model_unsupported",
            "the hallucination stage generates answers, so it needs a causal language model (this one is an encoder)",
        )
    detectors = [d for d in DETECTORS.values() if d.name in options.detectors]
    qa = prepare_questions(loaded, train_examples, test_examples, options, warnings)
    profile_bs = profile_options.batch_size if profile_options is not None else options.batch_size
    progress = PhasedProgress(ctx, STAGE, _progress_units(qa, options, detectors, profile_bs))
    with timed("generate_greedy"):
        greedy = generate(
            loaded.model, loaded.tokenizer, qa.prompts, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
            temperature=0.0, seed=options.seed, capture_last_hidden=any(d.needs_last_hidden for d in detectors),
            ctx=ctx, on_batch=progress.phase(_batches(len(qa.items), options.batch_size)),
        )
        warnings.extend(greedy.warnings)  # a lowered batch size (out-of-memory back-off)
    with timed("label"):
        answers = label_answers(qa, greedy, options, ctx, judge, judges)

    def run_detector(d: Detector, features: LayerFeatures | None = None) -> None:
        with timed(d.timing):
            on_batch = progress.phase(d.units(qa.n_test, options))
            scored[d.name] = s = d.score(DetectorInput(loaded, options, ctx, answers, on_batch, features, dict(scored)))
            warnings.extend(s.warnings)

    scored: dict[str, Scored] = {}
    for d in (d for d in detectors if d.phase != "probe"):
        run_detector(d)
    with timed("profile"):
        prof = _profile_answers(loaded, answers, options, profile_options, avss_options, progress,
                                _batches(qa.n_train, profile_bs) + _batches(qa.n_test, profile_bs) + 2)
        warnings.extend(prof.warnings)
    with timed("layer_scores"):
        layers = _layer_scores(prof, answers, options, avss_options)
        warnings.extend(layers.warnings)
    with timed("probes"):
        warnings.extend(_single_class_warning(answers.y_train))
        features = LayerFeatures(prof.pooled, layers.top_layers, prof.layer_ids)
        for d in (d for d in detectors if d.phase == "probe"):
            run_detector(d, features)
        probe_rows = _layer_probe_rows(answers, prof, layers.eavss, options, ctx, features) if options.layer_probes else []
        progress.phase(1)(1, 1)
    with timed("metrics"):
        metrics, table = _detector_metrics(answers, scored, options, dataset_name, warnings)
        progress.phase(1)(1, 1)
    records = _answer_records(answers, scored, options.detectors)
    summary = _summary(loaded, options, avss_options, answers, scored, prof, layers, probe_rows, table, dataset_name)
    summary["timings_s"] = {k: round(v, 2) for k, v in timed.items()}
    summary["timings_s"]["total"] = round(time.monotonic() - t_start, 2)
    progress.finish()
    from worker.plots import hallucination_figure, stage_figures  # matplotlib only when a stage draws

    artifacts = _artifacts(records, options.detectors, table) + stage_figures(
        warnings, STAGE, lambda: hallucination_figure(layers.rows + probe_rows, records, metrics,
                                                      detectors=options.detectors))
    result = StageResult(
        stage=STAGE, layers=layers.rows + probe_rows, metrics=metrics,
        artifacts=artifacts, answers=records, summary=summary, warnings=warnings,
    )
    return HallucinationRun(result=result, answers=records, eavss=layers.eavss, layer_ids=prof.layer_ids,
                            shots=qa.shots)


def _progress_units(qa: QASet, options: HallucinationOptions, detectors: Sequence[Detector], profile_bs: int) -> int:
    """Greedy generation, every detector, profiling, the layer probes, the metrics and the end."""
    return (
        _batches(len(qa.items), options.batch_size)
        + sum(d.units(qa.n_test, options) for d in detectors)
        + _batches(qa.n_train, profile_bs) + _batches(qa.n_test, profile_bs) + 2
        + 1 + 1 + 1
    )


def _report(confidence: np.ndarray, correct: np.ndarray, options: HallucinationOptions) -> Report:
    return calibration_report(confidence, correct, p_values=options.p_values, q_values=options.q_values,
                              n_boot=options.n_boot, seed=options.seed)


def _single_class_warning(y_train: np.ndarray) -> list[str]:
    if len(set(y_train.tolist())) >= 2:
        return []
    which = "correct" if y_train[0] == 1 else "hallucinated"
    return [f"every training answer is {which}: the probes cannot learn and predict the training rate"]


# ------------------------------------------------------------------ profile


@dataclass
class AnswerProfiles:
    """The profiler's pass over prompt + answer of every answered question, by group."""

    profiles: dict[str, Profile]  # "train_correct" | "train_hallucinated" | "test" (empty groups absent)
    groups: dict[str, list[int]]  # group -> answer rows
    pooled: np.ndarray  # [answers, layers, width] mean-pooled vectors on options.site
    pooled_tokens: np.ndarray  # [answers] tokens behind each pooled vector
    block_names: list[str]
    layer_ids: list[int]
    warnings: list[str]

    @property
    def n_layers(self) -> int:
        return len(self.block_names)


def _profile_texts(
    loaded: LoadedModel, answers: Answers, options: HallucinationOptions
) -> tuple[list[str], list[int], int]:
    """(prompt + answer per answer, where its answer tokens start, the token cap)."""
    qa, gens = answers.qa, answers.generations
    tok = loaded.tokenizer
    if options.profile_context == "question":
        contexts = [build_prompt(x.question, [], instruction="") for x in qa.items]
        prompt_lens = [len(ids) for ids in tok(contexts, add_special_tokens=True)["input_ids"]]
    else:
        contexts, prompt_lens = qa.prompts, answers.run.prompt_tokens
    texts = [contexts[i] + gens[i].completion for i in range(len(qa.items))]
    full_lens = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    starts = [min(int(s), int(n)) for s, n in zip(prompt_lens, full_lens, strict=True)]
    return texts, starts, max(full_lens) + 1


def _profile_answers(
    loaded: LoadedModel, answers: Answers, options: HallucinationOptions, profile_options: ProfileOptions | None,
    avss_options: AvssOptions, progress: PhasedProgress, units_total: int,
) -> AnswerProfiles:
    """Profile the training answers, correct and hallucinated apart, and the test answers,
    on `options.site`, keeping each one's pooled vector per layer (module doc, step 4)."""
    from worker.profiler import profile

    texts, starts, max_tokens = _profile_texts(loaded, answers, options)
    base = profile_options if profile_options is not None else ProfileOptions(batch_size=options.batch_size)
    popts = ProfileOptions(sites=[options.site], batch_size=base.batch_size, histogram_bins=base.histogram_bins,
                           skip_positions=base.skip_positions)
    exact = (float(avss_options.sparsity_eps),) if avss_options.sparsity_threshold == "absolute" else ()
    # a fine |a| window around a relative threshold: its sparsity is read within a stated bound
    relative = () if exact else ((avss_options.sparsity_rel_eps, avss_options.sparsity_reference),)
    n_train = answers.qa.n_train
    groups = {
        "train_correct": [i for i in range(n_train) if answers.correct[i] == 1.0],
        "train_hallucinated": [i for i in range(n_train) if answers.correct[i] == 0.0],
        "test": [int(i) for i in answers.qa.test_rows],
    }
    profiles: dict[str, Profile] = {}
    warnings: list[str] = []
    units_left = units_total
    for name, rows in groups.items():
        units = _batches(len(rows), popts.batch_size) + (1 if name != "test" else 0)
        units_left -= units
        if not rows:
            progress.phase(units)(1, 1)
            continue
        profiles[name] = profile(
            loaded, [texts[i] for i in rows], popts, progress.sub_context(units), max_tokens=max_tokens,
            token_start=[starts[i] for i in rows] if options.token_scope == "answer" else None,
            collect_pooled=True, thresholds=exact, relative=relative,
        )
        warnings.extend(f"profile ({name}): {w}" for w in profiles[name].warnings)
    progress.phase(max(units_left, 0))(1, 1)
    return _pool(profiles, groups, len(answers.qa.items), options.site, warnings)


def _pool(
    profiles: dict[str, Profile], groups: dict[str, list[int]], n_answers: int, site: str, warnings: list[str]
) -> AnswerProfiles:
    any_prof = next(iter(profiles.values()))
    assert any_prof.pooled is not None
    width = any_prof.pooled[site].shape[-1]
    pooled = np.zeros((n_answers, any_prof.n_layers, width), dtype=np.float32)
    pooled_tokens = np.zeros(n_answers, dtype=np.int64)
    for name, p in profiles.items():
        assert p.pooled is not None and p.pooled_tokens is not None
        pooled[groups[name]] = p.pooled[site]
        pooled_tokens[groups[name]] = p.pooled_tokens
    return AnswerProfiles(profiles, groups, pooled, pooled_tokens, list(any_prof.block_names),
                          list(any_prof.layer_indices), warnings)


# ------------------------------------------------------------------ layer scores


@dataclass
class LayerScores:
    eavss: EAVSSResult
    rows: list[LayerRow]  # scorer "eavss", with the group statistics behind it
    top_layers: list[int]  # positions, the top_k_layers by EAVSS
    warnings: list[str]


def _merged(prof: AnswerProfiles, names: Sequence[str], site: str) -> list[RunningStats]:
    """Per layer: the statistics of the named groups merged (`names` holds a profiled group)."""
    out = []
    for layer in range(prof.n_layers):
        acc: RunningStats | None = None
        for nm in names:
            if nm in prof.profiles:
                s = prof.profiles[nm].stats[(layer, site)]
                acc = s.copy() if acc is None else acc.merge(s)
        assert acc is not None
        out.append(acc)
    return out


def _group_layer_values(
    stats: Sequence[RunningStats], thresholds: np.ndarray, variance_mode: VarianceMode
) -> tuple[list[float], list[float]]:
    from worker.scoring.avss import layer_sparsity, layer_variance

    var = layer_variance(stats, variance_mode)
    sp = layer_sparsity(stats, thresholds)
    var = np.where(np.isfinite(var), np.maximum(var, 0.0), 0.0)
    sp = np.where(np.isfinite(sp), np.clip(sp, 0.0, 1.0), 0.0)
    return [float(v) for v in var], [float(s) for s in sp]


def _layer_scores(
    prof: AnswerProfiles, answers: Answers, options: HallucinationOptions, avss: AvssOptions
) -> LayerScores:
    """EAVSS on the training answers, nAVSS from every answered one (module doc, step 5)."""
    from worker.scoring.avss import compute_avss, sparsity_thresholds

    site, mode, warnings = options.site, avss.variance_mode, list[str]()
    all_stats = _merged(prof, list(prof.profiles), site)
    thresholds = sparsity_thresholds(all_stats, avss.sparsity_threshold, avss.sparsity_eps, avss.sparsity_rel_eps,
                                     avss.sparsity_reference)
    var_all, sp_all = _group_layer_values(all_stats, thresholds, mode)
    avss_all = compute_avss(var_all, sp_all, avss.delta)
    warnings.extend(f"AVSS (all answers): {w}" for w in avss_all.warnings)
    zeros = [0.0] * prof.n_layers
    var_c, sp_c = (_group_layer_values(_merged(prof, ["train_correct"], site), thresholds, mode)
                   if "train_correct" in prof.profiles else (zeros, zeros))
    var_h, sp_h = (_group_layer_values(_merged(prof, ["train_hallucinated"], site), thresholds, mode)
                   if "train_hallucinated" in prof.profiles else (zeros, zeros))
    eav = compute_eavss(
        var_h, var_c, sp_h, sp_c, [float(v) for v in np.nan_to_num(avss_all.navss)],
        n_hallucinated=len(prof.groups["train_hallucinated"]), n_correct=len(prof.groups["train_correct"]),
        alpha=options.alpha, beta=options.beta, combine=options.combine, zero_sum=options.zero_sum,
        min_group=options.min_group,
    )
    warnings.extend(f"EAVSS: {w}" for w in eav.warnings)
    rows = to_layer_rows(eav, prof.block_names, prof.layer_ids)
    from worker.scoring.avss import layer_sparsity_bounds

    bounds = {g: layer_sparsity_bounds(_merged(prof, [g], site), thresholds) if g in prof.profiles
              else np.zeros(prof.n_layers) for g in ("train_hallucinated", "train_correct")}
    for li, row in enumerate(rows):
        row.values.update({
            "var_hallucinated": finite_or_none(var_h[li]),
            "var_correct": finite_or_none(var_c[li]),
            "sparsity_hallucinated": finite_or_none(sp_h[li]),
            "sparsity_correct": finite_or_none(sp_c[li]),
            "sparsity_hallucinated_bound": finite_or_none(bounds["train_hallucinated"][li]),
            "sparsity_correct_bound": finite_or_none(bounds["train_correct"][li]),
            "sparsity_threshold": finite_or_none(thresholds[li]),
            "navss": finite_or_none(eav.navss[li]),
        })
    top_layers = eav.ranking[: min(options.top_k_layers, prof.n_layers)]
    return LayerScores(eav, rows, top_layers, warnings)


# ------------------------------------------------------------------ probes and metrics


def _layer_probe_rows(
    answers: Answers, prof: AnswerProfiles, eav: EAVSSResult, options: HallucinationOptions, ctx: JobContext,
    features: LayerFeatures,
) -> list[LayerRow]:
    """The appendix-A table: one probe per layer on its pooled vectors (scorer `layer_probe`;
    the probes `best_layer_probe` already fitted are reused)."""
    n_train, n_test = answers.qa.n_train, answers.qa.n_test
    rows: list[LayerRow] = []
    for li in range(prof.n_layers):
        ctx.check_cancelled()
        probe = features.layer_probes.get(li)
        if probe is None:
            conf, probe = probes.probe_confidence(prof.pooled[:n_train, li, :], answers.y_train,
                                                  prof.pooled[n_train:, li, :], l2=options.probe_l2,
                                                  seed=options.seed)
        else:
            conf = np.clip(probe.predict_proba(prof.pooled[n_train:, li, :]), 0.0, 1.0)
        values: dict[str, LayerValue] = {}
        for metric, est in _report(conf, answers.y_test, options).items():
            values[metric] = finite_or_none(est.value)
            if metric in ("auroc", "ece", "brier", "acc@50"):
                values[f"{metric}_ci_low"] = finite_or_none(est.ci_low)
                values[f"{metric}_ci_high"] = finite_or_none(est.ci_high)
        values.update(n=int(n_test), n_train=int(n_train), l2=float(probe.l2), eavss_rank=int(eav.rank[li]))
        rows.append(LayerRow(layer=prof.layer_ids[li], block_name=prof.block_names[li], scorer=LAYER_PROBE,
                             values=values))
    return rows


def _detector_metrics(
    answers: Answers, scored: dict[str, Scored], options: HallucinationOptions, dataset_name: str | None,
    warnings: list[str],
) -> tuple[list[MetricRow], dict[str, Any]]:
    """Every detector's calibration report on the test split: MetricRows (scope
    `detector=<name>`) and the table-2 layout."""
    if len(set(answers.y_test.tolist())) < 2:
        warnings.append("the test split has a single class: AUROC is undefined")
    n_train = answers.qa.n_train
    reports: dict[str, Report] = {
        d: _report(scored[d].confidence[n_train:], answers.y_test, options) for d in options.detectors
    }
    metrics = [row for d, rep in reports.items() for row in to_metric_rows(rep, scope=f"detector={d}")]
    return metrics, _metric_table(reports, dataset_name, options.detectors)


LEADERBOARD_METRICS = ("auroc", "ece", "brier")  # then acc@q and cov@p of the first q and p


def _cell(est: MetricEstimate | None) -> dict[str, Any] | None:
    if est is None:
        return None
    return {"value": finite_or_none(est.value), "ci_low": finite_or_none(est.ci_low),
            "ci_high": finite_or_none(est.ci_high), "n": est.n}


def _verdict(diff: MetricEstimate) -> str:
    """How a detector's AUROC compares with a reference's, from the paired interval of the difference."""
    if diff.value is None:
        return "undefined"
    if diff.ci_low is None or diff.ci_high is None:
        return "no_interval"
    if diff.ci_low > 0:
        return "better"
    if diff.ci_high < 0:
        return "worse"
    return "not_distinguishable"


def _leaderboard(
    answers: Answers, scored: Mapping[str, Scored], options: HallucinationOptions, table: dict[str, Any]
) -> dict[str, Any]:
    """Every detector by test AUROC (undefined last), with AUROC, ECE, Brier, acc@q, cov@p and their
    intervals, and against two reference rows: the `length` baseline and the best toolkit estimator
    (the `toolkit` detector with the highest test AUROC: the strongest off-the-shelf rival, so a
    "better" against it is conservative). Each comparison is AUROC(detector) - AUROC(reference) with
    a paired bootstrap interval; `better` / `worse` when the interval excludes 0."""
    n_train, y = answers.qa.n_train, answers.y_test
    metrics = [*LEADERBOARD_METRICS, metric_name("acc", options.q_values[0]), metric_name("cov", options.p_values[0])]
    values = table["values"]
    dets: list[str] = [d for d in options.detectors if d in scored]

    def auc(d: str) -> float:
        v = (values.get("auroc") or {}).get(d, {}).get("value")
        return -1.0 if v is None else float(v)

    toolkit = [d for d in dets if DETECTORS[d].toolkit]
    best_toolkit = max(toolkit, key=lambda d: (auc(d), -toolkit.index(d))) if toolkit else None
    refs: dict[str, str | None] = {"length": "length" if "length" in dets else None, "toolkit": best_toolkit}
    rows = []
    for rank, d in enumerate(sorted(dets, key=lambda d: (-auc(d), dets.index(d))), start=1):
        row: dict[str, Any] = {
            "rank": rank, "detector": d, "toolkit": DETECTORS[d].toolkit,
            "reference": [k for k, v in refs.items() if v == d],
            "metrics": {m: (values.get(m) or {}).get(d) for m in metrics},
        }
        for key, ref in refs.items():
            if ref is None or ref == d:
                row[f"vs_{key}"] = None
                continue
            diff = auroc_difference(scored[d].confidence[n_train:], scored[ref].confidence[n_train:], y,
                                    n_boot=options.n_boot, seed=options.seed)
            row[f"vs_{key}"] = {"reference": ref, "auroc_difference": _cell(diff), "verdict": _verdict(diff)}
        rows.append(row)
    return {
        "split": "test", "n": int(answers.qa.n_test), "sorted_by": "auroc", "metrics": metrics,
        "length_baseline": refs["length"], "best_toolkit": best_toolkit, "toolkit_estimators": toolkit,
        "comparison": "AUROC difference, paired bootstrap 95% interval; better/worse when it excludes 0",
        "rows": rows,
    }


def _metric_table(reports: Mapping[str, Report], dataset: str | None, detectors: Sequence[str]) -> dict[str, Any]:
    rows: list[str] = []
    for report in reports.values():
        for name in report:
            if name not in rows:
                rows.append(name)

    def cell(est: MetricEstimate) -> dict[str, Any]:
        return {"value": finite_or_none(est.value), "ci_low": finite_or_none(est.ci_low),
                "ci_high": finite_or_none(est.ci_high), "n": est.n}

    values = {m: {d: cell(reports[d][m]) for d in detectors if d in reports and m in reports[d]} for m in rows}
    return {"dataset": dataset, "columns": [d for d in detectors if d in reports], "rows": rows, "values": values}


# ------------------------------------------------------------------ answers table and artifacts


def _answer_records(answers: Answers, scored: dict[str, Scored], detectors: Sequence[str]) -> list[AnswerRecord]:
    qa, n_train = answers.qa, answers.qa.n_train
    replies = next((s.replies for s in scored.values() if s.replies is not None), None)
    samples = next((s.samples for s in scored.values() if s.samples is not None), None)
    split = qa.split
    return [
        AnswerRecord(
            id=i, split=split[i], question=x.question, gold=list(x.aliases), answer=g.text,
            correct=bool(answers.correct[i]), rule=answers.rules[i], n_tokens=g.n_tokens, stop=g.stop,
            confidence={d: finite_or_none(scored[d].confidence[i]) for d in detectors},
            verbalized_reply=replies[i - n_train] if replies is not None and i >= n_train else None,
            samples=samples[i - n_train] if samples is not None and i >= n_train else None, meta=x.meta,
        )
        for i, (x, g) in enumerate(zip(qa.items, answers.generations, strict=True))
    ]


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


def _artifacts(records: Sequence[AnswerRecord], detectors: Sequence[str], table: dict[str, Any]) -> list[ArtifactFile]:
    jsonl = "".join(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n" for r in records)
    return [
        ArtifactFile("answers.jsonl", "application/x-ndjson", jsonl.encode("utf-8")),
        ArtifactFile("answers.csv", "text/csv", _answers_csv(records, detectors)),
        ArtifactFile("table2.md", "text/markdown", table_markdown(table).encode("utf-8")),
    ]


# ------------------------------------------------------------------ summary


def _options_dict(options: HallucinationOptions) -> dict[str, Any]:
    d = options.model_dump()
    judge = d.get("judge")
    if isinstance(judge, dict):
        d["judge"] = {k: v for k, v in judge.items() if k != "api_key"}
    return d


def _counts(answers: Answers, scored: dict[str, Scored], rules: Sequence[str]) -> dict[str, Any]:
    qa, y_test, gens = answers.qa, answers.y_test, answers.generations
    n_correct = int(answers.y_train.sum())
    counts: dict[str, Any] = {
        "train_examples": qa.train_examples, "shots": len(qa.shots), "train_answered": qa.n_train,
        "test_answered": qa.n_test, "train_correct": n_correct, "train_hallucinated": qa.n_train - n_correct,
        "test_correct": int(y_test.sum()), "test_hallucinated": int(qa.n_test - y_test.sum()),
        "empty_answers": sum(1 for g in gens if not g.text),
        "stopped_at_max_tokens": sum(1 for g in gens if g.stop == "max_tokens"),
        "verbalized_unparseable": None,
    }
    for s in scored.values():
        counts.update(s.counts)
    counts["rules"] = {"train": tally_rules(answers.labels(range(qa.n_train)), rules),
                       "test": tally_rules(answers.labels(qa.test_rows), rules)}
    return counts


def _layer_scores_summary(
    options: HallucinationOptions, avss: AvssOptions, prof: AnswerProfiles, layers: LayerScores
) -> dict[str, Any]:
    return {
        "split": "train",
        "site": options.site,
        "token_scope": "answer" if options.token_scope == "answer" else "all",
        "profile_context": options.profile_context,
        "navss_from": "all answered examples (train + test)",
        "variance_mode": avss.variance_mode,
        "sparsity_threshold": avss.sparsity_threshold,
        "sparsity_eps": avss.sparsity_eps,
        "sparsity_rel_eps": avss.sparsity_rel_eps,
        "sparsity_reference": avss.sparsity_reference,
        **layers.eavss.options(),
        "ranking": [prof.layer_ids[i] for i in layers.eavss.ranking],
        "top_layers": [prof.layer_ids[i] for i in layers.top_layers],
        "answer_tokens_counted": int(prof.pooled_tokens.sum()),
    }


def _layer_choice(
    scored: Mapping[str, Scored], prof: AnswerProfiles, layers: LayerScores, probe_rows: Sequence[LayerRow]
) -> dict[str, Any]:
    """Which layers each layer-choosing probe used, and how EAVSS's choice ranks among all layers:
    by the training split's cross-validated log-loss (`best_layer_probe`'s criterion) and, for
    reporting only (no probe is chosen by it), by the per-layer table's test AUROC."""
    out: dict[str, Any] = {
        "eavss_probe": [prof.layer_ids[i] for i in layers.top_layers],
        "eavss_ranking": [prof.layer_ids[i] for i in layers.eavss.ranking],
    }
    for name in ("best_layer_probe", "all_layers_probe"):
        if name in scored and scored[name].probe is not None:
            out[name] = list((scored[name].probe or {}).get("layers") or [])
    cv_order = (scored["best_layer_probe"].probe or {}).get("layer_cv_ranking") if "best_layer_probe" in scored else None
    by_auroc = [r.layer for r in sorted((r for r in probe_rows if r.values.get("auroc") is not None),
                                        key=lambda r: (-(r.values["auroc"] or 0.0), r.layer))]
    out["n_layers"] = prof.n_layers
    out["eavss_layers"] = [
        {"layer": layer,
         "train_cv_rank": cv_order.index(layer) + 1 if cv_order and layer in cv_order else None,
         "test_auroc_rank": by_auroc.index(layer) + 1 if layer in by_auroc else None}
        for layer in out["eavss_probe"]
    ]
    out["layer_test_auroc_ranking"] = by_auroc
    return out


def _summary(
    loaded: LoadedModel, options: HallucinationOptions, avss: AvssOptions, answers: Answers,
    scored: dict[str, Scored], prof: AnswerProfiles, layers: LayerScores, probe_rows: Sequence[LayerRow],
    table: dict[str, Any], dataset_name: str | None,
) -> dict[str, Any]:
    best = sorted((r for r in probe_rows if r.values.get("auroc") is not None),
                  key=lambda r: -(r.values["auroc"] or 0.0))[:5]
    run = answers.run
    return {
        "dataset": dataset_name,
        "model": loaded.name,
        "options": _options_dict(options),
        "prompt_format": answers.qa.prompt_format,
        "shots": [{"question": q, "answer": a} for q, a in answers.qa.shots],
        "counts": _counts(answers, scored, options.correctness_rules),
        "generation": {
            "shared_prefix_tokens": run.shared_prefix_tokens,
            "prompt_tokens_mean": float(np.mean(run.prompt_tokens)),
            "answer_tokens_mean": float(np.mean([g.n_tokens for g in run.generations])),
            "max_new_tokens": options.max_new_tokens,
        },
        "layer_scores": _layer_scores_summary(options, avss, prof, layers),
        "probes": {name: s.probe for name, s in scored.items() if s.probe is not None},
        "layer_choice": _layer_choice(scored, prof, layers, probe_rows),
        "leaderboard": _leaderboard(answers, scored, options, table),
        "table": table,
        "layer_probe_top": [{"layer": r.layer, "block_name": r.block_name, "auroc": r.values.get("auroc")}
                            for r in best],
    }
