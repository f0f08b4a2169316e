"""Hallucination benchmark: SmolLM2-135M on the LitCab QA sets in ../shared/data/qa
(paper table 2 and appendix A), run directly (library call) or through the API.

    python bench/bench_hallucination.py --datasets sciq:600 truthfulqa:397
    python bench/bench_hallucination.py --api http://127.0.0.1:8000 --api-key ls_... \
        --datasets sciq:600 truthfulqa:397

Each `name:N` takes N questions of `<data-dir>/<file>` (shuffled with --seed), splits them
by distinct question into a training part (few-shot prompt and probe training) and a
disjoint test part (--test-fraction, where every detector is scored). Prints, and does
not assert: the table-2 layout (every detector's acc@50, cov@50, ECE, ece_litcab,
Brier, AUROC with bootstrap 95% intervals and N), the detector leaderboard (every
detector by test AUROC against the length baseline and the best toolkit estimator), the
layers each layer-choosing probe used, the layers EAVSS ranks top, the best single-layer
probes (appendix A), counts and timings; writes everything as JSON to --out.
`--show name=ID ...` prints the same report for analyses that already finished.

Direct mode loads the data with `worker.datasets.load_examples` (data root = --data-dir)
and calls `worker.hallucination.stage.analyze_hallucination`. API mode sends the rows
inline (`dataset.rows`, so the server needs no data root) with `stages.hallucination`
set from the same flags, polls the job and reads the metrics, layers and artifacts
back.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# LitCab's QA sets as files: `<name>/train.txt` (question, blank-line separated records) or `.csv`.
DATA_DIR = Path(os.environ.get("LAYERSCOPE_BENCH_DATA_DIR", ROOT.parent / "shared" / "data" / "qa"))


def require_file(path: Path) -> Path:
    """The data file, or exit with a message that says what is missing and how to point at it."""
    if not path.is_file():
        raise SystemExit(
            f"benchmark data not found: {path}\n"
            "These benchmarks read LitCab's QA sets (sciq, truthfulqa, wikiqa, NQ, triviaqa) as local files; "
            "pass --data-dir DIR (or set LAYERSCOPE_BENCH_DATA_DIR) to the folder that holds "
            f"{path.parent.name}/{path.name}."
        )
    return path
FILES = {
    "sciq": "sciq/train.txt",
    "sciq-validation": "sciq/validation.txt",
    "truthfulqa": "truthfulqa/train.txt",
    "wikiqa": "wikiqa/train.txt",
    "nq": "NQ/train.csv",
    "triviaqa": "triviaqa/train.csv",
}
TABLE_ROWS = ("acc@50", "cov@50", "ece", "ece_litcab", "brier", "auroc", "accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["sciq:600", "truthfulqa:397"],
                    help=f"name:N with name in {sorted(FILES)}")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--api", default=None, help="base URL of a running layerscope API; default: direct library call")
    ap.add_argument("--api-key", default=None, help="API key (or env LAYERSCOPE_API_KEY)")
    ap.add_argument("--poll", type=float, default=5.0, help="API mode: seconds between status polls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--n-shots", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=5, help="self-consistency samples")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--top-k-layers", type=int, default=3)
    ap.add_argument("--detectors", nargs="+", default=None)
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--token-scope", choices=["answer", "all"], default="answer")
    ap.add_argument("--profile-context", choices=["prompt", "question"], default="prompt")
    ap.add_argument("--threads", type=int, default=None, help="direct mode: torch.set_num_threads")
    ap.add_argument("--show", nargs="+", default=None, metavar="NAME=ANALYSIS_ID",
                    help="API mode: print the report of finished analyses (no submission), e.g. sciq=<id>")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    ap.add_argument("--answers-dir", type=Path, default=None, help="write <dataset>.answers.jsonl there")
    return ap.parse_args(argv)


def stage_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "n_shots": args.n_shots,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "self_consistency_k": args.k,
        "self_consistency_temperature": args.temperature,
        "n_boot": args.n_boot,
        "top_k_layers": args.top_k_layers,
        "use_chat_template": args.chat_template,
        "token_scope": args.token_scope,
        "profile_context": args.profile_context,
    }
    if args.detectors:
        opts["detectors"] = args.detectors
    return opts


def dataset_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    out = []
    for item in args.datasets:
        name, _, n = item.partition(":")
        if name not in FILES:
            raise SystemExit(f"unknown dataset {name!r}; known: {sorted(FILES)}")
        require_file(args.data_dir / FILES[name])
        out.append((name, int(n) if n else 10**9))
    return out


# --------------------------------------------------------------------- printing


def fmt(value: Any, low: Any = None, high: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def table_from_metrics(metrics: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    cols: list[str] = []
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for m in metrics:
        scope = m["scope"]
        if not scope.startswith("detector="):
            continue
        det = scope.split("=", 1)[1]
        if det not in cols:
            cols.append(det)
        cells.setdefault(m["name"], {})[det] = m
    return cols, cells


def print_report(name: str, report: dict[str, Any]) -> None:
    cols, cells = table_from_metrics(report["metrics"])
    n = next((m["n"] for m in report["metrics"] if m.get("n")), None)
    print(f"\n### {name} (test N = {n})\n")
    print("| metric | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for metric in TABLE_ROWS:
        row = cells.get(metric, {})
        print(f"| {metric} | " + " | ".join(
            fmt(row[c]["value"], row[c]["ci_low"], row[c]["ci_high"]) if c in row else "n/a" for c in cols
        ) + " |")
    summary = report["summary"]
    counts = summary.get("counts", {})
    print(f"\ncounts: {json.dumps({k: v for k, v in counts.items() if k != 'rules'})}")
    print(f"rules: {json.dumps(counts.get('rules', {}))}")
    ls = summary.get("layer_scores", {})
    print(f"EAVSS (train split, n_correct={ls.get('n_correct')}, n_hallucinated={ls.get('n_hallucinated')}): "
          f"top layers {ls.get('top_layers')}, full ranking {ls.get('ranking')}")
    probes = [r for r in report["layers"] if r["scorer"] == "layer_probe" and r["values"].get("auroc") is not None]
    probes.sort(key=lambda r: -r["values"]["auroc"])
    print("best single-layer probes (AUROC): " + ", ".join(
        f"L{r['layer']} {r['values']['auroc']:.3f}" for r in probes[:5]))
    eav = {r["layer"]: r["values"] for r in report["layers"] if r["scorer"] == "eavss"}
    if probes and eav:
        print("layer | eavss rank | probe auroc | probe ece | probe brier")
        for r in sorted(probes, key=lambda r: r["layer"]):
            v = r["values"]
            print(f"  {r['layer']:>3} | {int(eav[r['layer']]['rank']):>3} | {fmt(v.get('auroc'))} | "
                  f"{fmt(v.get('ece'))} | {fmt(v.get('brier'))}")
    print_leaderboard(report.get("leaderboard") or summary.get("leaderboard"), summary.get("layer_choice"))
    print(f"warnings: {report.get('warnings')}")
    print(f"timings (s): {json.dumps(summary.get('timings_s', report.get('timings_s')))}")


VERDICT = {"better": "better", "worse": "worse", "not_distinguishable": "tie", "no_interval": "n/a", "undefined": "n/a"}


def print_leaderboard(board: dict[str, Any] | None, choice: dict[str, Any] | None) -> None:
    """The detector leaderboard (GET .../leaderboard) as Markdown, and which layers each probe chose."""
    if not board:
        return
    mets = board["metrics"]
    print(f"\nleaderboard (test N = {board['n']}; length baseline: {board['length_baseline']}, best toolkit "
          f"estimator: {board['best_toolkit']}; vs: AUROC difference [paired 95% CI], verdict)\n")
    print("| rank | detector | " + " | ".join(mets) + " | vs length | vs best toolkit |")
    print("|---" * (len(mets) + 4) + "|")
    for r in board["rows"]:
        cells = [fmt(c["value"], c["ci_low"], c["ci_high"]) if c else "n/a" for c in (r["metrics"][m] for m in mets)]
        vs = []
        for key in ("vs_length", "vs_toolkit"):
            c = r[key]
            if c is None:
                vs.append("(reference)" if key.removeprefix("vs_") in r["reference"] else "n/a")
                continue
            d = c["auroc_difference"]
            text = "n/a" if d["value"] is None else f"{d['value']:+.3f}"
            if d.get("ci_low") is not None and d.get("ci_high") is not None:
                text += f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            vs.append(f"{text} {VERDICT.get(c['verdict'], c['verdict'])}")
        name = r["detector"] + (" (toolkit)" if r["toolkit"] else "")
        print(f"| {r['rank']} | {name} | " + " | ".join(cells) + " | " + " | ".join(vs) + " |")
    if choice:
        print(f"\nlayers: eavss_probe {choice.get('eavss_probe')}, best_layer_probe {choice.get('best_layer_probe')}, "
              f"all_layers_probe {len(choice.get('all_layers_probe') or [])} layers; EAVSS's layers among "
              f"{choice.get('n_layers')}: " + ", ".join(
                  f"{e['layer']} (train-CV rank {e['train_cv_rank']}, test-AUROC rank {e['test_auroc_rank']})"
                  for e in choice.get("eavss_layers", [])))
        print(f"layers by test AUROC of their own probe (reporting only): {choice.get('layer_test_auroc_ranking')}")


# --------------------------------------------------------------------- direct


class _Printer:
    """A progress callback printing at most every 30 s."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last > 30 or done == total:
            self.last = now
            print(f"  [{now - self.start:7.1f}s] {stage} {done}/{total}", flush=True)


