"""The mitigate stage on `tiny-random-llama`: frozen weights stay bit-identical, the patch
reproduces the tuned model, the base model comes back untouched, and bookkeeping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import yaml

from app.config import Settings
from app.schemas import AnalysisSpec, HallucinationOptions, MitigateOptions, ModelSpec
from worker.hallucination.stage import qa_item, split_examples
from worker.mitigation.contrastive import CandidateGroup, group_losses, train_blocks
from worker.mitigation.patch import apply_patch, block_parameters, save_patch, snapshot, tensor_digest
from worker.mitigation.stage import candidate_groups, run_mitigate_stage
from worker.modelzoo import load_model
from worker.stage import JobCancelled, JobContext, JobFailed


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(tmp_path_factory: pytest.TempPathFactory):
    return load_model(ModelSpec(name="tiny-random-llama", device="cpu"),
                      Settings(data_dir=tmp_path_factory.mktemp("d")), use_cache=False)


@pytest.fixture()
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return _load(tmp_path_factory)


def _examples(n: int) -> list[dict]:
    return [{"question": f"What is item number {i} called?", "answer": f"thing{i}; alias{i}"} for i in range(n)]


def _groups(n: int) -> list[CandidateGroup]:
    return [CandidateGroup(f"What is item number {i} called?", f"thing{i}", [f"thing{(i + 1) % n}", "no idea"])
            for i in range(n)]


def _opts(**kw) -> MitigateOptions:
    base = dict(epochs=2, batch_size=4, learning_rate=1e-2, n_boot=20, top_k=1, seed=0)
    base.update(kw)
    return MitigateOptions(**base)


def test_training_changes_only_the_tuned_blocks_and_keeps_frozen_weights_bit_identical(tiny) -> None:
    before = snapshot(dict(tiny.model.named_parameters()))
    flags = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    report = train_blocks(tiny, [1, 3], _groups(12), _groups(12)[:4], _opts(), JobContext())
    assert report.steps == 6 and report.epochs_run == 2
    tuned = set(block_parameters(tiny, [1, 3]))
    after = dict(tiny.model.named_parameters())
    for name, t in before.items():
        if name in tuned:
            continue
        assert torch.equal(after[name], t), name  # bit-identical, not merely close
    if report.best_epoch > 0:
        assert any(not torch.equal(after[n], before[n]) for n in tuned)
    assert {n: p.requires_grad for n, p in tiny.model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny.model.parameters())


def test_the_losses_are_finite_and_differentiable_only_in_the_tuned_block(tiny) -> None:
    params = block_parameters(tiny, [2])
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    nce, lm = group_losses(tiny, [2], _groups(3), temperature=0.1, max_tokens=64)
    assert torch.isfinite(nce) and torch.isfinite(lm) and nce > 0 and lm > 0
    (nce + lm).backward()
    assert all(p.grad is not None for p in params.values())
    assert all(p.grad is None for n, p in tiny.model.named_parameters() if n not in params)
    for p in tiny.model.parameters():
        p.requires_grad_(True)
        p.grad = None


def test_the_patch_applied_to_a_fresh_base_reproduces_the_tuned_logits(tiny, tmp_path_factory) -> None:
    params = block_parameters(tiny, [2])
    base = snapshot(params)
    digests = {n: tensor_digest(t) for n, t in base.items()}
    train_blocks(tiny, [2], _groups(12), _groups(12)[:4], _opts(epochs=1, patience=1), JobContext())
    data = save_patch(snapshot(params), digests, {"base_model": "tiny-random-llama", "layers": [2]})
    ids = tiny.tokenizer(["Question: what is it?\nAnswer: a thing"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned_logits = tiny.model(input_ids=ids).logits

    fresh = _load(tmp_path_factory)
    with torch.no_grad():
        assert not torch.equal(fresh.model(input_ids=ids).logits, tuned_logits)
    recipe = apply_patch(fresh, data)
    assert recipe["layers"] == [2]
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, tuned_logits)

    # The same patch on a model that is not its base is refused, not blended in.
    with pytest.raises(JobFailed) as exc:
        apply_patch(fresh, data)  # fresh now holds the tuned weights, not the base
    assert exc.value.error_type == "patch_mismatch"
    with pytest.raises(JobFailed) as exc:
        apply_patch(fresh, b"not a safetensors file at all")
    assert exc.value.error_type == "patch_invalid"


def test_a_patch_for_another_architecture_is_refused(tiny, tmp_path_factory) -> None:
    gpt2 = load_model(ModelSpec(name="tiny-random-gpt2", device="cpu"),
                      Settings(data_dir=tmp_path_factory.mktemp("g")), use_cache=False)
    params = block_parameters(gpt2, [0])
    data = save_patch(snapshot(params), {n: tensor_digest(p) for n, p in params.items()}, {"base_model": "gpt2"})
    with pytest.raises(JobFailed) as exc:
        apply_patch(tiny, data)
    assert exc.value.error_type == "patch_mismatch" and "lacks" in exc.value.detail


def test_cancelling_during_training_stops_and_the_weights_are_restored(tiny) -> None:
    before = snapshot(dict(tiny.model.named_parameters()))
    seen = {"training": False}

    def cancelled() -> bool:  # true once a training step asks (the model is in train mode only then)
        seen["training"] |= tiny.model.training
        return tiny.model.training

    train, test = split_examples(_examples(60), 0.3, 0)
    with pytest.raises(JobCancelled):
        run_mitigate_stage(tiny, train, test, _opts(), JobContext(is_cancelled=cancelled),
                           hallucination_options=HallucinationOptions(n_shots=2, max_new_tokens=3, n_boot=10,
                                                                      probe_l2=1.0))
    assert seen["training"]
    after = dict(tiny.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    assert not tiny.model.training and all(p.requires_grad for p in tiny.model.parameters())


def test_candidate_groups_use_the_own_wrong_answer_and_never_an_acceptable_one() -> None:
    items = [qa_item({"question": f"q{i}?", "answer": a}, "x") for i, a in
             enumerate(["Paris", "paris; city of light", "Rome", "Oslo"])]
    groups = candidate_groups(items, ["London", "Paris", "Rome", ""], [False, True, True, False], 2, seed=1,
                              rules=["exact", "contains"])
    by_q = {g.question: g for g in groups}
    assert by_q["q0?"].negatives[0] == "London" and len(by_q["q0?"].negatives) == 3
    # "Paris" is the gold of q1 as well: never a negative for q0 or q1.
    assert "Paris" not in by_q["q0?"].negatives and "paris" not in [n.lower() for n in by_q["q1?"].negatives]
    assert len(by_q["q3?"].negatives) == 2  # an empty own answer is no negative


def test_the_stage_restores_the_model_and_reports_every_variant(tiny) -> None:
    before = snapshot(dict(tiny.model.named_parameters()))
    events: list[tuple[str, int, int]] = []
    train, test = split_examples(_examples(60), 0.3, 0)
    res = run_mitigate_stage(
        tiny, train, test, _opts(), JobContext(progress=lambda s, d, t: events.append((s, d, t))),
        hallucination_options=HallucinationOptions(n_shots=2, max_new_tokens=3, n_boot=10, probe_l2=1.0),
        perplexity_texts=["the cat sat on the mat and then it went to sleep"] * 3, dataset_name="toy",
    )
    after = dict(tiny.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    s = res.summary
    assert len(s["layers"]) == 1 and len(s["control_layers"]) == 1 and set(s["layers"]).isdisjoint(s["control_layers"])
    assert s["layer_source"] == "base evaluation (probe part)"
    scopes = {m.scope for m in res.metrics}
    for scope in ("variant=base", "variant=eavss", "variant=random", "delta=eavss-base", "delta=random-base",
                  "delta=eavss-random", "variant=eavss,detector=p_ik", "delta=eavss-base,detector=p_ik"):
        assert scope in scopes, scope
    assert all(m.value is None or abs(m.value) < float("inf") for m in res.metrics)
    names = {a.name for a in res.artifacts}
    assert names == {"mitigation.safetensors", "mitigation_recipe.json", "before_after.md", "mitigation.png",
                     "mitigation.svg", "mitigation_card.md"}
    card = next(a.data for a in res.artifacts if a.name == "mitigation_card.md").decode()
    front = yaml.safe_load(card.split("---")[1])["layerscope"]
    assert front["kind"] == "patched" and front["tuned_layers"] == s["layers"] and front["method"] == "contrastive"
    assert front["patch_artifact"] == "mitigation.safetensors" and front["gate_verdicts"] == "pending"
    assert front["card_artifact"] == "mitigation_card.md"
    assert any(m["scope"] == "delta=eavss-base" and m["name"] == "accuracy" and m["n"] for m in front["metrics"])
    n_test = s["counts"]["test_answered"]
    assert sorted({a.scope for a in res.answers}) == ["variant=base", "variant=eavss", "variant=random"]
    assert len(res.answers) == 3 * n_test
    by = {(m.scope, m.name): m for m in res.metrics}
    assert by[("delta=eavss-base", "accuracy")].n == n_test and by[("delta=eavss-base", "perplexity")].n == 3
    acc = by[("delta=eavss-base", "accuracy")]
    assert acc.value == pytest.approx(by[("variant=eavss", "accuracy")].value - by[("variant=base", "accuracy")].value)
    tuned = [r for r in res.layers if r.values["tuned"] == 1.0]
    assert [r.layer for r in tuned] == s["layers"] and tuned[0].values["eavss_rank"] == 1.0
    assert [d for _, d, _ in events] == sorted(d for _, d, _ in events) and events[-1][1] == events[-1][2]
    assert "eavss - random" in s["table_markdown"]


def test_explicit_layers_out_of_range_fail_clearly(tiny) -> None:
    train, test = split_examples(_examples(60), 0.3, 0)
    with pytest.raises(JobFailed) as exc:
        run_mitigate_stage(tiny, train, test, _opts(layers=[7]), JobContext())
    assert exc.value.error_type == "invalid_layers" and "0-3" in exc.value.detail


def test_too_few_questions_fail_before_any_work(tiny) -> None:
    train, test = split_examples(_examples(4), 0.5, 0)
    with pytest.raises(JobFailed) as exc:
        run_mitigate_stage(tiny, train, test, _opts(), JobContext())
    assert exc.value.error_type == "dataset_too_small"


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of patch"):
        ModelSpec(patch={})
    with pytest.raises(ValueError, match="must not repeat"):
        MitigateOptions(layers=[1, 1])
    spec = AnalysisSpec.model_validate({"dataset": {"name": "chatterbot-trivia"}, "stages": {"mitigate": {}}})
    assert spec.stages.mitigate.perplexity_dataset.name == "chatterbot-conversations"

