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
    validation = s["training"]["eavss"]["validation"]
    assert validation["questions"] >= 1 and 0 <= validation["mc_accuracy_dola"] <= 1
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


def test_validation_multiple_choice_against_an_independent_computation(tmp_path_factory) -> None:
    import math

    from worker.mitigation.contrastive import CandidateGroup, encode_groups
    from worker.mitigation.methods.dola import validation_multiple_choice
    from worker.mitigation.methods.steering import multiple_choice

    tiny = _load(tmp_path_factory)
    groups = [CandidateGroup(f"What is item number {i} called?", f"thing{i}", [f"thing{i + 1}", "no idea at all"])
              for i in range(5)]
    opts = _opts(batch_size=2)
    spec = DolaSpec((1, 2), alpha=0.1)
    base_acc, dola_acc = validation_multiple_choice(tiny, spec, groups, opts)
    assert base_acc == multiple_choice(tiny, groups, opts)[0]  # the base score is steering's
    enc = encode_groups(tiny.tokenizer, groups, opts.max_tokens)
    with torch.no_grad():
        out = tiny.model(input_ids=enc.ids, attention_mask=enc.mask, output_hidden_states=True)
    scores = []
    torch.set_grad_enabled(False)
    for r in range(enc.ids.shape[0]):
        pos = [t for t in range(enc.ids.shape[1] - 1) if enc.answer[r, t + 1]]
        total = 0.0
        for t in pos:
            lp_n = torch.log_softmax(out.logits[r, t].double(), -1)
            best, best_jsd = None, -1.0
            for j in (1, 2):
                h = tiny.model.model.norm(out.hidden_states[j + 1][r, t])
                lq = torch.log_softmax(tiny.model.lm_head(h).double(), -1)
                p, q = lp_n.exp(), lq.exp()
                m = (p + q) / 2
                jsd = float(0.5 * (p * (lp_n - m.log())).sum() + 0.5 * (q * (lq - m.log())).sum())
                if jsd > best_jsd:
                    best, best_jsd = lq, jsd
            keep = lp_n >= lp_n.max() + math.log(0.1)
            f = torch.where(keep, lp_n - best, torch.tensor(-math.inf, dtype=torch.float64))
            g = torch.log_softmax(f, -1)[enc.ids[r, t + 1]]
            total += float(g) if math.isfinite(float(g)) else -1000.0
        scores.append(total / len(pos))
    torch.set_grad_enabled(True)
    expected = sum(1.0 for rows in enc.groups if max(rows, key=lambda i: scores[i]) == rows[0]) / len(groups)
    assert dola_acc == pytest.approx(expected)
