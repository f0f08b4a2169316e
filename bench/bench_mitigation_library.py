# ruff: noqa: E402  (imports follow the sys.path set-up)
"""The `mitigate` stage as a library call (`run_mitigate_stage`, the code the worker runs),
for runs the API cannot finish on a loaded machine. One run per argument `TAG|SET|N|OPTIONS`:

    python bench/bench_mitigation_library.py 'sciq120-eavss|sciq|120|{"method": "dola", "top_k": 2}' \\
        'sciq120-bucket|sciq|120|{"method": "dola", "layers": [0,2,4,6,8,10,12,14], "control": false}'

SET is a LitCab set of bench_hallucination.FILES under --data-dir (shuffled with seed 0, the
first N rows), OPTIONS a JSON object of `mitigate` options. The hallucination options are 5
shots, 16 answer tokens, detectors sequence_likelihood and p_ik (the README's DoLa rows).
Prints the stored table, counts, the method's report and the warnings; writes
/tmp/mitigation-<TAG>.json. Asserts nothing about the numbers.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings
from app.schemas import DatasetSpec, HallucinationOptions, MitigateOptions, ModelSpec
from bench.bench_hallucination import DATA_DIR, FILES, read_rows
from worker.datasets import load_examples
from worker.hallucination.stage import split_examples
from worker.mitigation.stage import run_mitigate_stage
from worker.modelzoo import load_model
from worker.stage import JobContext

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("runs", nargs="+", help="TAG|SET|N|OPTIONS")
ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
ap.add_argument("--model", default="smollm2-135m")
args = ap.parse_args()

settings = Settings(data_dir=ROOT / ".layerscope")
loaded = load_model(ModelSpec(name=args.model, device="cpu"), settings)
general = [e.as_text() for e in load_examples(DatasetSpec(name="chatterbot-conversations", limit=8), settings)]
hopts = HallucinationOptions(n_shots=5, max_new_tokens=16, detectors=["sequence_likelihood", "p_ik"],
                             n_boot=1000, seed=0)
for spec in args.runs:
    tag, name, n, extra = spec.split("|")
    rows = read_rows(args.data_dir / FILES[name])
    random.Random(0).shuffle(rows)
    examples = load_examples(DatasetSpec(rows=rows[: int(n)], limit=int(n), seed=0, max_tokens=1024), settings)
    train, test = split_examples(examples, hopts.test_fraction, hopts.seed)
    opts = MitigateOptions(**{"eval_detectors": ["sequence_likelihood", "p_ik"], "n_boot": 1000, "seed": 0,
                              **json.loads(extra)})
    t0 = time.monotonic()
    last = [0.0]

    def progress(stage: str, done: int, total: int, tag: str = tag, last: list[float] = last,
                 t0: float = t0) -> None:
        if time.monotonic() - last[0] > 60:
            last[0] = time.monotonic()
            print(f"  {tag} [{time.monotonic() - t0:7.1f}s] {stage} {done}/{total}", flush=True)

    res = run_mitigate_stage(loaded, train, test, opts, JobContext(progress=progress), hallucination_options=hopts,
                             perplexity_texts=general, dataset_name=name)
    s = res.summary
    print(f"== {tag}: {name} {n} questions, {time.monotonic() - t0:.0f} s; layers {s['layers']} "
          f"({s['layer_source']}), control {s['control_layers']}", flush=True)
    print("counts", json.dumps(s["counts"]), "training", json.dumps(s["training"]), flush=True)
    print(s["table_markdown"], flush=True)
    print("warnings", res.warnings, flush=True)
    Path(f"/tmp/mitigation-{tag}.json").write_text(json.dumps(
        {"summary": s, "metrics": [m.__dict__ for m in res.metrics], "warnings": res.warnings,
         "wall_s": round(time.monotonic() - t0, 1)}, indent=1, default=str))
