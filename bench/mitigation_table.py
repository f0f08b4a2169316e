"""One markdown table of several `bench_mitigation.py --out` files (per dataset, one run with
several methods or one per method, same split and seed): per dataset the base model, then per method its EAVSS
variant and its random-layer control, with answer accuracy and sequence-likelihood ECE
and AUROC (95% bootstrap intervals) and the paired differences against base and against
the control; a difference whose interval covers 0 is marked "n.s."; and the cost (`summary.cost`:
seconds to fit, seconds of the evaluation, answer tokens per evaluation second, which for a
decoding method is its decoding cost against base's; wall time on a shared machine).

    python bench/mitigation_table.py /tmp/sciq_contrastive.json /tmp/sciq_steering.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DETECTOR = "sequence_likelihood"


def _cell(m: dict[str, Any] | None, signed: bool = False, verdict: bool = False) -> str:
    if m is None or m.get("value") is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(m["value"])
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is not None and hi is not None:
        text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
        if verdict and lo <= 0 <= hi:
            text += " n.s."
    return text


def rows_of(path: Path) -> tuple[str, list[str]]:
    """(dataset, table rows): base, then per method its EAVSS variant and its control."""
    res = json.loads(path.read_text())
    s = res["summary"]
    methods = s.get("methods") or [s.get("method", "contrastive")]
    several = len(methods) > 1
    dataset = str(res["args"].get("dataset") or s.get("dataset") or "?").split(":")[0]
    by = {(m["scope"], m["name"]): m for m in res["metrics"]}
    n = by.get(("variant=base", "accuracy"), {}).get("n")

    def row(label: str, variant: str, layers: list[int] | None, control: str | None = None) -> str:
        acc = _cell(by.get((f"variant={variant}", "accuracy")))
        ece = _cell(by.get((f"variant={variant},detector={DETECTOR}", "ece")))
        auroc = _cell(by.get((f"variant={variant},detector={DETECTOR}", "auroc")))
        vs_base = variant != "base"
        d_acc = _cell(by.get((f"delta={variant}-base", "accuracy")), True, True) if vs_base else ""
        d_ece = _cell(by.get((f"delta={variant}-base,detector={DETECTOR}", "ece_relative")), True, True) \
            if vs_base else ""
        d_ctl = _cell(by.get((f"delta={variant}-{control}", "accuracy")), True, True) if control else ""
        where = f" (layers {', '.join(map(str, layers))})" if layers else ""
        cost = (s.get("cost") or {}).get(variant) or {}
        fit = f"{cost['fit_seconds']:.0f}" if "fit_seconds" in cost else ""
        evals = f"{cost['eval_seconds']:.0f}" if "eval_seconds" in cost else ""
        rate = f"{cost['answer_tokens_per_eval_second']:.2f}" if "answer_tokens_per_eval_second" in cost else ""
        return (f"| {dataset} | {label}{where} | {n} | {acc} | {d_acc} | {d_ctl} | {ece} | {d_ece} | {auroc} "
                f"| {fit} | {evals} | {rate} |")

    lines = [row("base", "base", None)]
    for method in methods:
        eavss, random = (f"{method}_{w}" if several else w for w in ("eavss", "random"))
        has_control = bool(s.get("control_layers"))
        lines.append(row(f"{method}, EAVSS layers", eavss, s.get("layers"), random if has_control else None))
        if has_control:
            lines.append(row(f"{method}, random layers", random, s.get("control_layers")))
    return dataset, lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args(argv)
    print("| dataset | variant | test N | accuracy | minus base | EAVSS minus random | "
          f"{DETECTOR} ECE | ECE change vs base (relative) | {DETECTOR} AUROC | fit s | evaluation s | "
          "answer tokens / evaluation s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    seen_base: set[str] = set()
    for path in args.files:
        dataset, lines = rows_of(path)
        if dataset in seen_base:
            lines = lines[1:]  # one base row per dataset (same split and seed: the same base)
        seen_base.add(dataset)
        print("\n".join(lines))


if __name__ == "__main__":
    main()