def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from app.config import Settings
    from app.schemas import DatasetSpec, HallucinationOptions, ModelSpec
    from worker.datasets import load_examples
    from worker.hallucination.stage import analyze_hallucination, split_examples
    from worker.modelzoo import load_model
    from worker.stage import JobContext

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(data_roots=[args.data_dir])
    t0 = time.monotonic()
    loaded = load_model(ModelSpec(name=args.model), settings)
    print(f"model {loaded.name} ({loaded.source}) on {loaded.device}, torch threads {torch.get_num_threads()}, "
          f"loaded in {time.monotonic() - t0:.1f}s", flush=True)
    options = HallucinationOptions(**stage_options(args))
    results: dict[str, Any] = {}
    for name, n in dataset_list(args):
        examples = load_examples(DatasetSpec(path=FILES[name], limit=min(n, 100_000), seed=args.seed), settings)
        train, test = split_examples(examples, options.test_fraction, options.seed)
        print(f"\n{name}: {len(examples)} questions -> {len(train)} train ({options.n_shots} shots), "
              f"{len(test)} test", flush=True)
        start = time.monotonic()
        run = analyze_hallucination(loaded, train, test, options, JobContext(progress=_Printer(start)),
                                    dataset_name=name)
        res = run.result
        report = {
            "summary": res.summary,
            "metrics": [vars(m) for m in res.metrics],
            "layers": [vars(r) for r in res.layers],
            "warnings": res.warnings,
            "answers_head": [a.to_dict() for a in run.answers[:5]],
            "wall_s": round(time.monotonic() - start, 1),
        }
        results[name] = report
        print_report(name, report)
        if args.answers_dir:
            save_answers(args.answers_dir, name, next(a.data for a in res.artifacts if a.name == "answers.jsonl"))
    return results


