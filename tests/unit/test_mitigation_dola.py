"""The `dola` mitigation method on `tiny-random-llama`: the stage evaluates DoLa against base
and random premature layers without touching the weights, and the recipe patch installed at
load (`model.patch` -> `apply_patch`) gives the answers the stage's run gave."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from app.config import Settings
from app.schemas import HallucinationOptions, MitigateOptions, ModelSpec
from worker.hallucination.stage import analyze_hallucination, split_examples
from worker.lm.dola import DolaSpec, decoding_of
from worker.mitigation.methods.dola import head_digests
from worker.mitigation.patch import apply_patch, read_patch, save_patch, snapshot
from worker.mitigation.stage import _split_tuning, run_mitigate_stage
from worker.modelzoo import load_model
from worker.stage import JobContext, JobFailed

HOPTS = HallucinationOptions(n_shots=2, max_new_tokens=4, n_boot=10, probe_l2=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(tmp_path_factory: pytest.TempPathFactory, name: str = "tiny-random-llama"):
    return load_model(ModelSpec(name=name, device="cpu"), Settings(data_dir=tmp_path_factory.mktemp("d")),
                      use_cache=False)


def _examples(n: int) -> list[dict]:
    return [{"question": f"What is item number {i} called?", "answer": f"thing{i}; alias{i}"} for i in range(n)]


def _opts(**kw) -> MitigateOptions:
    base = dict(method="dola", layers=[1], n_boot=20, seed=0, eval_detectors=["sequence_likelihood", "p_ik"])
    base.update(kw)
    return MitigateOptions(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    tiny = _load(tmp_path_factory)
    before = snapshot(dict(tiny.model.named_parameters()))
    train, test = split_examples(_examples(40), 0.3, 0)
    res = run_mitigate_stage(tiny, train, test, _opts(), JobContext(), hallucination_options=HOPTS,
                             perplexity_texts=["the cat sat on the mat and then it went to sleep"] * 2,
                             dataset_name="toy")
    return tiny, before, train, test, res


def _answers(res, scope: str) -> list[str]:
    return [a.answer for a in res.answers if a.scope == scope]


def test_the_stage_changes_no_weight_and_leaves_no_setting(run) -> None:
    tiny, before, _, _, res = run
    after = dict(tiny.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    assert decoding_of(tiny.model) is None
    s = res.summary
    assert s["method"] == "dola" and s["layers"] == [1]
    assert len(s["control_layers"]) == 1 and s["control_layers"] != [1]
    assert s["training"]["eavss"]["decoding"] == DolaSpec((1,)).to_dict()
    # DoLa changed what was answered (else the comparison below would say nothing)
    assert _answers(res, "variant=eavss") != _answers(res, "variant=base")
    by = {(m.scope, m.name): m for m in res.metrics}
    # no weight changes: the general-text perplexity is the base model's exactly
    assert by[("variant=eavss", "perplexity")].value == by[("variant=base", "perplexity")].value
    assert ("delta=eavss-random", "accuracy") in by
    cost = s["cost"]
    assert set(cost) == {"base", "eavss", "random"} and "fit_seconds" not in cost["base"]
    assert all(c["eval_seconds"] > 0 and c["answers"] > 0 for c in cost.values()) and cost["eavss"]["fit_seconds"] >= 0


def test_the_recipe_patch_at_load_gives_the_runs_answers(run, tmp_path_factory) -> None:
    _, _, train, test, res = run
    data = next(a.data for a in res.artifacts if a.name == "mitigation.safetensors")
    tensors, recipe, digests = read_patch(data)
    assert tensors == {} and recipe["method"] == "dola" and recipe["decoding"]["layers"] == [1]
    fresh = _load(tmp_path_factory)
    assert set(digests) == set(head_digests(fresh))
    apply_patch(fresh, data)
    assert decoding_of(fresh.model) == DolaSpec((1,))
    probe, _, _ = _split_tuning(train, _opts())
    again = analyze_hallucination(
        fresh, probe, test,
        HOPTS.model_copy(update={"detectors": ["sequence_likelihood", "p_ik"], "layer_probes": False,
                                 "profile_context": "question"}),
        JobContext(), dataset_name="toy",
    )
    assert [a.answer for a in again.answers if a.split == "test"] == _answers(res, "variant=eavss")


def test_the_patch_is_refused_on_another_base_and_when_malformed(run, tmp_path_factory) -> None:
    _, _, _, _, res = run
    data = next(a.data for a in res.artifacts if a.name == "mitigation.safetensors")
    gpt2 = _load(tmp_path_factory, "tiny-random-gpt2")
    with pytest.raises(JobFailed) as exc:
        apply_patch(gpt2, data)
    assert exc.value.error_type == "patch_mismatch"
    other = _load(tmp_path_factory)
    with torch.no_grad():
        other.model.get_output_embeddings().weight.add_(1e-3)
    with pytest.raises(JobFailed) as exc:
        apply_patch(other, data)
    assert exc.value.error_type == "patch_mismatch"
    assert decoding_of(other.model) is None
    _, recipe, digests = read_patch(data)
    fresh = _load(tmp_path_factory)
    for bad in ({**recipe, "decoding": None}, {**recipe, "decoding": {"layers": [9]}},
                {**recipe, "decoding": {"layers": [1], "alpha": 3}}):
        with pytest.raises(JobFailed) as exc:
            apply_patch(fresh, save_patch({}, digests, bad))
        assert exc.value.error_type in ("patch_invalid", "invalid_layers")
    assert decoding_of(fresh.model) is None
