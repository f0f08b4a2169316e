"""Architecture adapters on tiny random models built from configs (no weights, no network)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from worker.modelzoo import BlockInfo, CaptureSite, adapter_for
from worker.modelzoo.adapters import GENERIC_ADAPTER
from worker.stage import JobFailed

D, FF, N, V = 32, 64, 3, 128


def _llama():
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
        )
    )


def _mistral():
    return tf.MistralForCausalLM(
        tf.MistralConfig(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
        )
    )


def _qwen2():
    return tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
        )
    )


def _gemma():
    return tf.GemmaForCausalLM(
        tf.GemmaConfig(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=V,
        )
    )


def _gemma2():
    return tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=V,
        )
    )


def _gemma3():
    return tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=V,
        )
    )


def _gemma3_multimodal():
    return tf.Gemma3ForConditionalGeneration(
        tf.Gemma3Config(
            text_config={
                "hidden_size": D,
                "intermediate_size": FF,
                "num_hidden_layers": N,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "vocab_size": V + 4,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            mm_tokens_per_image=4,
            boi_token_index=V + 1,
            eoi_token_index=V + 2,
            image_token_index=V + 3,
        )
    )


def _gpt2():
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=D, n_inner=FF, n_layer=N, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0)
    )


def _gpt_neox():
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=4, vocab_size=V
        )
    )


def _opt():
    return tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=D,
            ffn_dim=FF,
            num_hidden_layers=N,
            num_attention_heads=4,
            vocab_size=V,
            word_embed_proj_dim=D,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    )


def _bert():
    return tf.BertModel(
        tf.BertConfig(
            hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=4, vocab_size=V
        )
    )


def _bert_cls():
    return tf.BertForSequenceClassification(
        tf.BertConfig(
            hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=4, vocab_size=V
        )
    )


def _distilbert():
    return tf.DistilBertModel(tf.DistilBertConfig(dim=D, hidden_dim=FF, n_layers=N, n_heads=4, vocab_size=V))


# builder, family, block-list path
CASES = {
    "llama": (_llama, "llama", "model.layers"),
    "mistral": (_mistral, "llama", "model.layers"),
    "qwen2": (_qwen2, "llama", "model.layers"),
    "gemma": (_gemma, "gemma", "model.layers"),
    "gemma2": (_gemma2, "gemma", "model.layers"),
    "gemma3_text": (_gemma3, "gemma", "model.layers"),
    "gemma3_multimodal": (_gemma3_multimodal, "gemma", "model.language_model.layers"),
    "gpt2": (_gpt2, "gpt2", "transformer.h"),
    "gpt_neox": (_gpt_neox, "gpt_neox", "gpt_neox.layers"),
    "opt": (_opt, "opt", "model.decoder.layers"),
    "bert": (_bert, "bert", "encoder.layer"),
    "bert_cls": (_bert_cls, "bert", "bert.encoder.layer"),
    "distilbert": (_distilbert, "distilbert", "transformer.layer"),
}

EXPECTED_DIM = {"block_output": D, "attention_output": D, "mlp_activation": FF}


def _capture(
    model: torch.nn.Module, blocks: list[BlockInfo], seq: int = 5
) -> dict[tuple[int, str], torch.Tensor]:
    """Hook every site of every block (CaptureSite.register) during one forward pass."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    batch = 2

    def make(key: tuple[int, str], site: CaptureSite):
        def fn(t: torch.Tensor) -> None:
            t = t.detach()
            seen[key] = t.view(batch, -1, t.shape[-1]) if site.flat_tokens else t

        return site.register(fn)

    try:
        for b in blocks:
            for name, site in b.sites.items():
                handles.append(make((b.index, name), site))
        ids = torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return seen