def save_answers(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.answers.jsonl").write_bytes(data)


# --------------------------------------------------------------------- API


def read_rows(path: Path) -> list[dict[str, str]]:
    """LitCab files as {question, answer} rows (the same parsing as the service)."""
    require_file(path)
    if path.suffix == ".csv":
        import csv

        rows = []
        with path.open(encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                ans = r["answer"]
                try:
                    parsed = ast.literal_eval(ans)
                    if isinstance(parsed, list):
                        ans = "; ".join(str(a) for a in parsed)
                except (ValueError, SyntaxError):
                    pass
                rows.append({"question": r["question"], "answer": ans})
        return rows
    records = [r.strip().split("\n") for r in path.read_text(encoding="utf-8").strip().split("\n\n")]
    return [{"question": r[0].strip(), "answer": r[1].strip()} for r in records if len(r) == 2]


def run_api(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import random

    import httpx

    key = args.api_key or os.environ.get("LAYERSCOPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = args.api.rstrip("/")
    results: dict[str, Any] = {}
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
        for name, n in dataset_list(args):
            rows = read_rows(args.data_dir / FILES[name])
            random.Random(args.seed).shuffle(rows)  # the server reshuffles with the same seed; send only N
            rows = rows[: min(n, 10_000)]
            body = {
                "model": {"name": args.model},
                "dataset": {"rows": rows, "limit": len(rows), "seed": args.seed, "max_tokens": 1024},
                "stages": {"hallucination": stage_options(args)},
                "labels": {"bench": "hallucination", "dataset": name},
            }
            start = time.monotonic()
            resp = client.post("/v1/analyses", json=body)
            if resp.status_code >= 400:
                raise SystemExit(f"submit failed: HTTP {resp.status_code}: {resp.text[:2000]}")
            job = resp.json()
            print(f"\n{name}: submitted {job['id']} with {len(rows)} questions", flush=True)
            while True:
                job = client.get(f"/v1/analyses/{job['id']}").json()
                p = job.get("progress") or {}
                print(f"  [{time.monotonic() - start:7.1f}s] {job['state']} {p.get('stage')} "
                      f"{p.get('done')}/{p.get('total')}", flush=True)
                if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(args.poll)
            if job["state"] != "SUCCEEDED":
                raise SystemExit(f"job {job['id']} {job['state']}: {job.get('error')}")
            results[name] = read_report(client, job, args, round(time.monotonic() - start, 1))
            print_report(name, results[name])
    return results


def read_report(client: Any, job: dict[str, Any], args: argparse.Namespace, wall_s: float | None) -> dict[str, Any]:
    """A finished analysis's metrics, layers, summary and leaderboard, read back through the API."""
    metrics = client.get(f"/v1/analyses/{job['id']}/metrics", params={"stage": "hallucination"}).json()
    layers = client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "hallucination"}).json()
    board = client.get(f"/v1/analyses/{job['id']}/leaderboard")
    summary = job.get("summary") or {}
    report = {
        "analysis_id": job["id"],
        "summary": summary.get("hallucination", summary),
        "metrics": metrics["items"],
        "layers": layers["items"],
        "leaderboard": board.json() if board.status_code == 200 else None,
        "warnings": job.get("warnings"),
        "wall_s": wall_s,
    }
    if args.answers_dir:
        name = (job.get("labels") or {}).get("dataset", job["id"])
        art = client.get(f"/v1/analyses/{job['id']}/artifacts/answers.jsonl")
        if art.status_code == 200:
            save_answers(args.answers_dir, name, art.content)
    return report


def show_api(args: argparse.Namespace) -> dict[str, Any]:
    """`--show name=id ...`: print the reports of finished analyses."""
    import os

    import httpx

    key = args.api_key or os.environ.get("LAYERSCOPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results: dict[str, Any] = {}
    with httpx.Client(base_url=args.api.rstrip("/"), headers=headers, timeout=60.0) as client:
        for item in args.show:
            name, _, analysis_id = item.rpartition("=")
            job = client.get(f"/v1/analyses/{analysis_id}").json()
            results[name or analysis_id] = report = read_report(client, job, args, None)
            print_report(name or analysis_id, report)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    if args.show and not args.api:
        raise SystemExit("--show reads finished analyses through the API: give --api")
    results = (show_api(args) if args.show else run_api(args)) if args.api else run_direct(args)
    total = time.monotonic() - started
    print(f"\ntotal wall time {total:.1f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "wall_s": total}
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
