"""Baseline layer scorers against direct computations, and rank agreement on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import ModelSpec
from worker.modelzoo import load_model
from worker.modelzoo.surgery import remove_blocks
from worker.scoring.agreement import (
    average_ranks,
    importance_from_order,
    kendall_tau_b,
    pairwise_agreement,
    pruning_order,
    ranks_from_order,
    spearman_rho,
)
from worker.scoring.scorers import SCORERS, compute_scores, computed_scorers, random_scores
from worker.scoring.scorers.angular_distance import angular_distance
from worker.scoring.scorers.block_influence import block_influence
from worker.scoring.scorers.cim import cim
from worker.scoring.scorers.gbis import gbis
from worker.scoring.scorers.lrp import lrp
from worker.stage import JobFailed

TEXTS = [
    "the cat sat on the mat and looked at the birds",
    "rivers flow to the sea",
    "a quick brown fox jumps over the lazy dog again",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("ls"))
    return {n: load_model(ModelSpec(name=f"tiny-random-{n}"), settings) for n in ("llama", "gpt2", "bert")}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _batch(loaded):
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _lm_loss_sum(logits, ids, mask):
    tmask = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids[:, 1:].shape)
    return (nll * tmask).sum()


# ------------------------------------------------------------ every scorer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scorer", sorted(computed_scorers()))
def test_scorer_table_shape_finite_permutation(models, arch, scorer):
    loaded = models[arch]
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    table = compute_scores(scorer, loaded.model, loaded.tokenizer, TEXTS, batch_size=2)
    assert table.scorer == scorer
    assert len(table.scores) == 4 and all(math.isfinite(s) for s in table.scores)
    assert sorted(table.ranks()) == [1, 2, 3, 4]
    lowest = min(range(4), key=lambda i: table.scores[i])
    assert table.ranks()[lowest] == 1 and table.order()[0] == lowest
    rows = table.layer_rows()
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    assert all(r.scorer == scorer and r.values["score"] is not None for r in rows)
    assert rows[0].block_name.endswith(".0")
    # Hooks removed, weights untouched, no parameter gradients left behind.
    assert _hooks(loaded.model) == 0
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert len(loaded.model.get_submodule(loaded.adapter.block_list_path(loaded.model))) == 4


def test_unknown_scorer_and_encoder_refusals(models):
    for name in ("nope", "avss"):  # avss's ranking comes from its stage, not from compute_scores
        with pytest.raises(JobFailed) as exc:
            compute_scores(name, models["llama"].model, models["llama"].tokenizer, TEXTS)
        assert exc.value.error_type == "scorer_unknown"
    bert = models["bert"]
    # What a scorer declares is what it does: those needing a causal LM refuse an encoder.
    for name in computed_scorers():
        if SCORERS[name].needs_causal_lm:
            with pytest.raises(JobFailed) as exc:
                compute_scores(name, bert.model, bert.tokenizer, TEXTS)
            assert exc.value.error_type == "scorer_unsupported"
        else:
            table = compute_scores(name, bert.model, bert.tokenizer, TEXTS)
            assert len(table.scores) == 4 and all(math.isfinite(s) for s in table.scores)
    assert {n for n in computed_scorers() if SCORERS[n].needs_causal_lm} == {"gbis", "lrp", "cim"}
    assert {n for n in SCORERS if SCORERS[n].needs_gradients} == {"gbis", "lrp"}


# ------------------------------------------------------ direct computations


def test_block_influence_and_angular_distance_match_hidden_states(models):
    loaded = models["llama"]
    ids, mask = _batch(loaded)
    with torch.no_grad():
        hs = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    last = mask.sum(1) - 1
    bi = block_influence(loaded.model, loaded.tokenizer, TEXTS, batch_size=2)
    ad_last = angular_distance(loaded.model, loaded.tokenizer, TEXTS, batch_size=3)
    ad_all = angular_distance(loaded.model, loaded.tokenizer, TEXTS, positions="all")
    # hidden_states[l + 1] is block l's output for l < L - 1 (the last one is after the final norm).
    for layer in range(3):
        cos = torch.nn.functional.cosine_similarity(hs[layer].float(), hs[layer + 1].float(), dim=-1).clamp(
            -1, 1
        )
        assert bi.scores[layer] == pytest.approx(float((1 - cos)[real].mean()), rel=1e-4)
        assert ad_all.scores[layer] == pytest.approx(
            float((torch.arccos(cos) / math.pi)[real].mean()), rel=1e-4
        )
        at_last = cos[torch.arange(len(TEXTS)), last]
        assert ad_last.scores[layer] == pytest.approx(
            float((torch.arccos(at_last) / math.pi).mean()), rel=1e-4
        )
    assert ad_last.details["positions"] == "last"


def test_gbis_matches_autograd_on_hidden_states(models):
    loaded = models["llama"]
    ids, mask = _batch(loaded)
    out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    loss = _lm_loss_sum(out.logits, ids, mask)
    hs = out.hidden_states
    grads = torch.autograd.grad(loss, hs[1:4])
    table = gbis(loaded.model, loaded.tokenizer, TEXTS, batch_size=2)
    real = mask.bool()
    for layer in range(3):
        expected = (grads[layer] * hs[layer + 1]).abs().mean(-1)[real].mean()
        assert table.scores[layer] == pytest.approx(float(expected.detach()), rel=1e-3)


def test_lrp_small_epsilon_is_gradient_times_block_update(models):
    loaded = models["gpt2"]
    ids, mask = _batch(loaded)
    out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tmask = (mask[:, 1:] * mask[:, :-1]).bool()
    start = (out.logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * tmask).sum()
    hs = out.hidden_states
    grads = torch.autograd.grad(start, hs[1:4])
    real = mask.bool()
    table = lrp(loaded.model, loaded.tokenizer, TEXTS, epsilon=1e-9, batch_size=3)
    for layer in range(3):  # block l's input is hidden_states[l], its output hidden_states[l + 1] (l < L - 1)
        rel = ((hs[layer + 1] - hs[layer]) * grads[layer]).sum(-1)
        assert table.scores[layer] == pytest.approx(float(rel.detach().abs()[real].mean()), rel=2e-3)
    # A large epsilon really changes the propagation (it is not GBIS renamed).
    damped = lrp(loaded.model, loaded.tokenizer, TEXTS, epsilon=1.0, batch_size=3)
    assert not np.allclose(damped.scores, table.scores, rtol=1e-3)
    assert "signed_relevance" in damped.extra and damped.details["linear_layers"] > 0


def test_cim_is_leave_one_out_loss_increase(models):
    loaded = models["llama"]
    ids, mask = _batch(loaded)

    def per_example(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        tmask = (mask[:, 1:] * mask[:, :-1]).bool()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(tmask.shape)
        return ((nll * tmask).sum(1) / tmask.sum(1)).numpy()

    base = per_example(loaded.model)
    table = cim(loaded.model, loaded.tokenizer, TEXTS, batch_size=2)
    for layer in range(4):
        diff = per_example(remove_blocks(loaded.model, [layer])) - base
        assert table.scores[layer] == pytest.approx(float(diff.mean()), rel=1e-4, abs=1e-6)
        assert table.extra["hurt_fraction"][layer] == pytest.approx(float((diff > 0).mean()))
    assert len(loaded.model.model.layers) == 4 and loaded.model.config.num_hidden_layers == 4


def test_random_scores_seeded_permutation():
    a, b, c = random_scores(10, 3), random_scores(10, 3), random_scores(10, 4)
    assert a.scores == b.scores and a.scores != c.scores
    assert sorted(a.scores) == list(range(10)) and sorted(a.ranks()) == list(range(1, 11))


# ---------------------------------------------------------------- agreement


def test_order_and_ranks_conventions():
    # least important first (pruning order), ties: lower index first, non-finite last
    assert pruning_order([0.2, 0.9, 0.2, 0.5]) == [0, 2, 3, 1]
    assert pruning_order([float("nan"), 0.9, 0.2]) == [2, 1, 0]
    assert ranks_from_order([0, 2, 3, 1]) == [1, 4, 2, 3]  # rank 1 = first pruning candidate
    assert importance_from_order([0, 2, 3, 1]) == [1.0, 4.0, 2.0, 3.0]


def test_average_ranks_with_ties():
    np.testing.assert_allclose(average_ranks([10, 20, 20, 5]), [2.0, 3.5, 3.5, 1.0])


def test_spearman_hand_worked():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): d^2 = 4 -> 1 - 6*4/(4*15) = 0.6
    assert spearman_rho([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # ties: y ranks (1.5, 1.5, 3, 4); Pearson of (1,2,3,4) with that = 4.5 / sqrt(5 * 4.5)
    assert spearman_rho([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert spearman_rho([1, 1, 1], [1, 2, 3]) is None


def test_kendall_tau_b_hand_worked():
    # (1,2,3,4) vs (2,1,4,3): 6 pairs, 4 concordant, 2 discordant -> 2/6
    assert kendall_tau_b([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(1 / 3)
    # ties: x = (1,2,3,4), y = (7,7,8,9): pairs (0,1) tied in y; 5 concordant, 0 discordant
    # tau_b = 5 / sqrt(6 * 5)
    assert kendall_tau_b([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(5 / math.sqrt(30))
    # ties on both sides: x=(1,1,2,3) y=(1,2,2,3): n1=1, n2=1; S: (0,1) x-tie 0, (0,2) +1, (0,3) +1,
    # (1,2) y-tie 0, (1,3) +1, (2,3) +1 -> 4 / sqrt(5 * 5)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau_b([2, 2], [1, 2]) is None


def test_pairwise_agreement_keys():
    out = pairwise_agreement({"a": [1, 2, 3], "b": [1, 2, 3], "c": [3, 2, 1]})
    assert list(out) == ["a|b", "a|c", "b|c"]
    assert out["a|c"] == {"spearman": pytest.approx(-1.0), "kendall": pytest.approx(-1.0)}
