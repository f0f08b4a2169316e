"""Profiler benchmark on SmolLM2-135M and real text (chatterbot english conversations).

    python bench/bench_profiler.py [--texts 24] [--batch-size 8] [--max-tokens 128] [--repeats 3] [--threads N]
                                   [--sites ...] [--memory-texts 8] [--skip speed memory numerics]
                                   [--baseline-rev REV]

Prints, and does not assert:
(a) speed: one pass over the same pre-tokenized batches, bare forward vs the profiler's
    per-batch work (hooks + on-device reductions + host merge), interleaved repeats,
    ratio of medians (target <= 1.15); the same without the fine |a| windows ("coarse":
    the coarse histogram only, what the windows cost); with --baseline-rev, the same for the
    profiler's reductions as of that git revision (before/after in one run); the same for
    the naive way (hooks keep every
    block's output, statistics computed afterwards over the kept tensors, as the
    reference code does); and profile() end to end (tokenization included) vs the
    bare pass.
(b) memory: profile() on N and 10 x N examples, each in a fresh subprocess: peak RSS
    sampled every 2 ms during the call, minus the RSS just before it (after a warm-up
    call, so allocator pools and lazy initialisation are paid already); target: the
    10 x N peak within 5 % of the N peak (whole process), and the working-memory delta
    reported too.
(c) numerics: streamed statistics from profile() vs float64 statistics over the full
    activation tensors captured from the very same forward passes; max relative error
    of count, mean, M2, sum|a|, sum a^2, max|a| (target 1e-9); what per-token float32
    reductions would give instead; sparsity at 0.01 x RMS read off the fine windows vs an
    exact count, and the largest stated bound (target 1e-4).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.schemas import ProfileOptions  # noqa: E402
from worker.lm.model import forward_callable  # noqa: E402
from worker.lm.tokens import encode_texts, length_batches, pad_batch, pad_id  # noqa: E402
from worker.profiler.hooks import capture  # noqa: E402
from worker.profiler.profiler import _Collector, _merge_batch, fine_spec, profile  # noqa: E402
from worker.profiler.stats import BatchPlan, FineSpec, HistogramSpec, RunningStats  # noqa: E402
from worker.stage import JobContext  # noqa: E402


def corpus_texts(n: int, chars: int = 300) -> list[str]:
    """n texts of about `chars` characters: consecutive conversation lines of the
    chatterbot english corpus, cycled with a shifted start when more are needed."""
    import chatterbot_corpus
    import yaml

    base = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(base, "*.yml"))):
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        for conversation in data.get("conversations", []) or []:
            lines.extend(str(x) for x in conversation)
    texts: list[str] = []
    shift = 0
    while len(texts) < n:
        current = ""
        for line in lines[shift:]:
            current = f"{current} {line}".strip()
            if len(current) >= chars:
                texts.append(current)
                current = ""
                if len(texts) >= n:
                    break
        shift += 7
    return texts[:n]


def load_smollm2() -> Any:
    from app.config import Settings
    from app.schemas import ModelSpec
    from worker.modelzoo import load_model

    return load_model(ModelSpec(name="smollm2-135m", device="cpu", dtype="float32"), Settings())


def prepared_batches(loaded: Any, texts: list[str], batch_size: int, max_tokens: int) -> list[tuple]:
    lengths = [len(x) for x in encode_texts(loaded.tokenizer, texts, max_tokens)]
    out = []
    for batch in length_batches(lengths, batch_size):
        ids = encode_texts(loaded.tokenizer, [texts[i] for i in batch], max_tokens)
        input_ids, mask = pad_batch(ids, pad_id(loaded.tokenizer))
        out.append((batch, [len(x) for x in ids], input_ids, mask))
    return out


# ------------------------------------------------------------------ (a) speed


class _Runner:
    """The three ways of running one batch, sharing the hook registrations of a pass."""

    def __init__(self, loaded: Any, batches: list[tuple], sites: list[str]) -> None:
        from worker.profiler.profiler import Profile

        self.blocks = loaded.adapter.blocks(loaded.model)
        self.forward = forward_callable(loaded.model, self.blocks)
        self.sites = sites
        self.spec = HistogramSpec()
        self.fine = fine_spec([(0.01, "rms")])  # what profile() places by default
        self.result, self.coarse_result = (
            Profile(
                block_names=[b.name for b in self.blocks],
                layer_indices=[b.index for b in self.blocks],
                sites=sites,
                stats={(i, s): RunningStats(self.spec, fine=f) for i in range(len(self.blocks)) for s in sites},
                lead={(i, s): RunningStats(self.spec, fine=f) for i in range(len(self.blocks)) for s in sites},
                spec=self.spec,
                fine=f,
            )
            for f in (self.fine, None)
        )
        self.collector = _Collector()
        self.coarse_collector = _Collector()
        self.kept: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.edges = torch.as_tensor(self.spec.edges)

    def bare(self, batch: tuple) -> None:
        with torch.inference_mode():
            self.forward(batch[2], batch[3])

    def profiled(self, batch: tuple, coarse: bool = False) -> None:
        """What profile() does per batch: plan, hooked forward with device reductions, merge.
        coarse: without the fine windows (the coarse histogram only)."""
        examples, lens, input_ids, mask = batch
        collector = self.coarse_collector if coarse else self.collector
        with torch.inference_mode(), capture(self.blocks, self.sites, collector):
            plan = BatchPlan.build(
                lens, input_ids.shape[1], spec=self.spec, lead_positions=1, fine=None if coarse else self.fine
            )
            collector.begin(plan, len(examples), input_ids.shape[1])
            self.forward(input_ids, mask)
            _merge_batch(self.coarse_result if coarse else self.result, collector.finish(), plan, examples)

    def coarse(self, batch: tuple) -> None:
        self.profiled(batch, coarse=True)

    def _keep(self, position: int, site: str, tensor: torch.Tensor) -> None:
        self.kept.setdefault((position, site), []).append(tensor.detach().clone())

    def naive(self, batch: tuple) -> None:
        """Reference-code style: hooks keep every block's output, statistics computed over
        the kept tensors afterwards (here per batch; the reference keeps the whole dataset,
        which costs the same time and far more memory)."""
        _, _, input_ids, mask = batch
        self.kept = {}
        with torch.inference_mode(), capture(self.blocks, self.sites, self._keep):
            self.forward(input_ids, mask)
        m = mask.bool()
        with torch.inference_mode():
            for tensors in self.kept.values():
                t = tensors[0]
                x = t[m].double()
                a = x.abs()
                _ = (x.numel(), x.mean(), x.var(unbiased=False), a.sum(), (x * x).sum(), a.max())
                _ = torch.bucketize(a.flatten(), self.edges).bincount(minlength=len(self.edges) + 1)
                mf = m.to(t.dtype)[..., None]
                _ = (t * mf).sum(1).div(mf.sum(1)).double().var(-1, unbiased=False).sum()
                _ = (a.sum(-1).mean(), x.norm(dim=-1).mean(), x.norm())
        self.kept = {}


class _Baseline:
    """The per-batch work of the profiler as of another git revision: its
    worker/profiler/stats.py (self-contained) loaded apart, driven the way that revision's
    profile() drove it (one reduction per hook, one transfer per batch, host merge)."""

    def __init__(self, rev: str, runner: _Runner) -> None:
        import importlib.util
        import tempfile

        source = subprocess.run(
            ["git", "show", f"{rev}:worker/profiler/stats.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        path = Path(tempfile.mkdtemp()) / "baseline_stats.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("baseline_stats", path)
        assert spec is not None and spec.loader is not None
        self.mod = importlib.util.module_from_spec(spec)
        sys.modules["baseline_stats"] = self.mod
        spec.loader.exec_module(self.mod)
        self.runner = runner
        self.hspec = self.mod.HistogramSpec()
        keys = [(i, s) for i in range(len(runner.blocks)) for s in runner.sites]
        self.stats = {k: self.mod.RunningStats(self.hspec) for k in keys}
        self.lead = {k: self.mod.RunningStats(self.hspec) for k in keys}
        self.plan: Any = None
        self.pending: list[tuple[tuple[int, str], Any, Any, int]] = []

    def _hook(self, position: int, site: str, tensor: torch.Tensor) -> None:
        vec, hist = self.mod.reduce_activations(tensor, self.plan)[:2]
        self.pending.append(((position, site), vec, hist, tensor.shape[-1]))

    def __call__(self, batch: tuple) -> None:
        _, lens, input_ids, mask = batch
        with torch.inference_mode(), capture(self.runner.blocks, self.runner.sites, self._hook):
            self.plan = self.mod.BatchPlan.build(lens, input_ids.shape[1], spec=self.hspec, lead_positions=1)
            self.pending = []
            self.runner.forward(input_ids, mask)
            packed = torch.cat(
                [torch.stack([p[1] for p in self.pending]), torch.stack([p[2] for p in self.pending]).double()], 1
            ).cpu().numpy()
            n_vec = self.pending[0][1].numel()
            for k, (key, _, _, width) in enumerate(self.pending):
                hist = packed[k, n_vec:].round().astype("int64")
                self.stats[key].absorb(packed[k, :n_vec], hist, self.plan, width, column=0)
                self.lead[key].absorb(packed[k, :n_vec], hist, self.plan, width, column=1)


def bench_speed(loaded: Any, args: argparse.Namespace) -> dict[str, float]:
    texts = corpus_texts(args.texts)
    batches = prepared_batches(loaded, texts, args.batch_size, args.max_tokens)
    sites = args.sites
    runner = _Runner(loaded, batches, sites)
    tokens = sum(sum(b[1]) for b in batches)
    padded = sum(b[2].numel() for b in batches)
    print(
        f"(a) speed: {len(texts)} texts, {len(batches)} batches, {tokens} tokens ({padded} with padding), "
        f"sites {sites}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    modes = {"bare": runner.bare, "profiled": runner.profiled, "coarse": runner.coarse, "naive": runner.naive}
    if args.baseline_rev:
        modes["baseline"] = _Baseline(args.baseline_rev, runner)
        print(f"    baseline: the profiler's reduction as of {args.baseline_rev}")
    for fn in modes.values():  # warm-up
        fn(batches[-1])
    # clocks[clock][mode][batch] = list over repeats; modes interleaved per batch, order rotated.
    # Wall time is what a user waits; process CPU time (all threads) is far less sensitive to
    # other processes competing for the cores.
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {c: {m: [[] for _ in batches] for m in modes} for c in clocks}
    names = list(modes)
    for r in range(args.repeats):
        for b, batch in enumerate(batches):
            k = (r + b) % len(names)
            for name in names[k:] + names[:k]:
                w0, c0 = time.perf_counter(), time.process_time()
                modes[name](batch)
                times["cpu"][name][b].append(time.process_time() - c0)
                times["wall"][name][b].append(time.perf_counter() - w0)
    out: dict[str, float] = {}
    for clock in clocks:
        t = times[clock]
        for name in [m for m in modes if m != "bare"]:
            pair = [
                x / y for bx, by in zip(t[name], t["bare"], strict=True) for x, y in zip(bx, by, strict=True)
            ]
            med = sum(statistics.median(v) for v in t[name]) / sum(statistics.median(v) for v in t["bare"])
            best = sum(min(v) for v in t[name]) / sum(min(v) for v in t["bare"])
            out[f"{name}_over_bare_{clock}"] = med
            print(
                f"    {clock:4s} {name:8s}/bare: ratio of per-batch medians {med:.3f}, of per-batch minima "
                f"{best:.3f}, median of paired ratios {statistics.median(pair):.3f}"
            )
    if "baseline" in modes:
        for clock in clocks:
            t = times[clock]
            med = sum(statistics.median(v) for v in t["profiled"]) / sum(statistics.median(v) for v in t["baseline"])
            pair = [x / y for bx, by in zip(t["profiled"], t["baseline"], strict=True) for x, y in zip(bx, by, strict=True)]
            out[f"profiled_over_baseline_{clock}"] = med
            print(
                f"    {clock:4s} profiled/baseline: ratio of per-batch medians {med:.3f}, "
                f"median of paired ratios {statistics.median(pair):.3f}   (target <= 1.03)"
            )
    per_pass = sum(statistics.median(v) for v in times["wall"]["bare"])
    print(
        f"    bare forward: {per_pass:.2f} s wall per pass ({1e3 * per_pass / tokens:.2f} ms per token); "
        "target profiled/bare <= 1.15"
    )
    # End to end: profile() (tokenization, planning, merging) vs bare passes, interleaved.
    options = ProfileOptions(sites=sites, batch_size=args.batch_size)
    e2e: dict[str, list[float]] = {"wall": [], "cpu": []}
    bare: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(max(2, args.repeats // 2)):
        for target, fn in (
            (e2e, lambda: profile(loaded, texts, options, JobContext(), max_tokens=args.max_tokens)),
            (bare, lambda: [runner.bare(batch) for batch in batches]),
        ):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            target["cpu"].append(time.process_time() - c0)
            target["wall"].append(time.perf_counter() - w0)
    for clock in clocks:
        ratio = statistics.median(e2e[clock]) / statistics.median(bare[clock])
        out[f"profile_e2e_over_bare_{clock}"] = ratio
        print(f"    {clock:4s} profile() end to end / bare pass (medians of {len(e2e[clock])}): {ratio:.3f}")
    return out


# ----------------------------------------------------------------- (b) memory


def memory_child(n: int, args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints one JSON line with RSS numbers around profile()."""
    import psutil

    proc = psutil.Process()
    loaded = load_smollm2()
    options = ProfileOptions(sites=args.sites, batch_size=args.batch_size)
    profile(loaded, corpus_texts(args.batch_size * 2), options, JobContext(), max_tokens=args.max_tokens)
    texts = corpus_texts(n)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    before = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = profile(loaded, texts, options, JobContext(), max_tokens=args.max_tokens)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(
        json.dumps(
            {
                "n": n,
                "tokens": result.n_tokens,
                "rss_before": before,
                "rss_peak": peak[0],
                "delta": peak[0] - before,
            }
        )
    )


