"""Model cards: front matter and body from one call, the body a pure function of the front matter
(re-rendered with the verdicts); an exported pruned or healed model carries its card, and the same
card is its own artifact."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import yaml

from app.modelcard import card_artifact_name, is_card_artifact, parse_front_matter, render_model_card
from app.schemas import AnalysisSpec
from worker.modelcard import Provenance, read_model_card, write_model_card
from worker.stage import MetricRow


def _spec() -> AnalysisSpec:
    return AnalysisSpec.model_validate({
        "model": {"name": "org/base", "revision": "abc123"}, "dataset": {"rows": [{"text": "hello"}]},
        "stages": {"prune": {"fraction": 0.25}}, "gate_policy": "release",
    })


def test_card_names_base_revision_analysis_layers_metrics_and_pending_verdicts(tmp_path: Path) -> None:
    prov = Provenance.of(_spec(), analysis_id="a" * 36)
    path = write_model_card(
        tmp_path, prov, kind="pruned", removed_layers=[3, 1], scores={"avss": {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2}},
        metrics=[MetricRow("task=perplexity,scorer=avss", "retained_pct", 91.5, 88.0, 94.0, 32),
                 MetricRow("task=perplexity,scorer=avss", "perplexity", float("inf"))],
    )
    assert path == tmp_path / "README.md"
    front = read_model_card(tmp_path)
    assert front["base_model"] == "org/base" and front["base_model_revision"] == "abc123"
    block = front["layerscope"]
    assert block["analysis_id"] == "a" * 36
    assert block["spec"]["gate_policy"] == "release" and block["spec"]["model"]["revision"] == "abc123"
    assert block["removed_layers"] == [1, 3] and block["tuned_layers"] is None
    assert block["scores"]["avss"][2] == 0.9
    retained = block["metrics"][0]
    assert (retained["value"], retained["ci_low"], retained["ci_high"], retained["n"]) == (91.5, 88.0, 94.0, 32)
    assert block["metrics"][1]["value"] is None  # no inf in a card
    assert block["gate_verdicts"] == "pending"
    body = path.read_text()
    assert "Removed layers: 1, 3." in body and "[88, 94]" in body and "Pending" in body


def test_card_with_verdicts_lists_failing_rules(tmp_path: Path) -> None:
    verdicts = [
        {"id": "v1", "policy": "release", "policy_version": 2, "passed": False, "verdict": "fail", "error": None,
         "rules": [{"rule": "retained_performance.perplexity >= 0.9", "passed": False},
                   {"rule": "warnings == 0", "passed": True}]},
    ]
    write_model_card(tmp_path, Provenance("org/base"), kind="healed", tuned_layers=[4], verdicts=verdicts)
    block = read_model_card(tmp_path)["layerscope"]
    assert block["gate_verdicts"] == [{"policy": "release", "policy_version": 2, "verdict": "fail",
                                       "failing_rules": ["retained_performance.perplexity >= 0.9"], "error": None,
                                       "id": "v1", "trigger": None, "created_at": None}]
    assert block["tuned_layers"] == [4]
    assert "release@2: **fail**" in (tmp_path / "README.md").read_text()
    assert yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])["tags"] == ["layerscope", "healed"]


def test_render_fills_the_verdicts_into_a_pending_card_from_its_front_matter(tmp_path: Path) -> None:
    prov = Provenance.of(_spec(), analysis_id="a" * 36)
    kw = dict(kind="pruned", removed_layers=[1], scores={"avss": {0: 0.5, 1: 0.1}}, notes=["a note"],
              metrics=[MetricRow("task=perplexity,scorer=avss", "retained_pct", 91.5, 88.0, 94.0, 32)])
    pending = write_model_card(tmp_path / "p", prov, card_artifact="pruned-model-avss.card.md", **kw).read_text()
    assert render_model_card(parse_front_matter(pending)) == pending  # the body is the front matter's
    assert f"artifact `pruned-model-avss.card.md` (`GET /v1/analyses/{'a' * 36}/artifacts/pruned-model-avss.card.md`)" \
        in pending and "a card packed inside an exported archive keeps this text" in pending
    verdicts = [
        {"id": "v1", "policy": "release", "policy_version": 3, "passed": False, "verdict": "fail", "error": None,
         "trigger": "spec", "created_at": "2026-01-02T03:04:05+00:00",
         "rules": [{"rule": "warnings == 0", "passed": False}, {"rule": "layers.avss.warnings == 0", "passed": True}]},
        {"id": "v2", "policy": "lenient", "policy_version": 1, "passed": True, "rules": [], "error": None},
    ]
    text = render_model_card(parse_front_matter(pending), verdicts)
    front = parse_front_matter(text)
    assert [(v["policy"], v["policy_version"], v["verdict"], v["failing_rules"]) for v in front["layerscope"]["gate_verdicts"]] \
        == [("release", 3, "fail", ["warnings == 0"]), ("lenient", 1, "pass", [])]
    assert "- release@3: **fail** (failing rules: warnings == 0); verdict `v1` (spec, 2026-01-02T03:04:05+00:00)" in text
    assert "- lenient@1: **pass** (failing rules: none)" in text and "Pending" not in text
    assert text.endswith("Note: a note\n") and "Removed layers: 1." in text
    assert render_model_card(front) == text == render_model_card(front, front["layerscope"]["gate_verdicts"])
    # The same text as a card written with the verdicts at once; nothing else in the front matter changed.
    assert write_model_card(tmp_path / "v", prov, card_artifact="pruned-model-avss.card.md", verdicts=verdicts,
                            **kw).read_text() == text
    before = parse_front_matter(pending)
    assert {k: v for k, v in front["layerscope"].items() if k != "gate_verdicts"} == \
        {k: v for k, v in before["layerscope"].items() if k != "gate_verdicts"}
    assert "No gate policy was evaluated." in render_model_card(before, [])
    assert card_artifact_name("healed-model-avss.tar.gz") == "healed-model-avss.card.md"
    assert [n for n in ("mitigation_card.md", "mitigation_card-dola.md", "pruned-model-avss.card.md", "before_after.md",
                        "mitigation_recipe.json") if is_card_artifact(n)] == \
        ["mitigation_card.md", "mitigation_card-dola.md", "pruned-model-avss.card.md"]


def test_exported_pruned_model_carries_its_card() -> None:
    import torch

    from worker.modelzoo.loading import _tiny_random
    from worker.pruning import export_pruned_model

    model, tokenizer, _ = _tiny_random("llama", torch.float32)
    blob = export_pruned_model(model, tokenizer, lambda folder: write_model_card(
        folder, Provenance("tiny-random-llama"), kind="pruned", removed_layers=[0]))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        card = tar.extractfile("pruned-model/README.md")
        assert card is not None
        text = card.read().decode()
    assert "pruned-model/model.safetensors" in names
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["layerscope"]["removed_layers"] == [0] and front["base_model"] == "tiny-random-llama"


def test_prune_stage_export_card_matches_the_result(tmp_path: Path, monkeypatch) -> None:
    from app.config import Settings
    from app.schemas import ModelSpec, PruneOptions
    from worker.modelzoo import load_model
    from worker.pruning import run_prune_stage
    from worker.scoring.agreement import Ranking
    from worker.stage import JobContext

    loaded = load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path))
    spec = AnalysisSpec.model_validate({"model": {"name": "tiny-random-llama"}, "dataset": {"rows": [{"text": "x"}]},
                                        "stages": {"prune": {"export": True, "scorers": ["avss"]}}})
    options = PruneOptions(fraction=0.5, scorers=["avss"], tasks=["perplexity"], random_seeds=1, n_boot=20,
                           timing_runs=0, export=True, push_to_hub={"repo_id": "org/pruned"})
    monkeypatch.delenv("HF_TOKEN", raising=False)  # asked to push without a token: a warning, never a failure
    texts = [{"text": "the cat sat on the mat and looked at the birds"}, {"text": "rivers flow to the sea"}]
    ranking = {"avss": Ranking((1, 2, 3, 0), "lowest", (0.4, 0.1, 0.2, 0.3))}
    result = run_prune_stage(loaded, texts, options, JobContext(), ranking, provenance=Provenance.of(spec, loaded, "b" * 36))
    blob = next(a for a in result.artifacts if a.name == "pruned-model-avss.tar.gz").data
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        card = tar.extractfile("pruned-model/README.md")
        assert card is not None
        packed = card.read()
        front = yaml.safe_load(packed.decode().split("---\n")[1])
    standalone = next(a for a in result.artifacts if a.name == "pruned-model-avss.card.md")
    assert standalone.data == packed and standalone.media_type == "text/markdown"
    block = front["layerscope"]
    assert block["card_artifact"] == "pruned-model-avss.card.md" and block["gate_verdicts"] == "pending"
    assert block["analysis_id"] == "b" * 36 and block["base_model_source"] == "builtin:tiny-random-llama"
    assert block["removed_layers"] == sorted(result.summary["layers_removed"]["avss"])
    stored = {(m.scope, m.name): m for m in result.metrics}
    for m in block["metrics"]:
        row = stored[(m["scope"], m["name"])]
        assert (m["value"], m["ci_low"], m["ci_high"], m["n"]) == (row.value, row.ci_low, row.ci_high, row.n)
    scopes = {m["scope"] for m in block["metrics"]}
    assert scopes == {"task=perplexity,scorer=avss", "task=perplexity,scorer=original", "scorer=avss"}
    assert any(m["ci_low"] is not None for m in block["metrics"])
    assert any(w.startswith("push_to_hub to org/pruned skipped: RuntimeError") and "HF_TOKEN" in w
               for w in result.warnings), result.warnings


def test_healed_export_carries_a_card_with_its_metrics(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    from app.config import Settings
    from app.schemas import ModelSpec, PruneOptions
    from worker.modelzoo import load_model
    from worker.pruning import run_prune_stage
    from worker.scoring.agreement import Ranking
    from worker.stage import JobContext

    loaded = load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path))
    spec = AnalysisSpec.model_validate({"model": {"name": "tiny-random-llama"}, "dataset": {"rows": [{"text": "x"}]},
                                        "stages": {"prune": {"scorers": ["avss"]}}})
    options = PruneOptions(scorers=["avss"], fraction=0.5, random_seeds=0, n_boot=20, timing_runs=0, tasks=["perplexity"],
                           heal={"steps": 2, "max_tokens": 16, "rank": 4, "random_seeds": 0, "export": True,
                                 "push_to_hub": {"repo_id": "org/healed", "private": False}})
    uploads: list[dict] = []

    class FakeHub:  # the hub's client only (no network in tests): what push_to_hub would send
        def __init__(self, token: str) -> None:
            assert token == "hf_test"

        def create_repo(self, repo_id: str, private: bool, exist_ok: bool) -> None:
            uploads.append({"repo": repo_id, "private": private})

        def upload_folder(self, folder_path: str, repo_id: str, commit_message: str) -> str:
            uploads[-1]["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    texts = [{"text": "the cat sat on the mat and looked at the birds"}, {"text": "a short line of text to read"}]
    heal = [{"text": "rivers flow down from the mountains to the sea"}, {"text": "birds sing in the early morning"}]
    ranking = {"avss": Ranking((1, 2, 3, 0), "lowest", (0.4, 0.1, 0.2, 0.3))}
    result = run_prune_stage(loaded, texts, options, JobContext(), ranking, heal_examples=heal,
                             provenance=Provenance.of(spec, loaded, "c" * 36))
    blob = next(a for a in result.artifacts if a.name == "healed-model-avss.tar.gz").data
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        card = tar.extractfile("healed-model/README.md")
        assert card is not None
        packed = card.read()
        block = yaml.safe_load(packed.decode().split("---\n")[1])["layerscope"]
    assert next(a for a in result.artifacts if a.name == "healed-model-avss.card.md").data == packed
    assert [(u["repo"], u["private"]) for u in uploads] == [("org/healed", False)]
    assert uploads[0]["files"]["README.md"] == packed and "model.safetensors" in uploads[0]["files"]
    assert not any("push_to_hub" in w for w in result.warnings)
    assert block["card_artifact"] == "healed-model-avss.card.md"
    assert block["kind"] == "healed" and block["analysis_id"] == "c" * 36
    assert block["removed_layers"] == sorted(result.summary["layers_removed"]["avss"]) == [1, 2]
    assert block["tuned_layers"] == [0, 3]
    assert block["healing"]["steps"] == 2
    ppl = next(m for m in block["metrics"] if m["name"] == "perplexity")
    assert ppl["scope"] == "task=perplexity,scorer=avss,variant=healed" and ppl["ci_low"] <= ppl["value"] <= ppl["ci_high"]


def test_push_to_hub_needs_the_export_it_uploads() -> None:
    import pytest
    from pydantic import ValidationError

    from app.schemas import HealOptions, PruneOptions

    with pytest.raises(ValidationError, match="set export to true"):
        PruneOptions(push_to_hub={"repo_id": "org/m"})
    with pytest.raises(ValidationError, match="set export to true"):
        HealOptions(push_to_hub={"repo_id": "org/m"})
    with pytest.raises(ValidationError):
        PruneOptions(export=True, push_to_hub={"repo_id": "no-owner"})
