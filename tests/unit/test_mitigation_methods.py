"""Mitigation methods on `tiny-random-llama`: the repaired contrastive pooling (flagged
massive-activation positions never reach the anchor), its InfoNCE diagnostic, and
activation steering (strength 0 is the base model; its patch reproduces the run on a fresh base)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app.config import Settings
from app.schemas import MitigateOptions, ModelSpec
from worker.mitigation.contrastive import (
    CandidateGroup,
    group_losses,
    infonce_diagnostic,
    massive_positions,
    pool,
)
from worker.mitigation.methods.contrastive import diagnostic_warnings
from worker.modelzoo import load_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(tmp_path_factory: pytest.TempPathFactory):
    return load_model(ModelSpec(name="tiny-random-llama", device="cpu"),
                      Settings(data_dir=tmp_path_factory.mktemp("d")), use_cache=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return _load(tmp_path_factory)


def _groups(n: int) -> list[CandidateGroup]:
    return [CandidateGroup(f"What is item number {i} called?", f"thing{i}", [f"thing{(i + 1) % n}", "no idea"])
            for i in range(n)]


def test_massive_positions_are_flagged_and_pooling_leaves_them_out() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g)
    h[0, 0, 3] = 500.0  # a massive activation at the first position of row 0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    flagged = massive_positions(h, mask)
    assert flagged.tolist() == [[True, False, False, False, False], [False] * 5]
    span = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
    pooled = pool(h, span, flagged, "unflagged_mean")
    assert torch.allclose(pooled[0], h[0, 1:3].mean(0)) and torch.allclose(pooled[1], h[1, :2].mean(0))
    assert torch.allclose(pool(h, span, flagged, "mean")[0], h[0, :3].mean(0))
    assert torch.equal(pool(h, span, flagged, "last_token"), torch.stack([h[0, 2], h[1, 1]]))
    # A span whose every position is flagged falls back to its last position.
    only = torch.zeros_like(span)
    only[0, 0] = True
    assert torch.equal(pool(h, only, flagged, "unflagged_mean")[0], h[0, 0])


def _inject(tiny, layer: int, value: float, channel: int):
    """A hook that writes `value` into `channel` of the first position of block `layer`'s output."""
    block = tiny.adapter.blocks(tiny.model)[layer].module

    def hook(_m, _a, out):
        y = out[0] if isinstance(out, tuple) else out
        y = y.clone()
        y[:, 0, channel] = value
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return block.register_forward_hook(hook)


@pytest.mark.parametrize("pooling", ["unflagged_mean", "last_token"])
def test_the_contrastive_anchor_excludes_flagged_positions(tiny, pooling) -> None:
    """The InfoNCE at a block does not depend on a massive activation at the first position
    (its size or channel), while the plain mean (the old anchor) does."""
    def nce(value: float, channel: int, how: str) -> float:
        handle = _inject(tiny, 2, value, channel)
        try:
            with torch.no_grad():
                return float(group_losses(tiny, [2], _groups(4), temperature=0.1, max_tokens=64, pooling=how)[0])
        finally:
            handle.remove()

    assert nce(1e4, 0, pooling) == pytest.approx(nce(1e6, 5, pooling), abs=1e-6)
    assert nce(1e4, 0, "mean") != pytest.approx(nce(1e6, 5, "mean"), abs=1e-3)


def test_the_infonce_diagnostic_says_when_the_loss_stays_at_chance() -> None:
    groups = _groups(4)  # 3 candidates each: chance ln 3
    stuck = infonce_diagnostic(1.0990, 1.0970, groups, {"positions": 10.0, "flagged": 1.0}, "mean")
    assert stuck["at_chance"] and stuck["chance"] == pytest.approx(1.098612, abs=1e-6)
    assert stuck["flagged_share"] == pytest.approx(0.1)
    assert "stayed at chance" in diagnostic_warnings(stuck)[0]
    learned = infonce_diagnostic(1.09, 0.60, groups, {}, "unflagged_mean")
    assert not learned["at_chance"] and not learned["did_not_fall"] and diagnostic_warnings(learned) == []
    rose = infonce_diagnostic(0.70, 0.80, groups, {}, "unflagged_mean")
    assert rose["did_not_fall"] and "did not fall" in diagnostic_warnings(rose)[0]
    # Gemma-3 on SciQ: 99.98% of positions flagged, so "unflagged" pooling was last-token pooling.
    swamped = infonce_diagnostic(1.09, 0.60, groups, {"positions": 10.0, "flagged": 9.0}, "unflagged_mean")
    assert ["flagged 90% of the pooled positions" in w for w in diagnostic_warnings(swamped)] == [True]
    assert diagnostic_warnings(infonce_diagnostic(1.09, 0.60, groups, {"positions": 10.0, "flagged": 9.0}, "mean")) == []


