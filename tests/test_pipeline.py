"""The pipeline end to end on a tiny random model: stages in order, each result handed to `save`."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.schemas import AnalysisSpec
from worker.pipeline import run_pipeline
from worker.stage import JobContext, StageResult

ROWS = [{"text": f"sentence number {i} about the layers of a small model"} for i in range(8)]
QA = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(4)]


def run(spec: dict, tmp_path: Path) -> dict[str, StageResult]:
    saved: dict[str, StageResult] = {}
    progress: list[str] = []
    ctx = JobContext(progress=lambda stage, done, total: progress.append(stage))
    run_pipeline(AnalysisSpec.model_validate(spec), ctx, Settings(data_dir=tmp_path),
                 lambda r: saved.__setitem__(r.stage, r))
    assert progress[0] == "load_model"
    return saved


def test_prune_stage_ranks_by_avss_and_baselines(tmp_path: Path) -> None:
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS + QA, "limit": 12, "max_tokens": 32},
        "stages": {"prune": {"scorers": ["avss", "block_influence", "cim"], "tasks": ["perplexity"],
                             "random_seeds": 2, "timing_runs": 1, "n_boot": 50, "scoring_examples": 4}},
    }
    saved = run(spec, tmp_path)
    assert set(saved) == {"avss", "prune"}  # avss pulled in because prune ranks by it
    prune = saved["prune"]
    scopes = {m.scope for m in prune.metrics}
    assert any("scorer=avss" in s for s in scopes) and any("scorer=block_influence" in s for s in scopes)
    assert {r.scorer for r in prune.layers} >= {"block_influence", "cim"}
    # Ranks are ints and the prune flag a bool, from every scorer (app/layervalues.py).
    assert all(type(r.values["rank"]) is int and type(r.values["prune"]) is bool for r in prune.layers)
    assert all(type(r.values["count"]) is int and type(r.values["massive"]) is bool for r in saved["avss"].layers)
    assert all(type(t["runs"]) is int for t in prune.summary["timing"].values())
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
    assert {a.name for a in result.artifacts} >= {"answers.jsonl", "answers.csv"}


def test_exact_sparsity_counts_relative_thresholds_in_a_second_pass(tmp_path: Path) -> None:
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS, "max_tokens": 32},
        "stages": {"profile": {"sites": ["block_output", "mlp_activation"]},
                   "avss": {"exact_sparsity": True, "plots": False}},
    }
    progress: list[str] = []
    saved: dict[str, StageResult] = {}
    ctx = JobContext(progress=lambda stage, done, total: progress.append(stage))
    run_pipeline(AnalysisSpec.model_validate(spec), ctx, Settings(data_dir=tmp_path),
                 lambda r: saved.__setitem__(r.stage, r))
    threshold = saved["avss"].summary["threshold"]
    assert threshold["exact"] is True and threshold["method"] == "exact" and threshold["max_bound"] == 0.0
    assert saved["avss"].summary["leading_positions"]["sparsity"]["exact"] is True
    assert all(r.values["sparsity_bound"] == 0.0 for r in saved["avss"].layers)
    for row in saved["profile"].layers:  # the profile stage's 0.01 x RMS is counted too
        assert row.values["block_output.sparsity_rel_bound"] == 0.0
        assert row.values["mlp_activation.sparsity_rel_bound"] == 0.0
