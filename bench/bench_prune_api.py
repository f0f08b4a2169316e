"""Pruning benchmark through the API: SmolLM2-135M pruned by AVSS, every baseline scorer and
the random control; retained performance with paired intervals on held-out perplexity and on
an lm-eval multiple-choice task from a local-file YAML; the trade-off curve as a picture.

    python bench/bench_prune_api.py                    # embedded service in this process (SQLite)
    python bench/bench_prune_api.py --api http://127.0.0.1:8000 --api-key $KEY   # a running server

One analysis (stages avss + prune). Data, from ../shared/data/qa (LAYERSCOPE_BENCH_DATA_DIR):
the analysis dataset (profiled by AVSS, scored by the baselines) is --texts distinct WikiQA
*train* answer sentences; perplexity is measured on --heldout distinct WikiQA *validation*
answer sentences none of which is in the analysis texts (`perplexity_dataset`); the lm-eval
task is the shipped `layerscope_sciq_mc` (SciQ validation, multiple choice built from its short
answers) on its first --mc documents. With --api, the server's LAYERSCOPE_DATA_ROOTS must hold
the data folder (the embedded service here is started with it). Prints a markdown table and
writes it, the stored results (JSON) and the curve (PNG) under --out. Asserts nothing about the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_hallucination import DATA_DIR, require_file  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", default=None, help="base URL of a running server (default: embedded, in this process)")
    ap.add_argument("--api-key", default=None, help="API key (or env LAYERSCOPE_API_KEY)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", type=int, default=32, help="analysis texts (AVSS profile, baseline scoring)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out perplexity texts")
    ap.add_argument("--mc", type=int, default=60, help="SciQ multiple-choice documents (lm-eval limit)")
    ap.add_argument("--no-mc", action="store_true", help="perplexity only (no lm-eval task): a cheaper run")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--scorers", nargs="+",
                    default=["avss", "gbis", "lrp", "cim", "block_influence", "angular_distance"])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--curve", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--timing-runs", type=int, default=15)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--heal-steps", type=int, default=0, help="LoRA healing steps per pruned model (0: no healing)")
    ap.add_argument("--heal-lr", type=float, default=1e-3, help="healing learning rate")
    ap.add_argument("--heal-random-seeds", type=int, default=1, help="random seeds healed (the first ones)")
    ap.add_argument("--poll", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    return ap.parse_args(argv)


def wikiqa_sentences(path: Path) -> list[str]:
    """Distinct answer sentences of a LitCab-format WikiQA file, in file order."""
    seen: dict[str, None] = {}
    for record in require_file(path).read_text(encoding="utf-8").strip().split("\n\n"):
        lines = record.strip().split("\n")
        if len(lines) >= 2 and lines[1].strip():
            seen.setdefault(lines[1].strip(), None)
    return list(seen)


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    train = wikiqa_sentences(args.data_dir / "wikiqa" / "train.txt")[: args.texts]
    used = set(train)
    heldout = [t for t in wikiqa_sentences(args.data_dir / "wikiqa" / "validation.txt") if t not in used]
    require_file(args.data_dir / "sciq" / "validation.txt")
    spec: dict[str, Any] = {
        "model": {"name": args.model},
        "dataset": {"rows": [{"text": t} for t in train], "limit": len(train), "max_tokens": args.max_tokens},
        "stages": {
            "avss": {"plots": False},
            "prune": {
                "scorers": args.scorers,
                "fraction": args.fraction,
                "tasks": ["perplexity"] if args.no_mc else ["perplexity", "lm_eval"],
                "perplexity_dataset": {"rows": [{"text": t} for t in heldout[: args.heldout]],
                                       "limit": args.heldout},
                **({} if args.no_mc else {"lm_eval": {
                    "task": "layerscope_sciq_mc", "data_files": "sciq/validation.txt", "limit": args.mc,
                    "num_fewshot": 0}}),
                "random_seeds": args.random_seeds,
                "scoring_examples": 16,
                "curve_blocks": args.curve,
                "timing_runs": args.timing_runs,
                "timing_batch_size": 2,
                "n_boot": args.n_boot,
                "batch_size": 8,
            },
        },
        "labels": {"bench": "prune-api"},
    }
    if args.heal_steps:  # healing corpus: the built-in conversation lines (worker/pruning_heal.py)
        spec["stages"]["prune"]["heal"] = {"steps": args.heal_steps, "learning_rate": args.heal_lr, "max_tokens": 64,
                                           "random_seeds": args.heal_random_seeds}
    return spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_embedded(data_dir: Path) -> tuple[str, Any]:
    """The service and its in-process worker on SQLite, allowed to read `data_dir` (the demo's set-up)."""
    import httpx
    import uvicorn

    from app.config import Settings, get_settings
    from app.main import create_app
    from app.migrate import upgrade
    from cli.main import start_embedded_worker

    settings = Settings(database_url=None, redis_url=None, auth_disabled=True, data_dir=get_settings().data_dir,
                        data_roots=[data_dir])
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    api = create_app(settings)
    worker = start_embedded_worker(api, settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)

    def stop() -> None:
        server.should_exit = True
        worker.stop()
        thread.join(timeout=10)

    return base, stop


def fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def ci(lo: Any, hi: Any, digits: int = 4) -> str:
    return "-" if lo is None or hi is None else f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def tables(summary: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    """Markdown: per task, per scorer (and random), the metric, retained % with its interval,
    the share of random seeds beaten, parameter reduction and speed-up."""
    by = {(m["scope"], m["name"]): m for m in metrics}
    out: list[str] = []
    for entry in summary["table"]:
        task, name = entry["task"], entry["metric"]
        out.append(f"\n**{task}** ({name}, {'higher' if entry['higher_is_better'] else 'lower'} is better; "
                   f"original {fmt(entry['original'])} {ci(*entry['original_ci'])}, n = {entry['n']})\n")
        healed = any("healed" in r for r in entry["rows"])
        out.append("| scorer | layers removed | " + name + " [95% CI] | retained % [paired 95% CI] | "
                   "beats random (share of seeds) | params removed % | speed-up [95% CI] |"
                   + (" after healing: retained % [paired 95% CI] | healing gain, points [95% CI] |" if healed else ""))
        out.append("|---|---|---|---|---|---|---|" + ("---|---|" if healed else ""))
        for r in entry["rows"]:
            s = r["scorer"]
            kept = by.get((f"task={task},scorer={s}", "retained_pct"), {})
            if s == "random":
                lo, hi = r.get(f"{name}_seed_range", [None, None])
                val = f"{fmt(r.get(name))} (seeds {fmt(lo)}-{fmt(hi)})"
                kr = r.get("retained_pct_per_seed") or []
                kept_txt = (f"{fmt(kept.get('value'))} {ci(kept.get('ci_low'), kept.get('ci_high'))}; seeds "
                            + ", ".join(fmt(v, 3) for v in kr))
                label = f"random (median of {len(r.get('seeds', []))} seeds)"
                removed = str(r.get("layers_removed_count"))
                beats = ""
                sp = f"{fmt(r.get('speedup'), 3)} (seeds {ci(*r.get('speedup_seed_range', [None, None]), 3)})"
            else:
                mv = by.get((f"task={task},scorer={s}", name), {})
                val = f"{fmt(mv.get('value'))} {ci(mv.get('ci_low'), mv.get('ci_high'))}"
                kept_txt = f"{fmt(kept.get('value'))} {ci(kept.get('ci_low'), kept.get('ci_high'))}"
                label, removed = s, str(r.get("layers_removed"))
                share = by.get((f"task={task},scorer={s}", "beats_random_share"))
                beats = (f"{fmt(share['value'], 2)} of {share['n']}" if share else "")
                flag = " (includes 1)" if r.get("speedup_includes_one") else ""
                sp = f"{fmt(r.get('speedup'), 3)} {ci(*r.get('speedup_ci', [None, None]), 3)}{flag}"
            after = ""
            if healed:
                hk = by.get((f"task={task},scorer={s},variant=healed", "retained_pct"), {})
                hg = by.get((f"task={task},scorer={s},variant=healed", "heal_gain_pct"), {})
                after = (f" {fmt(hk.get('value'))} {ci(hk.get('ci_low'), hk.get('ci_high'))} | "
                         f"{fmt(hg.get('value'), 3)} {ci(hg.get('ci_low'), hg.get('ci_high'), 3)} |")
            out.append(f"| {label} | {removed} | {val} | {kept_txt} | {beats} | "
                       f"{fmt(r.get('parameter_reduction_pct'), 3)} | {sp} |{after}")
    curve = summary.get("curve")
    if curve:
        out.append("\n**Trade-off curve** (retained % [paired 95% CI] after removing k blocks)\n")
        for task, entry in curve["tasks"].items():
            out.append(f"\n{task} ({entry['metric']}):\n")
            out.append("| scorer | " + " | ".join(f"k = {k}" for k in curve["blocks"]) + " |")
            out.append("|---|" + "---|" * len(curve["blocks"]))
            for s, points in entry["scorers"].items():
                cells = [f"{fmt(p['retained_pct'], 3)} {ci(*p['ci'], 3)}" for p in points]
                out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import httpx

    args = parse_args(argv)
    spec = build_spec(args)
    stop = None
    base = args.api
    if base is None:
        base, stop = start_embedded(args.data_dir.resolve())
        print(f"embedded service at {base} (SQLite, in-process worker; data root {args.data_dir})", flush=True)
    key = args.api_key or os.environ.get("LAYERSCOPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.monotonic()
    try:
        with httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=120.0) as client:
            resp = client.post("/v1/analyses", json=spec)
            if resp.status_code >= 400:
                raise SystemExit(f"submit failed: HTTP {resp.status_code}: {resp.text[:2000]}")
            job_id = resp.json()["id"]
            print(f"submitted {job_id}", flush=True)
            last = None
            while True:
                job = client.get(f"/v1/analyses/{job_id}").json()
                p = job.get("progress") or {}
                shown = (job["state"], p.get("stage"))
                if shown != last:
                    print(f"  [{time.monotonic() - started:7.1f}s] {job['state']} {p.get('stage')} "
                          f"{p.get('done')}/{p.get('total')}", flush=True)
                    last = shown
                if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(args.poll)
            if job["state"] != "SUCCEEDED":
                raise SystemExit(f"job {job_id} {job['state']}: {job.get('error')}")
            summary = job["summary"]["prune"]
            items = client.get(f"/v1/analyses/{job_id}/metrics", params={"stage": "prune"}).json()["items"]
            png = client.get(f"/v1/analyses/{job_id}/artifacts/prune_tradeoff.png")
            wall = time.monotonic() - started
            text = tables(summary, items)
            print(f"\nanalysis {job_id} ({wall:.0f} s)\n{text}")
            for w in job.get("warnings") or []:
                print("warning:", w)
            args.out.mkdir(parents=True, exist_ok=True)
            stem = f"prune_api_{args.model.replace('/', '_')}"
            (args.out / f"{stem}.md").write_text(text + "\n")
            (args.out / f"{stem}.json").write_text(json.dumps(
                {"analysis_id": job_id, "wall_s": round(wall, 1), "spec": spec | {"dataset": "(rows)"},
                 "summary": summary, "metrics": items, "warnings": job.get("warnings")}, indent=1, default=str))
            if png.status_code == 200:
                (args.out / f"{stem}_tradeoff.png").write_bytes(png.content)
            print(f"wrote {args.out / stem}.md/.json/_tradeoff.png")
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