def test_training_reports_the_diagnostic_in_the_recipe(tiny) -> None:
    from worker.mitigation.methods import METHODS, MethodInput, TuningData
    from worker.stage import JobContext

    options = MitigateOptions(epochs=1, batch_size=4, learning_rate=1e-2, n_boot=20, top_k=1, seed=0)
    data = TuningData(_groups(8), _groups(8)[:3], 0, 2.0)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    patch = METHODS["contrastive"].fit(MethodInput(tiny, "eavss", [1], data, options, JobContext(), lambda d, t: None))
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # fit leaves the model as it was
    d = patch.report["diagnostic"]
    assert d["pooling"] == "unflagged_mean" and d["tuning_infonce_before"] is not None
    assert d["chance"] == pytest.approx(1.098612, abs=1e-6)


# ------------------------------------------------------------------ steering

def _steer_options(**kw) -> MitigateOptions:
    base = dict(batch_size=4, n_boot=20, top_k=1, seed=0, method="steering")
    base.update(kw)
    return MitigateOptions(**base)


def _logits(loaded, text: str = "Question: what is item number 3 called?\nAnswer: thing3") -> torch.Tensor:
    ids = loaded.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits


def test_steering_with_strength_zero_reproduces_the_base_logits_exactly(tiny) -> None:
    from worker.mitigation.methods import METHODS, MethodInput, TuningData
    from worker.stage import JobContext

    base = _logits(tiny)
    data = TuningData(_groups(8), _groups(8)[:3], 0, 2.0)
    patch = METHODS["steering"].fit(
        MethodInput(tiny, "eavss", [1, 2], data, _steer_options(steering_strengths=[0.0]), JobContext(),
                    lambda d, t: None))
    assert patch.report["strength"] == 0.0 and "adds nothing" in patch.warnings[0]
    assert torch.equal(_logits(tiny), base)  # fit left no hook behind
    with patch.applied(tiny):
        assert torch.equal(_logits(tiny), base)
    # Strength 0 of a real direction is the base model too, bit for bit.
    from worker.mitigation.methods.steering import SteeringPatch, steering_directions

    dirs, sigma, _ = steering_directions(tiny, [1, 2], data.fit, _steer_options())
    zero = SteeringPatch("steering", [1, 2], {k: 0.0 * sigma[k] * d for k, d in dirs.items()})
    with zero.applied(tiny):
        assert torch.equal(_logits(tiny), base)
    some = SteeringPatch("steering", [1, 2], {k: 2.0 * sigma[k] * d for k, d in dirs.items()})
    with some.applied(tiny):
        assert not torch.equal(_logits(tiny), base)  # the check can fail
    assert torch.equal(_logits(tiny), base)


