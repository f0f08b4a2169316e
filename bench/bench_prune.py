# ruff: noqa: E402  (imports follow the sys.path set-up)
"""Prune stage on SmolLM2-135M, library call (paper table 1 layout): AVSS vs every baseline and random.

    python bench/bench_prune.py [--data-dir DIR]   # about 25 min on 2 idle CPU cores; writes /tmp/prune_result.json

Text: 32 distinct Wikipedia sentences (the WikiQA gold answers of LitCab's QA sets, read from
DIR/wikiqa/validation.txt; see bench_hallucination.py for the layout); QA: the built-in
chatterbot-trivia pairs. Reports whatever the numbers are.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.config import Settings
from app.schemas import AvssOptions, DatasetSpec, ModelSpec, ProfileOptions, PruneOptions
from bench.bench_hallucination import DATA_DIR, require_file
from worker.datasets import load_examples
from worker.modelzoo import load_model
from worker.profiler import profile
from worker.pruning import run_prune_stage
from worker.scoring.avss import avss_stage
from worker.stage import JobContext

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of LitCab's QA sets (wikiqa/validation.txt)")
args = ap.parse_args()
wikiqa = require_file(args.data_dir / "wikiqa" / "validation.txt")

t0 = time.time()
settings = Settings(data_dir=ROOT / ".layerscope")
loaded = load_model(ModelSpec(name="smollm2-135m"), settings)
print("load", round(time.time() - t0, 1), "s", flush=True)
# Real text: Wikipedia sentences (WikiQA gold answers), first 32 distinct ones.
recs = wikiqa.read_text().strip().split("\n\n")
texts, seen = [], set()
for r in recs:
    lines = r.split("\n")
    if len(lines) >= 2 and lines[1] not in seen:
        seen.add(lines[1])
        texts.append({"text": lines[1]})
    if len(texts) == 32:
        break
qa = load_examples(DatasetSpec(name="chatterbot-trivia", limit=32, seed=0), settings)
last = {}


def progress(stage, done, total):
    if stage != last.get("s"):
        print(f"  [{time.time() - t0:6.1f}s] {stage} ({total})", flush=True)
        last["s"] = stage


ctx = JobContext(progress=progress)
prof = profile(loaded, [t["text"] for t in texts], ProfileOptions(batch_size=8), ctx, max_tokens=128)
scored = avss_stage(prof, AvssOptions(plots=False))
print("avss ranking (least important first):", scored.ranking.lowest_first(), flush=True)
print("avss warnings:", [w[:150] for w in scored.result.warnings], flush=True)
opts = PruneOptions(
    fraction=0.25,
    random_seeds=5,
    scoring_examples=16,
    batch_size=8,
    qa_max_new_tokens=16,
    timing_runs=5,
    n_boot=1000,
)
res = run_prune_stage(
    loaded, texts, opts, ctx, {"avss": scored.ranking}, qa_examples=qa, max_tokens=128
)
print("total", round(time.time() - t0, 1), "s")
Path("/tmp/prune_result.json").write_text(
    json.dumps(
        {"summary": res.summary, "warnings": res.warnings, "metrics": [vars(m) for m in res.metrics]},
        indent=1,
        default=str,
    )
)
for e in res.summary["table"]:
    print(
        f"\n== {e['task']} ({e['metric']}, {'higher' if e['higher_is_better'] else 'lower'} is better), original {e['original']:.4g} CI {e['original_ci']} n={e['n']}"
    )
    for r in e["rows"]:
        m = e["metric"]
        extra = f" em={r.get('exact_match')}" if e["task"] == "qa" else ""
        print(
            f"  {r['scorer']:<17} {m}={r.get(m)!s:<22} retained={r.get('retained_pct')!s:<22} params-{r['parameter_reduction_pct']:.2f}% speedup={r['speedup']}{extra} removed={r.get('layers_removed', r.get('layers_removed_count'))}"
        )
print("\nagreement:", json.dumps(res.summary["agreement"]))
print("scoring seconds:", res.summary["scoring_seconds"])
print("warnings:", res.warnings)
