"""The pipeline end to end on a tiny random model: stages in order, each result handed to `save`."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.schemas import AnalysisSpec
from worker.pipeline import run_pipeline
from worker.progress import stage_of
from worker.stage import JobContext, StageResult

ROWS = [{"text": f"sentence number {i} about the layers of a small model"} for i in range(8)]
QA = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(4)]


def run(spec: dict, tmp_path: Path) -> dict[str, StageResult]:
    saved: dict[str, StageResult] = {}
    progress: list[tuple[str, int, int]] = []
    ctx = JobContext(progress=lambda stage, done, total: progress.append((stage, done, total)))
    run_pipeline(AnalysisSpec.model_validate(spec), ctx, Settings(data_dir=tmp_path),
                 lambda r: saved.__setitem__(r.stage, r))
    assert progress[0][0] == "load_model"
    assert_monotonic(progress)
    return saved


def assert_monotonic(progress: list[tuple[str, int, int]]) -> None:
    """What every stage reports (before the job service's guard): per stage (the name before
    `:`), one total and a done that never goes back, ending full; each stage reported once."""
    stages = [stage_of(name) for name, _, _ in progress]
    order = list(dict.fromkeys(stages))
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == order, order  # no stage re-entered
    for stage in order:
        seen = [(d, t) for name, d, t in progress if stage_of(name) == stage]
        assert len({t for _, t in seen}) == 1, (stage, seen)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen), (stage, seen)
        assert seen[-1][0] == seen[-1][1], (stage, seen)


def test_prune_stage_ranks_by_avss_and_baselines(tmp_path: Path) -> None:
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS + QA, "limit": 12, "max_tokens": 32},
        "stages": {"prune": {"scorers": ["avss", "block_influence", "cim"], "tasks": ["perplexity"],
                             "random_seeds": 2, "timing_runs": 1, "n_boot": 50, "scoring_examples": 4,
                             "curve_blocks": [1, 2],
                             "perplexity_dataset": {"rows": [{"text": "held-out words about a quiet harbour"},
                                                             {"text": "and one more unseen sentence"}]}}},
    }
    saved = run(spec, tmp_path)  # the curve's prunings are phases of the one bar (monotonic)
    assert set(saved) == {"avss", "prune"}  # avss pulled in because prune ranks by it
    prune = saved["prune"]
    assert prune.summary["table"][0]["n"] == 2  # perplexity on the held-out rows, loaded by the stage
    assert prune.summary["curve"]["blocks"] == [1, 2]
    assert {m.scope for m in prune.metrics} >= {"task=perplexity,scorer=cim,removed=2",
                                                "task=perplexity,scorer=random,removed=1"}
    scopes = {m.scope for m in prune.metrics}
    assert any("scorer=avss" in s for s in scopes) and any("scorer=block_influence" in s for s in scopes)
    assert {r.scorer for r in prune.layers} >= {"block_influence", "cim"}
    # Ranks are ints and the prune flag a bool, from every scorer (app/layervalues.py).
    assert all(type(r.values["rank"]) is int and type(r.values["prune"]) is bool for r in prune.layers)
    assert all(type(r.values["count"]) is int and type(r.values["massive"]) is bool for r in saved["avss"].layers)
    assert all(type(t["runs"]) is int for t in prune.summary["timing"].values())
    assert {"prune.png", "prune.svg"} <= {a.name for a in prune.artifacts}  # the dashboard's prune panel
    # Timed once, by the pipeline, for every stored stage.
    assert all(isinstance(r.summary["seconds"], float) for r in saved.values())


def test_hallucination_stage_through_the_pipeline(tmp_path: Path) -> None:
    qa = [{"question": f"What number comes after {i}?", "answer": str(i + 1)} for i in range(16)]
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": qa, "limit": 16, "max_tokens": 64},
        "stages": {"hallucination": {"n_shots": 2, "max_new_tokens": 3, "n_boot": 20, "probe_l2": 1.0,
                                     "detectors": ["sequence_likelihood", "length", "p_ik"],
                                     "layer_probes": False}},
    }
    saved = run(spec, tmp_path)
    result = saved["hallucination"]
    assert {m.scope for m in result.metrics} >= {"detector=sequence_likelihood", "detector=length"}
    assert {r.scorer for r in result.layers} == {"eavss"} and len(result.layers) == 4
    assert all(type(r.values[k]) is int for r in result.layers for k in ("rank", "n_correct", "n_hallucinated"))
    assert {a.name for a in result.artifacts} >= {"answers.jsonl", "answers.csv", "hallucination.png",
                                                  "hallucination.svg"}
    assert not any("figures skipped" in w for w in result.warnings)


def test_exact_sparsity_counts_relative_thresholds_in_a_second_pass(tmp_path: Path) -> None:
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS, "max_tokens": 32},
        "stages": {"profile": {"sites": ["block_output", "mlp_activation"]},
                   "avss": {"exact_sparsity": True, "plots": False}},
    }
    saved = run(spec, tmp_path)  # the second pass continues the profile bar (checked in run)
    threshold = saved["avss"].summary["threshold"]
    assert threshold["exact"] is True and threshold["method"] == "exact" and threshold["max_bound"] == 0.0
    assert saved["avss"].summary["leading_positions"]["sparsity"]["exact"] is True
    assert all(r.values["sparsity_bound"] == 0.0 for r in saved["avss"].layers)
    for row in saved["profile"].layers:  # the profile stage's 0.01 x RMS is counted too
        assert row.values["block_output.sparsity_rel_bound"] == 0.0
        assert row.values["mlp_activation.sparsity_rel_bound"] == 0.0


def test_prune_progress_is_one_bar_labelled_by_phase(tmp_path: Path) -> None:
    """Scoring, the original model and every pruned model fill one `prune` bar: each phase reports
    under its own name, the numbers never go back (before: 0/2 -> 2/2 -> 0/2 per pruned model)."""
    progress: list[tuple[str, int, int]] = []
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS, "limit": 8, "max_tokens": 24},
        "stages": {"prune": {"scorers": ["avss", "block_influence"], "tasks": ["perplexity"], "random_seeds": 2,
                             "timing_runs": 0, "n_boot": 20, "scoring_examples": 4}},
    }
    ctx = JobContext(progress=lambda stage, done, total: progress.append((stage, done, total)))
    run_pipeline(AnalysisSpec.model_validate(spec), ctx, Settings(data_dir=tmp_path), lambda r: None)
    assert_monotonic(progress)
    prune = [(n, d, t) for n, d, t in progress if n.startswith("prune")]
    names = list(dict.fromkeys(n for n, _, _ in prune))
    assert names[:3] == ["prune", "prune:score:block_influence", "prune:original:perplexity"]
    assert any(n.startswith("prune:pruned 1/") for n in names) and prune[-1][0] == "prune"


def test_prune_with_healing_loads_its_corpus_and_keeps_one_bar(tmp_path: Path) -> None:
    """`heal.dataset` is loaded by the stage; the healing of each pruned model and its evaluation
    are phases of the prune bar (checked by `run`); evaluated texts are left out of the corpus."""
    heal_rows = [{"text": f"a healing line {i} about rivers, cats and the sea"} for i in range(12)] + ROWS[:2]
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS, "limit": 8, "max_tokens": 24},
        "stages": {"prune": {"scorers": ["block_influence"], "tasks": ["perplexity"], "random_seeds": 1,
                             "timing_runs": 0, "n_boot": 20, "scoring_examples": 4,
                             "heal": {"steps": 2, "max_tokens": 16, "dataset": {"rows": heal_rows, "limit": 100}}}},
    }
    healing = run(spec, tmp_path)["prune"].summary["healing"]
    assert healing["corpus"] == {"texts": 12, "left_out_overlapping_evaluated": 2, "sequences": healing["corpus"]["sequences"]}
    assert set(healing["models"]) == {"block_influence", "random,seed=0"}