def test_the_steering_patch_applied_to_a_fresh_base_reproduces_the_steered_logits(tiny, tmp_path_factory) -> None:
    from worker.mitigation.methods import METHODS, MethodInput, TuningData
    from worker.mitigation.methods.steering import SteeringPatch, _block_digests
    from worker.mitigation.patch import apply_patch
    from worker.stage import JobContext, JobFailed

    data = TuningData(_groups(8), _groups(8)[:3], 0, 2.0)
    fitted = METHODS["steering"].fit(
        MethodInput(tiny, "eavss", [2], data, _steer_options(steering_strengths=[1.0, 4.0]), JobContext(),
                    lambda d, t: None))
    assert [c["strength"] for c in fitted.report["strengths"]] == [0.0, 1.0, 4.0]
    # Whatever strength validation chose, a non-zero one must travel too.
    patch = SteeringPatch("steering", [2], {k: 3.0 * v / (v.norm() or 1) for k, v in
                                            {2: torch.ones(tiny.model.config.hidden_size)}.items()},
                          _block_digests(tiny, [2]), fitted.report)
    for p in (fitted, patch):
        data_bytes = p.to_bytes({"base_model": "tiny-random-llama", "layers": [2]})
        with p.applied(tiny):
            steered = _logits(tiny)
        fresh = _load(tmp_path_factory)
        recipe = apply_patch(fresh, data_bytes)
        assert recipe["method"] == "steering" and recipe["layers"] == [2]
        assert torch.equal(_logits(fresh), steered)
    assert not torch.equal(_logits(tiny), steered)

    # On another base (different weights in the steered block) it is refused.
    other = _load(tmp_path_factory)
    with torch.no_grad():
        params = [p for n, p in other.model.named_parameters() if ".2." in n]
        params[0].add_(1e-3)
    with pytest.raises(JobFailed) as exc:
        apply_patch(other, patch.to_bytes({"base_model": "tiny-random-llama"}))
    assert exc.value.error_type == "patch_mismatch"


def test_the_stage_runs_steering_with_its_control_and_leaves_no_hook(tiny) -> None:
    from app.schemas import HallucinationOptions
    from worker.hallucination.stage import split_examples
    from worker.mitigation.stage import run_mitigate_stage
    from worker.stage import JobContext

    base = _logits(tiny)
    examples = [{"question": f"What is item number {i} called?", "answer": f"thing{i}; alias{i}"} for i in range(60)]
    train, test = split_examples(examples, 0.3, 0)
    res = run_mitigate_stage(
        tiny, train, test, _steer_options(steering_strengths=[1.0]), JobContext(),
        hallucination_options=HallucinationOptions(n_shots=2, max_new_tokens=3, n_boot=10, probe_l2=1.0),
        dataset_name="toy",
    )
    assert torch.equal(_logits(tiny), base)
    s = res.summary
    assert s["method"] == "steering" and set(s["training"]) == {"eavss", "random"}
    assert s["training"]["eavss"]["strength"] in (0.0, 1.0)
    assert {"variant=steering", "delta=eavss-random"} - {m.scope for m in res.metrics} == {"variant=steering"}
    assert {a.name for a in res.artifacts} == {"mitigation.safetensors", "mitigation_recipe.json", "before_after.md",
                                                 "mitigation.png", "mitigation.svg", "mitigation_card.md"}
    assert all(r.values["weight_change"] is None for r in res.layers)


# ------------------------------------------------------------------ several methods in one analysis


