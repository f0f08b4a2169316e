"""The per-stage panels in a real browser: real tiny-random-llama analyses of prune,
hallucination and mitigate through `layerscope serve` (embedded worker), and every
number the panels show read back from the page and compared with the API's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Browser
from tests.browser.test_dashboard import assert_no_stray_values, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TEXTS = [{"text": f"line {i} about layers, activations and the variance of their outputs"} for i in range(12)]
QA = [{"question": f"What is item number {i} called?", "answer": f"thing{i}"} for i in range(48)]
PRUNE = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": TEXTS, "limit": 12, "max_tokens": 32},
    "stages": {"prune": {"scorers": ["avss", "block_influence", "cim"], "tasks": ["perplexity"],
                         "random_seeds": 3, "timing_runs": 1, "n_boot": 50, "scoring_examples": 4}},
}
HALLUCINATION = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": QA, "limit": 48, "max_tokens": 64},
    "stages": {
        "hallucination": {"n_shots": 2, "max_new_tokens": 3, "n_boot": 20, "probe_l2": 1.0, "test_fraction": 0.3,
                          "detectors": ["sequence_likelihood", "perplexity", "length", "p_ik"]},
        "mitigate": {"top_k": 1, "epochs": 1, "learning_rate": 1e-2, "n_boot": 20,
                     "eval_detectors": ["sequence_likelihood", "p_ik"],
                     "perplexity_dataset": {"rows": [{"text": "a few words of general text"}] * 3, "limit": 3}},
    },
}

READ_CHART = """(sel) => { const c = Chart.getChart(document.querySelector(sel));
  return { type: c.config.type, labels: c.data.labels, data: c.data.datasets[0].data, ci: c.data.datasets[0].ci || null,
           yType: c.options.scales.y.type, yTitle: c.options.scales.y.title.text, xTitle: c.options.scales.x.title.text,
           autoSkip: c.options.scales.x.ticks.autoSkip }; }"""
CELLS = """(sel) => [...document.querySelectorAll(sel)].map((e) => ({...e.dataset}))"""


def num(text: str) -> float | None:
    return None if text == "" else float(text)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def metric(items: list[dict[str, Any]], stage: str, scope: str, name: str) -> dict[str, Any]:
    (m,) = [m for m in items if (m["stage"], m["scope"], m["name"]) == (stage, scope, name)]
    return m


def test_stage_panels_show_the_apis_numbers(browser: Browser, serve: Any, artifacts_dir: Path) -> None:
    server = serve(auth_disabled=True)
    client = server.client()
    ids = {}
    for key, spec in (("prune", PRUNE), ("hallucination", HALLUCINATION)):
        r = client.post("/v1/analyses", json=spec)
        assert r.status_code == 201, r.text
        ids[key] = r.json()["id"]
    for i in ids.values():
        assert server.wait_for(client, i, timeout=600)["state"] == "SUCCEEDED"
    page = browser.page

    # ---- prune: retained performance per scorer against random, the layers grid, rank agreement
    metrics = client.get(f"/v1/analyses/{ids['prune']}/metrics", params={"stage": "prune"}).json()["items"]
    layers = client.get(f"/v1/analyses/{ids['prune']}/layers", params={"stage": "prune"}).json()["items"]
    page.goto(f"{server.url}/dashboard#/a/{ids['prune']}")
    wait_ready(page, "detail")
    page.wait_for_selector("#prune-panel canvas")
    rows = page.evaluate(CELLS, "#prune-table tbody tr")
    assert {r["scorer"] for r in rows} == {"avss", "block_influence", "cim", "random", "original"}
    for r in rows:
        m = metric(metrics, "prune", f"task={r['task']},scorer={r['scorer']}", r["metric"])
        cells = page.evaluate(CELLS, f"#prune-table tr[data-scorer='{r['scorer']}'] td")
        assert num(cells[3]["value"]) == m["value"]
        assert (num(cells[4]["low"]), num(cells[4]["high"])) == (m["ci_low"], m["ci_high"])
        if r["scorer"] != "original":
            assert num(cells[6]["retained"]) == metric(metrics, "prune", m["scope"], "retained_pct")["value"]
    chart = page.evaluate(READ_CHART, "#prune-chart-perplexity")
    assert chart["labels"] == ["avss", "block_influence", "cim"]
    assert chart["data"] == [metric(metrics, "prune", f"task=perplexity,scorer={s}", "perplexity")["value"]
                             for s in chart["labels"]]
    assert chart["ci"][0] == [metric(metrics, "prune", "task=perplexity,scorer=avss", "perplexity")[k]
                              for k in ("ci_low", "ci_high")]
    assert chart["yTitle"].startswith("perplexity") and chart["xTitle"] == "scorer"

    grid = page.evaluate(CELLS, "#prune-grid tbody td")
    scorers = page.evaluate(CELLS, "#prune-grid tbody tr")
    n_layers = len({r["layer"] for r in layers})
    assert [s["scorer"] for s in scorers] == ["avss", "block_influence", "cim"] and len(grid) == 3 * n_layers
    shown = {(s["scorer"], int(c["layer"])) for s, row in zip(scorers, [grid[i:i + n_layers] for i in range(0, len(grid), n_layers)],
                                                                   strict=True) for c in row if c["removed"] == "1"}
    assert shown == {(r["scorer"], r["layer"]) for r in layers if r["values"]["prune"] == 1}
    assert shown, "a fraction of 0.25 of 4 layers removes one per scorer"
    rank = {s: [r["values"]["rank"] for r in sorted((r for r in layers if r["scorer"] == s), key=lambda r: r["layer"])]
            for s in ("avss", "block_influence", "cim")}
    for c in page.evaluate(CELLS, "#rank-agreement td"):
        assert num(c["value"]) == pytest.approx(spearman(rank[c["a"]], rank[c["b"]]), abs=1e-12), c
    assert_no_stray_values(page)
    page.locator("#prune-panel").screenshot(path=str(artifacts_dir / "dashboard-prune.png"))

    # ---- hallucination: EAVSS and probe AUROC by layer, reliability per detector
    metrics = client.get(f"/v1/analyses/{ids['hallucination']}/metrics").json()["items"]
    layers = client.get(f"/v1/analyses/{ids['hallucination']}/layers", params={"stage": "hallucination"}).json()["items"]
    answers = client.get(f"/v1/analyses/{ids['hallucination']}/answers",
                         params={"stage": "hallucination", "split": "test", "page_size": 1000}).json()["items"]
    page.goto(f"{server.url}/dashboard#/a/{ids['hallucination']}")
    wait_ready(page, "detail")
    page.wait_for_selector("#hallucination-panel canvas")
    eav = sorted((r for r in layers if r["scorer"] == "eavss"), key=lambda r: r["layer"])
    chart = page.evaluate(READ_CHART, "#eavss-chart")
    assert chart["labels"] == [str(r["layer"]) for r in eav] and chart["autoSkip"] is False  # every layer labelled
    assert chart["data"] == [r["values"]["eavss"] for r in eav]
    probes = {r["layer"]: r["values"] for r in layers if r["scorer"] == "layer_probe"}
    chart = page.evaluate(READ_CHART, "#probe-auroc-chart")
    assert chart["data"] == [probes[int(x)]["auroc"] for x in chart["labels"]]
    for row in page.evaluate(CELLS, "#hallucination-layers tbody tr"):
        cells = page.evaluate(CELLS, f"#hallucination-layers tr[data-layer='{row['layer']}'] td")
        assert num(cells[1]["eavss"]) == next(r["values"]["eavss"] for r in eav if r["layer"] == int(row["layer"]))
        assert num(cells[3]["auroc"]) == probes[int(row["layer"])]["auroc"]
    detectors = page.evaluate(CELLS, "#reliability-table tbody tr")
    assert {d["detector"] for d in detectors} == {"sequence_likelihood", "perplexity", "length", "p_ik"}
    for d in (d["detector"] for d in detectors):
        bins = [{"n": 0, "correct": 0, "conf": 0.0} for _ in range(10)]
        for a in answers:
            c = a["confidence"].get(d)
            if c is None or a["correct"] is None:
                continue
            b = bins[min(9, max(0, math.floor(c * 10)))]
            b["n"] += 1
            b["correct"] += int(a["correct"])
            b["conf"] += c
        shown = page.evaluate(CELLS, f"#reliability-table tr[data-detector='{d}'] td")
        assert [int(c["n"]) for c in shown] == [b["n"] for b in bins], d
        assert [num(c["acc"]) for c in shown] == [b["correct"] / b["n"] if b["n"] else None for b in bins]
        assert [num(c["conf"]) for c in shown] == pytest.approx([b["conf"] / b["n"] if b["n"] else None for b in bins])
    assert sum(int(c["n"]) for c in page.evaluate(CELLS, "#reliability-table tr[data-detector='sequence_likelihood'] td")) \
        == len(answers) > 0

    # the detector leaderboard: the API's /leaderboard, row by row and cell by cell
    board = client.get(f"/v1/analyses/{ids['hallucination']}/leaderboard").json()
    shown = page.evaluate(CELLS, "#hallucination-leaderboard tbody tr")
    assert [(r["detector"], int(r["rank"])) for r in shown] == [(r["detector"], r["rank"]) for r in board["rows"]]
    assert board["best_toolkit"] == "perplexity" and board["length_baseline"] == "length"
    for r in board["rows"]:
        cells = page.evaluate(CELLS, f"#hallucination-leaderboard tr[data-detector='{r['detector']}'] td[data-metric]")
        assert [c["metric"] for c in cells] == board["metrics"]
        for c in cells:
            m = r["metrics"][c["metric"]]
            assert (num(c["value"]), num(c["low"]), num(c["high"])) == (m["value"], m["ci_low"], m["ci_high"])
        verdicts = [c["verdict"] for c in page.evaluate(
            CELLS, f"#hallucination-leaderboard tr[data-detector='{r['detector']}'] td[data-verdict]")]
        assert verdicts == [r[k]["verdict"] for k in ("vs_length", "vs_toolkit") if r[k] is not None]

    # ---- mitigation: before/after per variant, EAVSS against the random control
    page.wait_for_selector("#mitigation-panel canvas")
    for row in page.evaluate(CELLS, "#mitigation-variants tbody tr"):
        detector, _, name = row["metric"].rpartition(" ")
        for c in page.evaluate(CELLS, f"#mitigation-variants tr[data-metric='{row['metric']}'] td"):
            scope = f"variant={c['variant']}" + (f",detector={detector}" if detector else "")
            m = metric(metrics, "mitigate", scope, name)
            if "value" in c:
                assert num(c["value"]) == m["value"], (scope, name)
            else:
                assert (num(c["low"]), num(c["high"])) == (m["ci_low"], m["ci_high"])
    deltas = page.evaluate(CELLS, "#mitigation-deltas td[data-delta]")
    assert {c["delta"] for c in deltas} == {"eavss-base", "random-base", "eavss-random"}
    rows = page.evaluate(CELLS, "#mitigation-deltas tbody tr")
    assert {r["metric"] for r in rows} >= {"accuracy", "perplexity", "sequence_likelihood ece"}
    for r in rows:
        detector, _, name = r["metric"].rpartition(" ")
        for c in page.evaluate(CELLS, f"#mitigation-deltas tr[data-metric='{r['metric']}'] td[data-delta]"):
            m = metric(metrics, "mitigate", f"delta={c['delta']}" + (f",detector={detector}" if detector else ""), name)
            assert (num(c["value"]), num(c["low"]), num(c["high"])) == (m["value"], m["ci_low"], m["ci_high"])
    chart = page.evaluate(READ_CHART, "#mitigation-perplexity")
    assert chart["labels"] == ["base", "eavss", "random"]
    assert chart["data"] == [metric(metrics, "mitigate", f"variant={v}", "perplexity")["value"] for v in chart["labels"]]
    for panel in ("#hallucination-panel", "#mitigation-panel"):  # the job's warnings may say "undefined"
        text = page.locator(panel).inner_text()
        assert not any(junk in text for junk in ("undefined", "NaN", "[object", "null")), text
    page.locator("#hallucination-panel").screenshot(path=str(artifacts_dir / "dashboard-hallucination.png"))
    page.locator("#mitigation-panel").screenshot(path=str(artifacts_dir / "dashboard-mitigation.png"))

    # ---- list: stages and outcome; compare: the spec diff
    page.goto(f"{server.url}/dashboard#/")
    wait_ready(page, "list")
    assert page.locator(f"tr[data-id='{ids['prune']}'] td.stages").inner_text() == "prune"
    assert page.locator(f"tr[data-id='{ids['hallucination']}'] td.stages").inner_text() == "hallucination, mitigate"
    summary = client.get(f"/v1/analyses/{ids['hallucination']}").json()["summary"]
    counts = summary["hallucination"]["counts"]
    assert f"{counts['test_correct']}/{counts['test_answered']} test answers correct" in \
        page.locator(f"tr[data-id='{ids['hallucination']}'] td.outcome").inner_text()
    page.goto(f"{server.url}/dashboard#/compare/{ids['prune']}/{ids['hallucination']}")
    wait_ready(page, "compare")
    diff = {r["path"] for r in page.evaluate(CELLS, "#spec-diff-table tbody tr")}
    assert {"dataset.limit", "stages.prune", "stages.hallucination", "stages.mitigate"} <= diff
    assert "model.name" not in diff
    assert browser.errors == []
    assert [(s, u) for s, u in browser.failed] == []