def bench_memory(args: argparse.Namespace) -> dict[str, float]:
    out: dict[int, dict[str, int]] = {}
    for n in (args.memory_texts, 10 * args.memory_texts):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            str(n),
            "--batch-size",
            str(args.batch_size),
            "--max-tokens",
            str(args.memory_max_tokens),
            "--sites",
            *args.sites,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = out[args.memory_texts], out[10 * args.memory_texts]
    growth = large["rss_peak"] / small["rss_peak"] - 1
    mib = 1 / 2**20
    print("(b) memory (fresh process per size, peak RSS sampled during profile()):")
    for d in (small, large):
        print(
            f"    {d['n']:5d} texts, {d['tokens']:6d} tokens: RSS before {d['rss_before'] * mib:7.1f} MiB, "
            f"peak {d['rss_peak'] * mib:7.1f} MiB, working delta {d['delta'] * mib:6.1f} MiB"
        )
    print(
        f"    peak growth with 10x examples = {100 * growth:+.2f} %   (target < 5 %); "
        f"working-delta growth = {(large['delta'] - small['delta']) * mib:+.1f} MiB"
    )
    return {"peak_growth": growth}


# ---------------------------------------------------------------- (c) numerics


def bench_numerics(loaded: Any, args: argparse.Namespace) -> dict[str, float]:
    texts = corpus_texts(6, chars=200)
    sites = ["block_output", "mlp_activation", "attention_output"]
    blocks = loaded.adapter.blocks(loaded.model)
    base = loaded.model.base_model  # what forward_callable runs for a causal LM
    masks: list[torch.Tensor] = []
    kept: dict[tuple[int, str], list[torch.Tensor]] = {}

    def on_forward(module: Any, args_: tuple, kwargs: dict) -> None:
        masks.append(kwargs["attention_mask"].bool().cpu())

    def keep(position: int, site: str, tensor: torch.Tensor) -> None:
        kept.setdefault((position, site), []).append(tensor.detach().float().cpu().clone())

    handle = base.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with capture(blocks, sites, keep):
            prof = profile(
                loaded, texts, ProfileOptions(sites=sites, batch_size=2), JobContext(), max_tokens=64
            )
    finally:
        handle.remove()
    worst: dict[str, float] = {}
    f32_worst: dict[str, float] = {}  # the rejected alternative: per-token sums in float32
    sparsity_err = sparsity_bound = 0.0
    bin_share: dict[int, float] = {}

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-300)

    for (position, site), tensors in kept.items():
        x32 = torch.cat([t.reshape(m.shape[0], m.shape[1], -1)[m] for t, m in zip(tensors, masks, strict=True)])
        x = x32.double()
        s = prof.stats[(position, site)]
        ref = {
            "count": float(x.numel()),
            "mean": x.mean().item(),
            "m2": ((x - x.mean()) ** 2).sum().item(),
            "sum_abs": x.abs().sum().item(),
            "sum_sq": (x * x).sum().item(),
            "max_abs": x.abs().max().item(),
        }
        got = {
            "count": float(s.count),
            "mean": s.mean,
            "m2": s.m2,
            "sum_abs": s.sum_abs,
            "sum_sq": s.sum_sq,
            "max_abs": s.max_abs,
        }
        for key in ref:
            worst[key] = max(worst.get(key, 0.0), rel(got[key], ref[key]))
        for key, per_token in (("sum", x32.sum(-1)), ("sum_sq", (x32 * x32).sum(-1)), ("sum_abs", x32.abs().sum(-1))):
            exact = {"sum": x.sum(), "sum_sq": (x * x).sum(), "sum_abs": x.abs().sum()}[key].item()
            f32_worst[key] = max(f32_worst.get(key, 0.0), rel(per_token.double().sum().item(), exact))
        t = 0.01 * s.rms
        value, bound = s.sparsity_bounded(t)
        sparsity_err = max(sparsity_err, abs(value - float((x.abs() < t).sum()) / x.numel()))
        sparsity_bound = max(sparsity_bound, bound)
        a = x.abs()
        for bits in (10, 12):  # what a window's resolution makes the bin holding t weigh
            grid = FineSpec(bits=bits)
            code, _ = grid.locate(t)
            lo_edge, hi_edge = grid.edge(code), grid.edge(code + 1)
            share = float(((a >= lo_edge) & (a < hi_edge)).sum()) / a.numel()
            bin_share[bits] = max(bin_share.get(bits, 0.0), share)
    overall = max(worst.values())
    print(
        f"(c) numerics: {len(texts)} texts, {prof.n_tokens} tokens, {len(kept)} (layer, site) pairs; "
        f"max relative error vs float64 over the full tensors:"
    )
    print(
        "    "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + f"   -> max {overall:.2e} (target 1e-9)"
    )
    print(
        "    per-token float32 reductions instead (rejected): "
        + ", ".join(f"{k} {v:.2e}" for k, v in f32_worst.items())
    )
    print(
        f"    sparsity at 0.01 x RMS from the fine windows vs an exact count: max error {sparsity_err:.2e}, "
        f"max stated bound {sparsity_bound:.2e} (target 1e-4); share of N in the bin holding it: "
        + ", ".join(f"{2**b} bins per octave {v:.2e}" for b, v in bin_share.items())
    )
    return {"max_rel_error": overall, "sparsity_error": sparsity_err, "sparsity_bound": sparsity_bound}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=24, help="texts in the speed benchmark")
    parser.add_argument("--memory-texts", type=int, default=8, help="N for the memory check (runs N and 10N)")
    parser.add_argument(
        "--memory-max-tokens",
        type=int,
        default=48,
        help="truncation in the memory check, below the texts' lengths so both runs have the same batch shapes",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sites", nargs="+", default=["block_output"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). One thread by default: its CPU time measures the work "
        "itself, unaffected by other processes on the machine (several threads spin while they wait)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "numerics"])
    parser.add_argument(
        "--baseline-rev",
        default="",
        help="also time the profiler's per-batch work as of this git revision (its worker/profiler/stats.py), "
        "interleaved in the same run, e.g. the commit before a change to the reductions",
    )
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    t0 = time.perf_counter()
    loaded = load_smollm2()
    print(f"model {loaded.source} on {loaded.device}, loaded in {time.perf_counter() - t0:.1f} s")
    if "speed" not in args.skip:
        bench_speed(loaded, args)
    if "numerics" not in args.skip:
        bench_numerics(loaded, args)
    if "memory" not in args.skip:
        bench_memory(args)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