def test_one_analysis_compares_several_methods_on_the_same_split_and_layers(tiny, tmp_path_factory) -> None:
    from app.schemas import HallucinationOptions, PatchSpec
    from worker.hallucination.stage import split_examples
    from worker.mitigation.patch import apply_patch, read_patch, read_patch_source
    from worker.mitigation.stage import run_mitigate_stage
    from worker.stage import JobContext, JobFailed

    base = _logits(tiny)
    examples = [{"question": f"What is item number {i} called?", "answer": f"thing{i}; alias{i}"} for i in range(60)]
    train, test = split_examples(examples, 0.3, 0)
    res = run_mitigate_stage(
        tiny, train, test, _steer_options(method=["steering", "dola"], steering_strengths=[1.0]), JobContext(),
        hallucination_options=HallucinationOptions(n_shots=2, max_new_tokens=3, n_boot=10, probe_l2=1.0),
        dataset_name="toy",
    )
    assert torch.equal(_logits(tiny), base)
    s = res.summary
    assert s["methods"] == ["steering", "dola"]
    assert set(s["training"]) == {"steering_eavss", "steering_random", "dola_eavss", "dola_random"}
    scopes = {m.scope for m in res.metrics}
    assert {"variant=base", "variant=steering_eavss", "variant=dola_random", "delta=dola_eavss-base",
            "delta=steering_eavss-steering_random", "delta=dola_eavss-dola_random"} <= scopes
    assert not {"variant=eavss", "delta=eavss-random"} & scopes
    # Every variant answered the same test questions; the base row is shared.
    acc = {m.scope: m for m in res.metrics if m.name == "accuracy"}
    assert len({acc[f"variant={v}"].n for v in ("base", "steering_eavss", "dola_eavss", "dola_random")}) == 1
    names = {a.name for a in res.artifacts}
    assert {"mitigation-steering.safetensors", "mitigation-dola.safetensors", "mitigation_recipe-dola.json",
            "mitigation_card-steering.md", "mitigation_card-dola.md", "before_after.md"} <= names
    assert "mitigation.safetensors" not in names
    table = next(a for a in res.artifacts if a.name == "before_after.md").data.decode()
    assert "steering_eavss - steering_random" in table and "dola_eavss - base" in table
    card = next(a for a in res.artifacts if a.name == "mitigation_card-dola.md").data.decode()
    assert "dola_eavss" in card and "steering_eavss" not in card  # a method's card carries its own rows
    assert "card_artifact: mitigation_card-dola.md" in card  # the verdicts are written into it

    # model.patch picks a method's file; its recipe must name that method.
    files = {a.name: a.data for a in res.artifacts}
    ctx = JobContext(read_artifact=lambda _id, name: files.get(name))
    aid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    data = read_patch_source(PatchSpec(analysis_id=aid, method="dola"), Settings(), ctx)
    assert read_patch(data)[1]["method"] == "dola"
    with pytest.raises(JobFailed, match="model.patch.method"):
        read_patch_source(PatchSpec(analysis_id=aid), Settings(), ctx)
    with pytest.raises(JobFailed, match="contrastive"):
        read_patch_source(PatchSpec(analysis_id=aid, method="contrastive"), Settings(), ctx)
    fresh = _load(tmp_path_factory)
    with pytest.raises(JobFailed, match="model.patch.method is 'dola' but the patch was made by 'steering'"):
        apply_patch(fresh, files["mitigation-steering.safetensors"], expected_method="dola")
    recipe = apply_patch(fresh, files["mitigation-steering.safetensors"], expected_method="steering")
    assert recipe["method"] == "steering" and recipe["layers"] == s["layers"]


def test_the_method_list_is_validated() -> None:
    from pydantic import ValidationError

    assert MitigateOptions(method=["dola"]).methods == ["dola"] and not MitigateOptions(method=["dola"]).compares_methods
    assert MitigateOptions(method=["dola", "steering"]).compares_methods
    for bad in ([], ["dola", "dola"], ["dola", "beam"]):
        with pytest.raises(ValidationError):
            MitigateOptions(method=bad)


def test_the_fluency_guard_keeps_a_strength_that_breaks_the_gold_answers_out(tiny, monkeypatch) -> None:
    from worker.mitigation.methods import METHODS, MethodInput, TuningData
    from worker.mitigation.methods import steering as steering_module
    from worker.stage import JobContext

    # Validation as the TruthfulQA run saw it: strength 16 wins one more question but costs 9 nats per gold token.
    scores = {0.0: (0.455, -3.07), 2.0: (0.455, -3.71), 16.0: (0.545, -12.28)}
    strengths = iter(sorted(scores))
    monkeypatch.setattr(steering_module, "multiple_choice", lambda *a, **k: scores[next(strengths)])
    data = TuningData(_groups(8), _groups(8)[:3], 0, 2.0)
    patch = METHODS["steering"].fit(MethodInput(tiny, "eavss", [1], data, _steer_options(steering_strengths=[2.0, 16.0]),
                                                JobContext(), lambda d, t: None))
    assert patch.report["strength"] == 0.0
    assert [c["fluent"] for c in patch.report["strengths"]] == [True, True, False]
    assert "strength 16 scored best" in patch.warnings[0] and "-12.28" in patch.warnings[0]
    strengths = iter(sorted(scores))
    loose = METHODS["steering"].fit(MethodInput(
        tiny, "eavss", [1], data, _steer_options(steering_strengths=[2.0, 16.0], steering_max_logprob_drop=10.0),
        JobContext(), lambda d, t: None))
    assert loose.report["strength"] == 16.0 and not any("scored best" in w for w in loose.warnings)
