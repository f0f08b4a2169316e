"""Does the InfoNCE term fall on the tuning data? Contrastive tuning of fixed layers of
SmolLM2-135M on a LitCab QA set's *tuning* questions (the mitigate stage's split: the
hallucination split's training half, then its tuning part; the test half is never read),
once per `pooling` (mean, unflagged_mean, last_token), printing the InfoNCE diagnostic
(before/after on the tuning groups, chance), the share of positions flagged as massive
activations and the validation loss. Negatives are other tuning questions' gold answers
(no generation, so it is cheap); the stage adds the model's own wrong answers.

    python bench/bench_contrastive_pooling.py --dataset sciq:240 --layers 26 29 --epochs 1

Prints numbers; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_hallucination import DATA_DIR, FILES, read_rows  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="sciq:240")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[26, 29])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--poolings", nargs="+", default=["mean", "unflagged_mean", "last_token"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from app.config import Settings
    from app.schemas import HallucinationOptions, MitigateOptions, ModelSpec
    from worker.hallucination.stage import qa_item, split_examples
    from worker.mitigation.methods import METHODS, MethodInput, TuningData
    from worker.mitigation.stage import _split_tuning, candidate_groups
    from worker.modelzoo import load_model
    from worker.stage import JobContext

    name, _, n = args.dataset.partition(":")
    rows = read_rows(args.data_dir / FILES[name])
    random.Random(args.seed).shuffle(rows)
    rows = rows[: int(n or 240)]
    hopts = HallucinationOptions(seed=args.seed)
    train, _test = split_examples(rows, hopts.test_fraction, hopts.seed)  # the test half is not used below
    started = time.monotonic()
    loaded = load_model(ModelSpec(name=args.model, device="cpu"), Settings(), use_cache=False)
    print(f"loaded {args.model} in {time.monotonic() - started:.0f} s", flush=True)
    results = []
    for pooling in args.poolings:
        options = MitigateOptions(pooling=pooling, epochs=args.epochs, seed=args.seed, layers=args.layers)
        _probe, fit, val = _split_tuning(train, options)
        items = [qa_item(e, f"q{i}") for i, e in enumerate(fit + val)]
        groups = candidate_groups(items, [""] * len(items), [True] * len(items), options.negatives, options.seed,
                                  ["exact", "contains", "token_f1", "rouge_l"])
        data = TuningData(groups[: len(fit)], groups[len(fit):], 0, 0.0)
        t0 = time.monotonic()
        patch = METHODS["contrastive"].fit(MethodInput(loaded, "eavss", list(args.layers), data, options,
                                                       JobContext(), lambda d, t: None))
        rep = patch.report
        row = {"pooling": pooling, "tuning_groups": len(data.fit), "validation_groups": len(data.val),
               "diagnostic": rep["diagnostic"], "initial_val_loss": rep["initial_val_loss"],
               "best_val_loss": rep["best_val_loss"], "history": rep["history"], "warnings": patch.warnings,
               "seconds": round(time.monotonic() - t0, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
