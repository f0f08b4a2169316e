"""How long each layer scorer takes to produce a ranking, relative to AVSS's one profiling pass.

    python bench/bench_scorers.py [--model smollm2-135m] [--examples 32] [--max-tokens 128]
                                  [--batch-size 8] [--scorers gbis,lrp,...] [--repeats 1]
                                  [--data-dir .layerscope]

Same model, same texts (the built-in `chatterbot-conversations` set, shuffled with seed 0,
or `--dataset chatterbot-trivia`), same max tokens and batch size for every scorer, all
measured in this one run (wall-clock seconds, `time.perf_counter`). Prints, and does not
assert:

- `forward`: one bare forward pass of the base model (no LM head, as the profiler runs)
  over the texts, after a warm-up pass (reference);
- `avss`: the profiler's one pass (`worker.profiler.profile`, block_output site) plus the
  AVSS computation (`avss_stage`): what AVSS needs for a ranking;
- `block_influence`, `angular_distance`: one base-model forward pass with block
  input/output hooks;
- `gbis`, `lrp`: one forward (LM head included: they need the loss / target logits) +
  backward pass (batch size halved, as the prune stage does);
- `cim`: L + 1 forward passes (leave-one-layer-out).

Each line gives seconds (median over `--repeats` interleaved rounds: every round times
each scorer once, so load drift hits all of them) and the ratio to `avss`. On a shared
CPU single runs move by tens of percent (or more); use `--repeats 3` or more there. The
ordering (one-pass scorers ~ AVSS < gradient scorers < leave-one-out, which needs L + 1
passes by construction) is what the table shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.config import Settings  # noqa: E402
from app.schemas import AvssOptions, DatasetSpec, ModelSpec, ProfileOptions  # noqa: E402
from worker.datasets import load_examples  # noqa: E402
from worker.lm.model import forward_callable  # noqa: E402
from worker.lm.tokens import encode_texts, pad_batch  # noqa: E402
from worker.modelzoo import load_model  # noqa: E402
from worker.profiler import profile  # noqa: E402
from worker.scoring.agreement import importance_from_order, spearman_rho  # noqa: E402
from worker.scoring.avss import avss_stage  # noqa: E402
from worker.scoring.scorers import compute_scores, computed_scorers  # noqa: E402
from worker.stage import JobContext  # noqa: E402

PASSES = {
    "forward": "1 forward (base model)",
    "avss": "1 forward + hooks (profiler)",
    "block_influence": "1 forward + hooks",
    "angular_distance": "1 forward + hooks",
    "gbis": "1 forward + backward",
    "lrp": "1 forward + backward (epsilon rule)",
    "cim": "L + 1 forwards (LM head included)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="chatterbot-conversations")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--scorers", default=",".join(computed_scorers()))
    ap.add_argument("--data-dir", default=".layerscope")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings(data_dir=Path(args.data_dir))
    t = time.perf_counter()
    loaded = load_model(ModelSpec(name=args.model), settings)
    load_s = time.perf_counter() - t
    examples = load_examples(
        DatasetSpec(name=args.dataset, limit=args.examples, max_tokens=args.max_tokens), settings
    )
    texts = [ex.as_text() for ex in examples]
    n_layers = len(loaded.adapter.blocks(loaded.model))
    n_tokens = sum(len(ids) for ids in encode_texts(loaded.tokenizer, texts, args.max_tokens))
    print(
        f"model {args.model} ({n_layers} blocks, loaded in {load_s:.1f} s) on {loaded.device}, "
        f"{len(texts)} texts of {args.dataset}, {n_tokens} tokens (max {args.max_tokens}/text), "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )

    # Warm-up (allocator, lazy init) and the bare forward reference.
    # Sorted by length, as the profiler and the scorers batch (least padding).
    encoded = sorted(encode_texts(loaded.tokenizer, texts, args.max_tokens), key=len, reverse=True)
    pad = loaded.tokenizer.pad_token_id or 0
    batches = [
        pad_batch(encoded[i : i + args.batch_size], pad) for i in range(0, len(encoded), args.batch_size)
    ]
    run = forward_callable(loaded.model, loaded.adapter.blocks(loaded.model))
    with torch.inference_mode():
        for ids, mask in batches:  # warm-up pass
            run(ids.to(loaded.device), mask.to(loaded.device))

    def bare_forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:
                run(ids.to(loaded.device), mask.to(loaded.device))
        return time.perf_counter() - t

    ctx = JobContext()
    importance: dict[str, list[float]] = {}

    def avss_pass() -> float:
        t = time.perf_counter()
        prof = profile(
            loaded, examples, ProfileOptions(batch_size=args.batch_size), ctx, max_tokens=args.max_tokens
        )
        importance["avss"] = importance_from_order(avss_stage(prof, AvssOptions(plots=False)).ranking.lowest_first())
        return time.perf_counter() - t

    def scorer_pass(name: str) -> float:
        batch = (
            args.batch_size
            if name in ("block_influence", "angular_distance", "cim")
            else max(1, args.batch_size // 2)
        )
        table = compute_scores(
            name, loaded.model, loaded.tokenizer, texts, max_tokens=args.max_tokens, batch_size=batch, ctx=ctx
        )
        importance[name] = table.scores
        return table.seconds

    names = [s.strip() for s in args.scorers.split(",") if s.strip()]
    runs: dict[str, list[float]] = {"forward": [], "avss": [], **{n: [] for n in names}}
    # Interleaved rounds: each round times every scorer once, so load drift hits all of them.
    for _ in range(max(1, args.repeats)):
        runs["forward"].append(bare_forward())
        runs["avss"].append(avss_pass())
        for name in names:
            runs[name].append(scorer_pass(name))
    seconds = {name: statistics.median(v) for name, v in runs.items()}

    base = seconds["avss"]
    print(f"\nmedian of {max(1, args.repeats)} interleaved round(s)")
    print(f"{'scorer':<18}{'seconds':>10}{'x avss':>9}  {'passes':<36}{'spearman vs avss':>17}")
    for name, s in seconds.items():
        rho = spearman_rho(importance["avss"], importance[name]) if name in importance else None
        rho_s = f"{rho:+.3f}" if rho is not None else "-"
        print(f"{name:<18}{s:>10.2f}{s / base:>9.2f}  {PASSES.get(name, ''):<36}{rho_s:>17}")
    print("\nratios are measured in this run, on the same model, texts, max tokens and batch size")


if __name__ == "__main__":
    main()
