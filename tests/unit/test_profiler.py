"""profile() on a tiny random Llama: statistics against a float64 computation over the
very same captured activations, masking, skip_positions, token_start, hooks removed,
cancellation, pooled vectors and memory independence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.schemas import ProfileOptions
from tests.unit.test_profiler_fixtures import (
    TEXTS,
    CharTokenizer,
    HandAdapter,
    Loaded,
    reference_capture,
    tiny_llama,
)
from tests.unit.test_profiler_fixtures import loaded as loaded  # noqa: F401  (fixture)
from worker.lm.tokens import length_batches
from worker.profiler import Profile, profile
from worker.profiler.profiler import _Collector
from worker.profiler.stats import BatchPlan, HistogramSpec
from worker.stage import JobCancelled, JobContext, JobFailed

ALL_SITES = ["block_output", "mlp_activation", "attention_output"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def lengths(texts: list[str], max_tokens: int) -> list[int]:
    return [min(len(t) + 1, max_tokens) for t in texts]  # CharTokenizer: BOS + one id per char


def reference_rows(
    kept: dict, masks: list[torch.Tensor], position: int, site: str, keep_fn
) -> list[torch.Tensor]:
    """Per example (in call order), the rows [tokens, width] that should count."""
    rows = []
    for t, m in zip(kept[(position, site)], masks, strict=True):
        t = t.reshape(m.shape[0], m.shape[1], -1)
        for b in range(m.shape[0]):
            n = int(m[b].sum())
            sel = keep_fn(n)
            if sel.numel():
                rows.append(t[b, sel])
    return rows


def check_against_reference(prof: Profile, kept: dict, masks: list, keep_fn, sites: list[str]) -> None:
    for position in range(prof.n_layers):
        for site in sites:
            rows = reference_rows(kept, masks, position, site, keep_fn)
            x = torch.cat(rows)
            s = prof.stats[(position, site)]
            assert s.count == x.numel()
            assert rel(s.mean, x.mean().item()) < 1e-9
            assert rel(s.m2, ((x - x.mean()) ** 2).sum().item()) < 1e-9
            assert rel(s.sum_abs, x.abs().sum().item()) < 1e-9
            assert rel(s.sum_sq, (x * x).sum().item()) < 1e-9
            assert rel(s.max_abs, x.abs().max().item()) < 1e-9
            assert s.examples == len(rows)
            pooled = sum(r.mean(0).var(unbiased=False).item() for r in rows) / len(rows)
            assert rel(s.pooled_variance, pooled) < 1e-6
            assert rel(s.l1_norm, sum(r.abs().sum(-1).mean().item() for r in rows) / len(rows)) < 1e-9
            assert rel(s.l2_norm, sum(r.norm(dim=-1).mean().item() for r in rows) / len(rows)) < 1e-9
            assert rel(s.frobenius_norm, sum(r.norm().item() for r in rows) / len(rows)) < 1e-9


def test_statistics_match_float64_over_captured_activations(loaded: Loaded) -> None:
    options = ProfileOptions(sites=ALL_SITES, batch_size=3)
    ref, masks = reference_capture(
        loaded, lambda: profile(loaded, TEXTS, options, JobContext(), max_tokens=24), ALL_SITES
    )
    prof = ref["result"]
    assert prof.n_batches == 3 and len(masks) == 3
    assert prof.n_tokens == sum(lengths(TEXTS, 24))  # every real token, no padding
    assert any(bool((~m).any()) for m in masks)  # some batch really was padded
    check_against_reference(prof, ref["kept"], masks, lambda n: torch.arange(n), ALL_SITES)
    assert prof.block_names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert not prof.warnings


def test_skip_positions(loaded: Loaded) -> None:
    options = ProfileOptions(sites=["block_output"], batch_size=2, skip_positions=2)
    ref, masks = reference_capture(
        loaded, lambda: profile(loaded, TEXTS, options, JobContext(), max_tokens=24), ["block_output"]
    )
    prof = ref["result"]
    assert prof.n_tokens == sum(max(0, n - 2) for n in lengths(TEXTS, 24))
    check_against_reference(prof, ref["kept"], masks, lambda n: torch.arange(min(2, n), n), ["block_output"])
    # the alternative view adds the skipped positions back
    full = profile(
        loaded, TEXTS, ProfileOptions(sites=["block_output"], batch_size=2), JobContext(), max_tokens=24
    )
    for alt, s in zip(prof.alternative_stats("block_output"), full.site_stats("block_output"), strict=True):
        assert alt.count == s.count and rel(alt.m2, s.m2) < 1e-6
    # ...and with nothing skipped, the alternative view drops position 0
    for alt, s in zip(
        full.alternative_stats("block_output"),
        profile(
            loaded,
            TEXTS,
            ProfileOptions(sites=["block_output"], batch_size=2, skip_positions=1),
            JobContext(),
            max_tokens=24,
        ).site_stats("block_output"),
        strict=True,
    ):
        assert alt.count == s.count and rel(alt.m2, s.m2) < 1e-6


def test_token_start_counts_only_answer_tokens(loaded: Loaded) -> None:
    starts = [3, 0, 10, 0, 100, 5, 1]  # 100: past the end, that example counts nothing
    options = ProfileOptions(sites=["block_output", "mlp_activation"], batch_size=4)
    ref, masks = reference_capture(
        loaded,
        lambda: profile(loaded, TEXTS, options, JobContext(), max_tokens=24, token_start=starts),
        ["block_output", "mlp_activation"],
    )
    prof = ref["result"]
    lens = lengths(TEXTS, 24)
    assert prof.n_tokens == sum(max(0, n - s) for n, s in zip(lens, starts, strict=True))
    assert prof.answer_only and prof.n_profiled_examples == 6
    # reconstruct which example each row of each call was (batches are length-sorted)
    order = [i for batch in length_batches(lens, 4) for i in batch]
    it = iter(order)
    per_call_starts = []
    for m in masks:
        per_call_starts.append([starts[next(it)] for _ in range(m.shape[0])])
    for position in range(prof.n_layers):
        for site in ("block_output", "mlp_activation"):
            rows = []
            for t, m, st in zip(ref["kept"][(position, site)], masks, per_call_starts, strict=True):
                for b in range(m.shape[0]):
                    n = int(m[b].sum())
                    if st[b] < n:
                        rows.append(t[b, st[b] : n])
            x = torch.cat(rows)
            s = prof.stats[(position, site)]
            assert s.count == x.numel() and rel(s.m2, ((x - x.mean()) ** 2).sum().item()) < 1e-9
            assert s.examples == len(rows)
    with pytest.raises(ValueError):
        profile(loaded, TEXTS, options, JobContext(), max_tokens=24, token_start=[0])


def test_collect_pooled(loaded: Loaded) -> None:
    options = ProfileOptions(sites=["block_output"], batch_size=3)
    ref, masks = reference_capture(
        loaded,
        lambda: profile(loaded, TEXTS, options, JobContext(), max_tokens=24, collect_pooled=True),
        ["block_output"],
    )
    prof = ref["result"]
    pooled = prof.pooled["block_output"]
    assert pooled.shape == (len(TEXTS), 3, 32) and pooled.dtype.name == "float32"
    lens = lengths(TEXTS, 24)
    assert list(prof.pooled_tokens) == lens
    order = [i for batch in length_batches(lens, 3) for i in batch]
    it = iter(order)
    for t, m in zip(ref["kept"][(1, "block_output")], masks, strict=True):
        for b in range(m.shape[0]):
            i = next(it)
            expected = t[b, : int(m[b].sum())].mean(0)
            assert torch.allclose(torch.from_numpy(pooled[i, 1]).double(), expected, rtol=1e-5, atol=1e-6)


def test_hooks_removed_after_an_exception(loaded: Loaded) -> None:
    modules = [m for m in loaded.model.modules()]

    def boom(stage: str, done: int, total: int) -> None:
        if done > 0:  # after the first batch (progress counts rows)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        profile(
            loaded,
            TEXTS,
            ProfileOptions(sites=ALL_SITES, batch_size=2),
            JobContext(progress=boom),
            max_tokens=16,
        )
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    assert not loaded.model.training


def test_cancellation_between_batches(loaded: Loaded) -> None:
    calls: list[tuple[str, int, int]] = []
    ctx = JobContext(progress=lambda s, d, t: calls.append((s, d, t)), is_cancelled=lambda: len(calls) >= 3)
    with pytest.raises(JobCancelled):
        profile(loaded, TEXTS, ProfileOptions(batch_size=2), ctx, max_tokens=16)
    # progress counts rows (7 texts, batches of 2): stopped before the third batch
    assert calls == [("profile", 0, 7), ("profile", 2, 7), ("profile", 4, 7)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


def test_progress_reports_every_batch(loaded: Loaded) -> None:
    calls: list[tuple[int, int]] = []
    profile(
        loaded,
        TEXTS,
        ProfileOptions(batch_size=3),
        JobContext(progress=lambda s, d, t: calls.append((d, t))),
        max_tokens=16,
    )
    assert calls == [(0, 7), (3, 7), (6, 7), (7, 7)]  # rows done after each batch of 3


def test_memory_does_not_grow_with_examples(loaded: Loaded) -> None:
    few = profile(loaded, TEXTS[:3], ProfileOptions(sites=ALL_SITES), JobContext(), max_tokens=16)
    many = profile(
        loaded, TEXTS * 5, ProfileOptions(sites=ALL_SITES, batch_size=16), JobContext(), max_tokens=16
    )
    assert many.n_tokens > 5 * few.n_tokens
    # only digits change (the fine window's counts are compressed, so their length varies with the data)
    size = lambda p: sum(len(json.dumps({**s.to_dict(), "windows": []})) for s in p.stats.values())  # noqa: E731
    assert abs(size(many) - size(few)) < 0.2 * size(few)
    assert many.pooled is None and few.pooled is None
    assert {s.hist.shape for s in many.stats.values()} == {(few.spec.slots,)}
    assert {w.counts.shape for s in many.stats.values() for w in s.windows} == {(few.fine.slots,)}


def test_profile_dict_roundtrip(loaded: Loaded) -> None:
    prof = profile(
        loaded,
        TEXTS,
        ProfileOptions(sites=["block_output"], skip_positions=1),
        JobContext(),
        max_tokens=16,
        thresholds=[1e-5],
    )
    d = json.loads(json.dumps(prof.to_dict()))
    back = Profile.from_dict(d)
    assert back.block_names == prof.block_names and back.skip_positions == 1 and back.thresholds == (1e-5,)
    s, t = back.stats[(2, "block_output")], prof.stats[(2, "block_output")]
    assert s.m2 == t.m2 and (s.hist == t.hist).all() and s.below[0] == t.below[0]


def test_unavailable_site_is_a_job_failure() -> None:
    class NoMlp(HandAdapter):
        def blocks(self, model):  # type: ignore[no-untyped-def]
            out = super().blocks(model)
            for b in out:
                b.sites.pop("mlp_activation")
            return out

    tiny = Loaded(tiny_llama(layers=2), CharTokenizer(), NoMlp())
    with pytest.raises(JobFailed) as err:
        profile(tiny, TEXTS, ProfileOptions(sites=["mlp_activation"]), JobContext(), max_tokens=8)
    assert err.value.error_type == "site_unavailable"


def test_flat_token_tensors_are_read_as_batch_positions() -> None:
    spec = HistogramSpec()
    x = torch.randn(2, 3, 4)
    results = []
    for tensor in (x, x.reshape(6, 4)):  # OPT's MLP sees [batch * pos, width]
        c = _Collector()
        plan = BatchPlan.build([3, 2], 3, spec=spec)
        c.begin(plan, 2, 3)
        c(0, "mlp_activation", tensor)
        results.append(c.finish()[0][2])
    assert (results[0] == results[1]).all()


def test_empty_examples_are_skipped(loaded: Loaded) -> None:
    class EmptyTok(CharTokenizer):
        def __call__(self, texts, **kw):  # type: ignore[no-untyped-def]
            out = super().__call__(texts, **kw)
            return {"input_ids": [ids if t else [] for ids, t in zip(out["input_ids"], texts, strict=True)]}

    tiny = Loaded(loaded.model, EmptyTok(), HandAdapter())
    prof = profile(tiny, ["", "", "abc"], ProfileOptions(), JobContext(), max_tokens=8)
    assert prof.n_tokens == 4 and prof.n_profiled_examples == 1 and prof.n_examples == 3
    none = profile(tiny, ["", ""], ProfileOptions(), JobContext(), max_tokens=8)
    assert none.n_tokens == 0 and none.warnings and math.isnan(none.stats[(0, "block_output")].variance)
