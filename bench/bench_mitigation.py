"""Mitigation benchmark: mitigation methods (`--method`: contrastive tuning, steering, dola; several in one analysis)
at SmolLM2-135M's most hallucination-prone layers on a LitCab QA set from ../shared/data/qa,
driven through the API.

    python bench/bench_mitigation.py --api http://127.0.0.1:8000 --api-key ls_... --dataset sciq:600

Submits one analysis with `stages.mitigate` (rows sent inline, so the server needs no
data root), polls it, and prints what the job stored: the before/after table (base,
EAVSS-chosen layers, the random-layer control, and paired bootstrap differences on the
same test questions), the layers tuned, the training history and the warnings. Then,
unless --no-verify-patch, it submits a second analysis on the base model with
`model.patch = {"analysis_id": <first>}` and checks that the patched model loads and
runs, as a model registry would serve it. Prints numbers; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_hallucination import DATA_DIR, FILES, read_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", required=True, help="base URL of a running layerscope API")
    ap.add_argument("--api-key", default=None, help="API key (or env LAYERSCOPE_API_KEY)")
    ap.add_argument("--dataset", default="sciq:600", help=f"name:N with name in {sorted(FILES)}")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="explicit layers instead of EAVSS top-k")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--no-control", action="store_true", help="skip the random-layer control")
    ap.add_argument("--method", nargs="+", default=["contrastive"],
                    help="mitigate.method (contrastive, steering, dola); several compare the methods in one analysis")
    ap.add_argument("--pooling", default=None, help="mitigate.pooling (unflagged_mean, last_token, mean)")
    ap.add_argument("--steering-strengths", type=float, nargs="+", default=None)
    ap.add_argument("--eval-detectors", nargs="+", default=None, help="mitigate.eval_detectors")
    ap.add_argument("--tune-fraction", type=float, default=None)
    ap.add_argument("--validation-fraction", type=float, default=None)
    ap.add_argument("--perplexity-limit", type=int, default=None, help="general texts for perplexity (default 64)")
    ap.add_argument("--extra", default=None, help="JSON object merged into the mitigate options")
    ap.add_argument("--with-hallucination-stage", action="store_true",
                    help="also run the hallucination stage; EAVSS layers then come from its training split")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--poll", type=float, default=10.0)
    ap.add_argument("--no-verify-patch", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    return ap.parse_args(argv)


def mitigate_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "top_k": args.top_k, "epochs": args.epochs, "learning_rate": args.learning_rate,
        "temperature": args.temperature, "lm_weight": args.lm_weight, "batch_size": args.batch_size,
        "negatives": args.negatives, "control": not args.no_control, "seed": args.seed, "n_boot": args.n_boot,
    }
    if args.layers:
        opts["layers"] = args.layers
    opts["method"] = args.method if len(args.method) > 1 else args.method[0]
    for key in ("pooling", "steering_strengths", "eval_detectors", "tune_fraction", "validation_fraction"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.perplexity_limit is not None:
        opts["perplexity_dataset"] = {"name": "chatterbot-conversations", "limit": args.perplexity_limit}
    if args.extra:
        opts.update(json.loads(args.extra))
    return opts


def wait(client: Any, analysis_id: str, poll: float, start: float) -> dict[str, Any]:
    while True:
        resp = client.get(f"/v1/analyses/{analysis_id}")
        if resp.status_code == 429:
            time.sleep(float(resp.headers.get("Retry-After", poll)))
            continue
        resp.raise_for_status()
        job = resp.json()
        p = job.get("progress") or {}
        print(f"  [{time.monotonic() - start:7.1f}s] {job['state']} {p.get('stage')} {p.get('done')}/{p.get('total')}",
              flush=True)
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    import httpx

    args = parse_args(argv)
    key = args.api_key or os.environ.get("LAYERSCOPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    name, _, n = args.dataset.partition(":")
    rows = read_rows(args.data_dir / FILES[name])
    random.Random(args.seed).shuffle(rows)
    rows = rows[: int(n or 600)]
    stages: dict[str, Any] = {"mitigate": mitigate_options(args)}
    if args.with_hallucination_stage:
        # Split, prompt and correctness settings of the mitigate stage come from these options
        # (their defaults when the stage is absent: test_fraction 0.5, 15 shots, seed 0).
        stages["hallucination"] = {"profile_context": "question", "n_boot": args.n_boot, "seed": args.seed}
    body = {
        "model": {"name": args.model},
        "dataset": {"rows": rows, "limit": len(rows), "seed": args.seed, "max_tokens": 1024},
        "stages": stages,
        "labels": {"bench": "mitigation", "dataset": name, "method": ",".join(args.method)},
    }
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    started = time.monotonic()
    with httpx.Client(base_url=args.api.rstrip("/"), headers=headers, timeout=120.0) as client:
        resp = client.post("/v1/analyses", json=body)
        if resp.status_code >= 400:
            raise SystemExit(f"submit failed: HTTP {resp.status_code}: {resp.text[:2000]}")
        job = resp.json()
        print(f"{name}: submitted {job['id']} with {len(rows)} questions", flush=True)
        job = wait(client, job["id"], args.poll, started)
        if job["state"] != "SUCCEEDED":
            raise SystemExit(f"job {job['id']} {job['state']}: {job.get('error')}")
        summary = job["summary"]["mitigate"]
        table = client.get(f"/v1/analyses/{job['id']}/artifacts/before_after.md").text
        metrics = client.get(f"/v1/analyses/{job['id']}/metrics", params={"stage": "mitigate"}).json()["items"]
        print(f"\nanalysis {job['id']} ({time.monotonic() - started:.0f} s)")
        print(f"tuned layers {summary['layers']} ({summary['layer_source']}); "
              f"control layers {summary['control_layers']}")
        print("counts:", json.dumps(summary["counts"]))
        for variant, rep in summary["training"].items():
            print(f"training {variant}: " + json.dumps(rep))
        print("\n" + table)
        for w in job.get("warnings") or []:
            print("warning:", w)
        results.update(analysis_id=job["id"], summary=summary, metrics=metrics, table=table,
                       warnings=job.get("warnings"), wall_s=round(time.monotonic() - started, 1))

        if not args.no_verify_patch:
            # With several methods, the first method's patch (model.patch.method picks it).
            patch = {"analysis_id": job["id"], **({"method": args.method[0]} if len(args.method) > 1 else {})}
            check = {
                "model": {"name": args.model, "patch": patch},
                "dataset": {"name": "chatterbot-conversations", "limit": 16},
                "stages": {"avss": {"plots": False}},
                "labels": {"bench": "mitigation-patch-check"},
            }
            resp = client.post("/v1/analyses", json=check)
            resp.raise_for_status()
            print(f"\npatch check: submitted {resp.json()['id']} (base model + patch from {job['id']})")
            verified = wait(client, resp.json()["id"], args.poll, time.monotonic())
            print(f"patch check: {verified['state']} {verified.get('error') or ''}")
            results["patch_check"] = {"analysis_id": verified["id"], "state": verified["state"],
                                      "error": verified.get("error")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
