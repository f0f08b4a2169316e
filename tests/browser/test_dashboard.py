"""The dashboard in a real browser: headless Chromium against `layerscope serve` with real analyses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import ROOT, Browser

pytestmark = pytest.mark.browser

MAIN_SCORES = {"variance", "sparsity", "avss", "navss", "cumulative"}
ROWS = [{"text": f"line {i} about layers, activations and the variance of their outputs"} for i in range(8)]

# What the page drew, read back from Chart.js and from the canvas pixels.
READ_CHARTS = """
(selector) => [...document.querySelectorAll(selector)].map((canvas) => {
  const chart = Chart.getChart(canvas);
  const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted++;
  return {
    score: canvas.dataset.score,
    type: chart.config.type,
    painted,
    pruned: canvas.dataset.pruned,
    datasets: chart.data.datasets.map((d, i) => ({
      label: d.label,
      n: d.data.length,
      drawn: chart.getDatasetMeta(i).data.length,
      patterned: Array.isArray(d.backgroundColor)
        ? d.backgroundColor.map((c, j) => (typeof c === 'string' ? -1 : j)).filter((j) => j >= 0) : [],
      triangles: Array.isArray(d.pointStyle)
        ? d.pointStyle.map((s, j) => (s === 'triangle' ? j : -1)).filter((j) => j >= 0) : [],
    })),
  };
})
"""


def submit(client: Any, labels: dict[str, str], prune_fraction: float) -> str:
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": ROWS, "limit": len(ROWS), "max_tokens": 32},
        "stages": {"avss": {"prune_fraction": prune_fraction}},
        "labels": labels,
    }
    r = client.post("/v1/analyses", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_ready(page: Any, view: str) -> None:
    page.wait_for_selector(f"body[data-view={view}][data-ready=true]", timeout=30_000)


def assert_no_stray_values(page: Any) -> None:
    text = page.locator("main").inner_text()
    for junk in ("undefined", "NaN", "[object", "null"):
        assert junk not in text, f"{junk!r} shown on the page:\n{text}"


def test_dashboard_lists_shows_and_compares_real_analyses(browser: Browser, serve: Any, artifacts_dir: Path) -> None:
    server = serve(auth_disabled=True)
    client = server.client()
    ids = [
        submit(client, {"suite": "browser", "candidate": "a"}, 0.25),
        submit(client, {"suite": "browser", "candidate": "b"}, 0.5),
    ]
    page = browser.page
    # Opened while the jobs are queued or running: the list refreshes itself until they end.
    page.goto(f"{server.url}/dashboard")
    wait_ready(page, "list")
    states_at_open = page.locator("#analyses tbody tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
    # And a second tab on the queued job's own page, which draws its charts once the job ends.
    tab = browser.context.new_page()
    tab.on("pageerror", lambda e: browser.errors.append(f"pageerror (tab): {e}"))
    tab.goto(f"{server.url}/dashboard#/a/{ids[1]}")
    wait_ready(tab, "detail")
    state_in_tab = tab.locator("h2 .badge").inner_text()
    for i in ids:
        job = server.wait_for(client, i)
        assert job["state"] == "SUCCEEDED", job
    page.wait_for_function(
        "ids => ids.every(i => document.querySelector(`#analyses tr[data-id='${i}']`)?.dataset.state === 'SUCCEEDED')",
        arg=ids, timeout=30_000,
    )
    tab.wait_for_selector("#chart-grid canvas", timeout=30_000)
    wait_ready(tab, "detail")
    assert [c["datasets"][0]["n"] for c in tab.evaluate(READ_CHARTS, "#chart-grid canvas")] == [4] * 5
    tab.close()
    print(f"states when the pages opened: list {states_at_open}, job page {state_in_tab}")
    api_layers = client.get(f"/v1/analyses/{ids[0]}/layers", params={"stage": "avss"}).json()["items"]
    assert len(api_layers) == 4
    pruned = sorted(r["layer"] for r in api_layers if r["values"].get("prune") == 1)
    assert pruned, "AVSS with prune_fraction 0.25 of 4 layers proposes one layer"
    api_metrics = client.get(f"/v1/analyses/{ids[0]}/metrics").json()["items"]
    api_artifacts = client.get(f"/v1/analyses/{ids[0]}/artifacts").json()["items"]
    has_gates = client.get(f"/v1/analyses/{ids[0]}/verdicts").status_code != 404
    verdict = None
    if has_gates:  # the gate API is optional to the page: test it where the server has it
        r = client.post("/v1/gates", json={"name": "browser", "rules": [
            "layers.avss.warnings == 0", "metrics.avss.avss.prune_count <= 1", "hallucination.eavss_probe.ece <= 0.1",
        ]})
        assert r.status_code == 201, r.text
        r = client.post(f"/v1/analyses/{ids[0]}/gate", params={"policy": "browser"})
        assert r.status_code in (200, 201), r.text
        verdict = r.json()

    for i in ids:
        row = page.locator(f"#analyses tr[data-id='{i}']")
        assert row.get_attribute("data-state") == "SUCCEEDED"
        assert "tiny-random-llama" in row.inner_text()
    assert "candidate=a" in page.locator(f"#analyses tr[data-id='{ids[0]}']").inner_text()
    assert_no_stray_values(page)
    page.screenshot(path=str(artifacts_dir / "dashboard-list.png"), full_page=True)

    # Open the first analysis from the list.
    page.locator(f"#analyses tr[data-id='{ids[0]}'] a").click()
    wait_ready(page, "detail")
    page.wait_for_selector("#chart-grid canvas")
    charts = page.evaluate(READ_CHARTS, "#chart-grid canvas")
    assert {c["score"] for c in charts} == MAIN_SCORES, charts
    for c in charts:
        assert c["type"] == "bar"
        (ds,) = c["datasets"]
        assert ds["n"] == 4 and ds["drawn"] == 4, c  # one bar per layer of tiny-random-llama
        assert c["painted"] > 500, f"{c['score']} chart canvas is blank"
        assert ds["patterned"] == pruned, c  # pruned layers drawn striped
        assert c["pruned"] == ",".join(map(str, pruned))

    # Any other score from the selector gets its own chart.
    page.select_option("#extra-score", "rank")
    (extra,) = page.evaluate(READ_CHARTS, "#chart-extra canvas")
    assert extra["score"] == "rank" and extra["datasets"][0]["n"] == 4

    # Evaluation table, artifacts with working (authenticated) downloads, verdicts only if the server has gates.
    assert page.locator("#metrics-table tbody tr").count() == len(api_metrics)
    assert "95% CI" in page.locator("#metrics-table thead").inner_text()
    links = page.locator("#artifacts-table a.download")
    assert links.count() == len(api_artifacts) > 0
    with page.expect_download() as dl:
        links.first.click()
    assert dl.value.suggested_filename == api_artifacts[0]["name"].split("/")[-1]
    assert page.locator("#verdicts").count() == (1 if has_gates else 0)
    if verdict is not None:
        article = page.locator("#verdicts article.verdict")
        assert article.count() == 1
        assert article.get_attribute("data-passed") == str(verdict["passed"]).lower()
        badges = article.locator("tbody tr td .badge").all_inner_texts()
        assert badges == ["PASS" if r["passed"] else "FAIL" for r in verdict["rules"]]
    assert page.locator("#banner").is_hidden()
    assert_no_stray_values(page)

    page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)

    # Compare the two side by side: every main score overlaid, both analyses with 4 points.
    page.goto(f"{server.url}/dashboard#/compare/{ids[0]}/{ids[1]}")
    wait_ready(page, "compare")
    page.wait_for_selector("#chart-grid canvas")
    overlaid = page.evaluate(READ_CHARTS, "#chart-grid canvas")
    assert {c["score"] for c in overlaid} == MAIN_SCORES
    for c in overlaid:
        assert c["type"] == "line"
        assert [d["n"] for d in c["datasets"]] == [4, 4] and [d["drawn"] for d in c["datasets"]] == [4, 4], c
        assert c["datasets"][0]["triangles"] == pruned
        assert len(c["datasets"][1]["triangles"]) == 2  # prune_fraction 0.5 of 4 layers
    assert page.locator(".sides .side").count() == 2
    assert_no_stray_values(page)
    page.screenshot(path=str(artifacts_dir / "dashboard-compare.png"), full_page=True)

    # Back on the list, ticking two rows offers the same comparison.
    page.goto(f"{server.url}/dashboard#/")
    wait_ready(page, "list")
    for i in ids:
        page.locator(f"#analyses tr[data-id='{i}'] input[type=checkbox]").check()
    page.locator("#compare-selected").click()
    wait_ready(page, "compare")
    assert page.url.endswith(f"#/compare/{ids[0]}/{ids[1]}")

    assert browser.errors == []
    unexpected = [(status, url) for status, url in browser.failed
                  if not (status == 404 and url.endswith("/verdicts") and not has_gates)]
    assert unexpected == []


def test_dashboard_asks_for_a_key_and_sends_it_as_bearer(browser: Browser, serve: Any) -> None:
    server = serve(auth_disabled=False)
    key = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "--project", "dash", "--scopes", "read"],
        cwd=ROOT, env=server.env, capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    assert key.startswith("ls_")

    page = browser.page
    # The page and its assets need no key.
    assert page.goto(f"{server.url}/dashboard").status == 200
    wait_ready(page, "list")
    banner = page.locator("#banner")
    assert banner.is_visible() and "API key" in banner.inner_text()

    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    wait_ready(page, "list")
    assert banner.is_hidden()
    assert "No analyses yet" in page.locator("#analyses").inner_text()
    assert page.evaluate("sessionStorage.getItem('layerscope.apiKey')") == key
    assert page.locator("#api-key").input_value() == ""  # not left on screen
    api_calls = [r for r in browser.requests if "/v1/analyses" in r.url]
    assert api_calls and api_calls[-1].headers.get("authorization") == f"Bearer {key}"

    # A wrong key is a 401 the page explains.
    page.fill("#api-key", "ls_000000000000_wrong")
    page.click("#key-form button[type=submit]")
    wait_ready(page, "list")
    assert "API key" in banner.inner_text()
    assert browser.errors == []
    assert browser.failed and {status for status, _ in browser.failed} == {401}
