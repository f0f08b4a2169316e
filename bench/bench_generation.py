# ruff: noqa: E402  (imports follow the sys.path set-up)
"""Does the shared-prefix KV cache of `worker.lm.generate` pay? SmolLM2-135M, greedy answers.

    python bench/bench_generation.py [--data-dir DIR] [--questions 32] [--shots 15] [--device cpu]

About 2 minutes for 8 questions with OMP_NUM_THREADS=1 (few-shot: 15 shots, about 450 tokens a
prompt). Last run (8 questions, CPU): few-shot prefix 6.2 s, no_prefix 25.2 s (4.08x), hf 34.5 s
(5.58x); zero-shot prefix 6.9 s, no_prefix 6.6 s (0.96x), hf 6.6 s (0.95x); identical answers.

Two workloads on SciQ questions (DIR/sciq/train.txt, see bench_hallucination.py):
- few-shot: the hallucination stage's prompts (`--shots` shots, all prompts share them);
- zero-shot: the QA task's `Question: q\\nAnswer:` prompts (only `Question:` is shared).
Three ways to answer each, timed in the same run (best of `--repeats`, alternated):
- `prefix`: `generate` as the stages run it (the shared prefix runs once, its cache is
  copied into every batch);
- `no_prefix`: `generate(share_prefix=False)` (every batch runs its whole prompts);
- `hf`: transformers' `model.generate`, greedy, left-padded, the same stop tokens as EOS
  ids, per-token scores returned (what the stages need for the log-probabilities).
With `--dola-layers J [K ...]` also layer-contrast decoding (worker/lm/dola.py) the same way:
- `dola_final`: DoLa with the last block as the premature layer (must give `prefix`'s answers);
- `dola_static`: DoLa with block J; `dola_dynamic`: DoLa's max-JSD choice among J, K, ...
  (with more than one layer), so the ratios are DoLa's cost per answer.
Prints seconds, the ratios to `prefix` and the share of answers identical to `prefix`'s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch

from app.config import Settings
from app.schemas import ModelSpec
from bench.bench_hallucination import DATA_DIR, require_file
from worker.hallucination.generation import build_prompt
from worker.lm.dola import DolaSpec
from worker.lm.generate import generate, stop_token_ids
from worker.lm.tokens import encode_texts, length_batches, pad_batch, pad_id
from worker.modelzoo import load_model

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of LitCab's QA sets (sciq/train.txt)")
ap.add_argument("--questions", type=int, default=32)
ap.add_argument("--shots", type=int, default=15)
ap.add_argument("--max-new-tokens", type=int, default=16)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--device", default="cpu")
ap.add_argument("--workloads", nargs="+", default=["few_shot", "zero_shot"], choices=["few_shot", "zero_shot"])
ap.add_argument("--dola-layers", type=int, nargs="+", default=[], help="also time DoLa at these premature blocks")
ap.add_argument("--out", type=Path, default=Path("/tmp/bench_generation.json"))
args = ap.parse_args()

blocks = require_file(args.data_dir / "sciq" / "train.txt").read_text().strip().split("\n\n")
pairs = [tuple(b.split("\n", 1)) for b in blocks[: args.shots + args.questions]]
shots = [(q.strip(), a.strip()) for q, a in pairs[: args.shots]]
questions = [q.strip() for q, _ in pairs[args.shots :]]
loaded = load_model(ModelSpec(name="smollm2-135m", device=args.device), Settings(data_dir=ROOT / ".layerscope"))
model, tok = loaded.model, loaded.tokenizer
workloads = {
    "few_shot": [build_prompt(q, shots) for q in questions],
    "zero_shot": [f"Question: {q}\nAnswer:" for q in questions],
}


def ours(prompts: list[str], share: bool, decoding: DolaSpec | None = None) -> list[str]:
    run = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   share_prefix=share, decoding=decoding)
    return [g.text for g in run.generations]


@torch.inference_mode()
def hf(prompts: list[str]) -> list[str]:
    import transformers

    stops = sorted(stop_token_ids(tok, model))
    config = transformers.GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                           pad_token_id=pad_id(tok), eos_token_id=stops, use_cache=True,
                                           return_dict_in_generate=True, output_scores=True)
    enc = encode_texts(tok, prompts, None)
    out = [""] * len(prompts)
    for batch in length_batches([len(e) for e in enc], args.batch_size):
        ids, mask = pad_batch([enc[i] for i in batch], pad_id(tok), side="left")
        res = model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                             generation_config=config)
        for row, i in enumerate(batch):
            out[i] = tok.decode(res.sequences[row, ids.shape[1]:].tolist(), skip_special_tokens=True)
            out[i] = out[i].split("\n", 1)[0].strip()
    return out


modes = {"prefix": lambda p: ours(p, True), "no_prefix": lambda p: ours(p, False), "hf": hf}
if args.dola_layers:
    last = len(loaded.adapter.blocks(model)) - 1
    modes["dola_final"] = lambda p: ours(p, True, DolaSpec((last,)))
    modes["dola_static"] = lambda p: ours(p, True, DolaSpec((args.dola_layers[0],)))
    if len(args.dola_layers) > 1:
        modes["dola_dynamic"] = lambda p: ours(p, True, DolaSpec(tuple(args.dola_layers)))
report: dict = {"device": str(loaded.device), "questions": len(questions), "shots": args.shots,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "workloads": {}}
for name in args.workloads:
    prompts = workloads[name]
    shared = generate(model, tok, prompts[:2], max_new_tokens=1).shared_prefix_tokens
    mean_len = sum(len(e) for e in encode_texts(tok, prompts, None)) / len(prompts)
    best: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for mode, fn in modes.items():
            t0 = time.perf_counter()
            answers[mode] = fn(prompts)
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
    row = {
        "prompt_tokens_mean": round(mean_len, 1), "shared_prefix_tokens": shared,
        "seconds": {m: round(s, 3) for m, s in best.items()},
        "ratio_to_prefix": {m: round(s / best["prefix"], 3) for m, s in best.items()},
        "same_answers_as_prefix": {m: sum(a == b for a, b in zip(answers[m], answers["prefix"], strict=True))
                                   / len(prompts) for m in modes},
    }
    report["workloads"][name] = row
    print(name, json.dumps(row), flush=True)
args.out.write_text(json.dumps(report, indent=1))
print("wrote", args.out)
