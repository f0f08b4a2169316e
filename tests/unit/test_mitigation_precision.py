"""Mitigation tuning in bfloat16: float32 master weights make the tuned weights move as in
float32 (without them AdamW's small updates round away), and the model keeps its dtype."""

from __future__ import annotations

import pytest
import torch

from app.config import Settings
from app.schemas import MitigateOptions, ModelSpec
from worker.mitigation import contrastive
from worker.mitigation.contrastive import CandidateGroup, train_blocks
from worker.mitigation.patch import block_parameters, read_patch, save_patch, snapshot
from worker.modelzoo import load_model
from worker.stage import JobContext

LAYERS = [1, 2]
GROUPS = [CandidateGroup(f"What is item number {i} called?", f"thing{i}", [f"thing{(i + 1) % 12}", "no idea"])
          for i in range(12)]
OPTIONS = MitigateOptions(epochs=1, batch_size=3, learning_rate=5e-5, n_boot=20, top_k=1, seed=0)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return Settings(data_dir=tmp_path_factory.mktemp("d"))


def _tune(settings, dtype: str, monkeypatch=None):
    """(model, base tuned-block weights, tuned-block weights right after the last step)."""
    loaded = load_model(ModelSpec(name="tiny-random-llama", device="cpu", dtype=dtype), settings, use_cache=False)
    params = block_parameters(loaded, LAYERS)
    base = snapshot(params)
    last: dict = {}

    def on_step(step: int, total: int) -> None:
        if step == total and not last:
            last.update(snapshot(params))  # before early stopping may restore the base

    train_blocks(loaded, LAYERS, GROUPS, GROUPS[:4], OPTIONS, JobContext(), on_step=on_step)
    return loaded, base, last


def _changed(base: dict, after: dict, large: bool = False) -> float:
    """Share of the tuned weights that changed; `large`: among |w| >= 2^-6 only, where a bf16
    step is 2^-13 or more and an update of 5e-5 rounds away."""
    keep = {k: (base[k].float().abs() >= 2**-6) if large else torch.ones_like(base[k], dtype=torch.bool) for k in base}
    n = sum(int(m.sum()) for m in keep.values())
    return sum(int(((after[k] != base[k]) & keep[k]).sum()) for k in base) / n


def test_bf16_tuned_weights_change_as_in_float32(settings, monkeypatch):
    f32_model, f32_base, f32_after = _tune(settings, "float32")
    bf16_model, bf16_base, bf16_after = _tune(settings, "bfloat16")
    with monkeypatch.context() as m:  # the old way: AdamW straight on the bf16 weights
        m.setattr(contrastive, "_master_weights", lambda params: None)
        _, naive_base, naive_after = _tune(settings, "bfloat16")

    assert all(t.dtype == torch.bfloat16 for t in bf16_after.values())  # the model keeps its dtype
    assert all(p.dtype == torch.bfloat16 for p in bf16_model.model.parameters())
    # what float32 training gives, seen in bfloat16
    f32_seen = {k: v.to(torch.bfloat16) for k, v in f32_after.items()}
    f32_seen_base = {k: v.to(torch.bfloat16) for k, v in f32_base.items()}
    runs = {
        "float32": (f32_base, f32_after),
        "float32 rounded to bf16": (f32_seen_base, f32_seen),
        "bf16 + float32 master": (bf16_base, bf16_after),
        "bf16, no master": (naive_base, naive_after),
    }
    changed = {k: _changed(*v) for k, v in runs.items()}
    large = {k: _changed(*v, large=True) for k, v in runs.items()}
    print("changed:", {k: round(v, 5) for k, v in changed.items()})
    print("changed, |w| >= 2^-6:", {k: round(v, 5) for k, v in large.items()})
    assert changed["float32"] > 0.99
    assert changed["bf16 + float32 master"] > 0.9 * changed["float32 rounded to bf16"]
    assert large["bf16 + float32 master"] > 0.9 * large["float32 rounded to bf16"]
    assert large["bf16, no master"] < 0.1 * large["bf16 + float32 master"]  # the bug this guards against

    # the update itself follows float32's: same direction, similar size
    d32 = torch.cat([(f32_after[k] - f32_base[k]).flatten() for k in f32_base])
    d16 = torch.cat([(bf16_after[k].float() - bf16_base[k].float()).flatten() for k in bf16_base])
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0)
    assert cos > 0.9 and 0.7 < d16.norm() / d32.norm() < 1.3, (float(cos), float(d16.norm() / d32.norm()))


def test_bf16_patch_is_written_in_the_models_dtype(settings):
    loaded, base, after = _tune(settings, "bfloat16")
    tensors, _, _ = read_patch(save_patch(after, {k: "x" for k in after}, {}))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(p.grad is None for p in loaded.model.parameters())