def test_mlp_activation_is_down_projection_input() -> None:
    """For a gated MLP the site equals act(gate(x)) * up(x) of the MLP's input x."""
    model = _llama().eval()
    block = adapter_for(model).blocks(model)[1]
    got: dict[str, torch.Tensor] = {}
    h1 = block.sites["mlp_activation"].register(lambda t: got.__setitem__("act", t))
    h2 = block.module.mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    try:
        _capture(model, [])
    finally:
        h1.remove()
        h2.remove()
    mlp = block.module.mlp
    x = got["x"]
    with torch.inference_mode():
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert got["act"].shape[-1] == FF
    assert torch.allclose(got["act"], expected, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_family_blocks_and_sites(case: str) -> None:
    build, family, path = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    adapter = adapter_for(model)
    assert adapter.family == family
    assert adapter.block_list_path(model) == path
    blocks = adapter.blocks(model)
    assert len(blocks) == N
    assert [b.index for b in blocks] == list(range(N))
    assert [b.name for b in blocks] == [f"{path}.{i}" for i in range(N)]
    for b in blocks:
        assert b.module is model.get_submodule(b.name)
        assert set(b.sites) == set(EXPECTED_DIM)
    seen = _capture(model, blocks)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert len(seen) == N * len(EXPECTED_DIM)
    for (_i, site), t in seen.items():
        assert t.shape[:2] == (2, 5), (case, site, t.shape)
        assert t.shape[-1] == EXPECTED_DIM[site], (case, site, t.shape)


def test_block_output_is_next_block_input() -> None:
    model = _llama().eval()
    blocks = adapter_for(model).blocks(model)
    inputs: dict[int, torch.Tensor] = {}

    def grab(i: int):
        def pre(_mod, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return pre

    handles = [b.module.register_forward_pre_hook(grab(b.index), with_kwargs=True) for b in blocks]
    try:
        outs = _capture(model, blocks)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(outs[(0, "block_output")], inputs[1])
    assert torch.allclose(outs[(1, "block_output")], inputs[2])


def test_gemma3_attention_site_is_post_norm() -> None:
    model = _gemma3()
    b = adapter_for(model).blocks(model)[0]
    assert b.sites["attention_output"].module is b.module.post_attention_layernorm
    assert b.sites["mlp_activation"].module is b.module.mlp.down_proj
    assert b.sites["mlp_activation"].use_input
    g1 = _gemma()
    assert adapter_for(g1).blocks(g1)[0].sites["attention_output"].module is g1.model.layers[0].self_attn


def test_structure_match_for_unknown_model_type() -> None:
    model = _llama()
    model.config.model_type = "my_llama_clone"
    adapter = adapter_for(model)
    assert adapter.family == "llama"
    assert len(adapter.blocks(model)) == N


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(D, 2), torch.nn.Linear(D, 3)])
        self.stack = torch.nn.Module()
        self.stack.blocks = torch.nn.ModuleList([_Block() for _ in range(5)])
        self.mixed = torch.nn.ModuleList([torch.nn.Linear(D, D), torch.nn.ReLU()] * 4)

    def forward(self, x):
        for b in self.stack.blocks:
            x = b(x)
        return x


def test_generic_fallback_largest_homogeneous_list() -> None:
    model = _Toy()
    adapter = adapter_for(model)
    assert adapter is GENERIC_ADAPTER
    assert adapter.family == "generic"
    assert adapter.block_list_path(model) == "stack.blocks"
    blocks = adapter.blocks(model)
    assert [b.name for b in blocks] == [f"stack.blocks.{i}" for i in range(5)]
    assert all(set(b.sites) == {"block_output"} for b in blocks)
    out = {}
    h = blocks[2].sites["block_output"].module.register_forward_hook(lambda m, a, o: out.setdefault("x", o))
    model(torch.randn(3, D))
    h.remove()
    assert out["x"].shape == (3, D)


def test_unsupported_architecture() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(JobFailed) as err:
        adapter_for(model)
    assert err.value.error_type == "unsupported_architecture"
    assert "nn.ModuleList" in err.value.detail


class _Returns(torch.nn.Module):
    """Returns whatever `make(x)` builds from its input."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, *args, **kwargs):
        return self.make(args, kwargs)


def _fired(site: CaptureSite, *args, **kwargs) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    handle = site.register(got.append)
    try:
        site.module(*args, **kwargs)
    finally:
        handle.remove()
    assert not site.module._forward_hooks and not site.module._forward_pre_hooks
    return got


def test_register_output_takes_the_first_tensor() -> None:
    """One implementation for adapters and the profiler: a tensor, the first element of a
    (nested) tuple or list, the first tensor of a mapping; no tensor, no call."""
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    cases = [
        (lambda args, kw: a, a),
        (lambda args, kw: (a, b), a),
        (lambda args, kw: [(a, None), b], a),
        (lambda args, kw: {"loss": None, "hidden": a, "other": b}, a),
    ]
    for make, expected in cases:
        got = _fired(CaptureSite(_Returns(make)), b)
        assert len(got) == 1 and got[0] is expected
    assert _fired(CaptureSite(_Returns(lambda args, kw: (None, a))), b) == []
    assert _fired(CaptureSite(_Returns(lambda args, kw: ())), b) == []


def test_register_input_positional_then_keywords() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    site = CaptureSite(_Returns(lambda args, kw: None), use_input=True)
    assert [t is a for t in _fired(site, a, b)] == [True]
    assert [t is a for t in _fired(site, (a, b))] == [True]
    # keyword-only calls: hidden_states / input / x first, then the first tensor
    assert [t is a for t in _fired(site, mask=b, hidden_states=a)] == [True]
    assert [t is a for t in _fired(site, mask=b, x=a)] == [True]
    assert [t is b for t in _fired(site, flag=True, mask=b)] == [True]
    assert _fired(site, flag=True) == []
    assert _fired(site, None, hidden_states=a) == []  # positional input given, not a tensor
