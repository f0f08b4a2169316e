"""Make the README's dashboard screenshots from real analyses: one PNG per panel.

    .venv/bin/python -m tests.browser.make_readme_screenshot [--model smollm2-135m] [--out docs]
        [--data-dir DIR] [--only layers,prune,hallucination]

Starts `layerscope serve` (embedded, auth off), runs one analysis per panel on the
model (SmolLM2-135M by default; `tiny-random-llama` for a quick look), gates the
AVSS one when the server has gates, and photographs each panel in Debian's headless
Chromium:

    docs/dashboard.png               per-layer AVSS scores (16 conversation texts)
    docs/dashboard-prune.png         prune: AVSS and 2 baselines + random control, 16 texts
    docs/dashboard-hallucination.png hallucination: 60 chatterbot-trivia questions
    docs/dashboard-mitigation.png    mitigate: before/after on the same questions

With `--data-dir` the service keeps its database there, and an analysis already
there (same model, same `readme` label, SUCCEEDED) is reused instead of run again.
Every number in the pictures is the service's own. Not a test (pytest does not
collect it); the browser tests are tests/browser/test_dashboard*.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, ROOT, Server, start_server

CONVERSATIONS = {"name": "chatterbot-conversations", "limit": 16, "max_tokens": 64}


def specs(model: str) -> dict[str, dict[str, Any]]:
    """The analysis behind each picture, keyed by the picture's panel."""
    return {
        "layers": {"stages": {"avss": {}}, "dataset": CONVERSATIONS},
        "prune": {
            "dataset": CONVERSATIONS,
            "stages": {"prune": {"scorers": ["avss", "block_influence", "angular_distance"], "tasks": ["perplexity"],
                                 "random_seeds": 3, "scoring_examples": 8, "timing_runs": 1, "n_boot": 500}},
        },
        "hallucination": {
            "dataset": {"name": "chatterbot-trivia", "limit": 60, "max_tokens": 64},
            "stages": {
                "hallucination": {"n_shots": 5, "max_new_tokens": 12, "n_boot": 500, "test_fraction": 0.4,
                                  "detectors": ["sequence_likelihood", "length", "p_ik"]},
                "mitigate": {"top_k": 1, "epochs": 1, "n_boot": 500, "eval_detectors": ["sequence_likelihood", "p_ik"],
                             "perplexity_dataset": CONVERSATIONS},
            },
        },
    }


# panel name -> (analysis key, section id on the analysis page)
PANELS = {
    "dashboard.png": ("layers", "layers"),
    "dashboard-prune.png": ("prune", "prune-panel"),
    "dashboard-hallucination.png": ("hallucination", "hallucination-panel"),
    "dashboard-mitigation.png": ("hallucination", "mitigation-panel"),
}


def run_analyses(server: Server, model: str, only: set[str] | None = None) -> dict[str, str]:
    """Submit (or find, with a kept data dir) each analysis and wait for it to succeed."""
    client = server.client()
    have = {a["labels"].get("readme"): a["id"] for a in
            client.get("/v1/analyses", params={"state": "SUCCEEDED", "model": model, "page_size": 200}).json()["items"]}
    ids: dict[str, str] = {}
    for key, spec in specs(model).items():
        if only is not None and key not in only:
            continue
        if key in have:
            ids[key] = have[key]
            continue
        body = {"model": {"name": model}, **spec, "labels": {"readme": key}}
        r = client.post("/v1/analyses", json=body)
        r.raise_for_status()
        ids[key] = r.json()["id"]
    for key, analysis_id in ids.items():
        job = server.wait_for(client, analysis_id, timeout=3600)
        if job["state"] != "SUCCEEDED":
            raise RuntimeError(f"{key} analysis {analysis_id} {job['state']}: {job.get('error')}\n{server.output()[-4000:]}")
        print(f"{key}: analysis {analysis_id}", file=sys.stderr)
    if "layers" in ids and client.get(f"/v1/analyses/{ids['layers']}/verdicts").status_code != 404:
        r = client.post("/v1/gates", json={"name": "registry", "rules": [
            "layers.avss.warnings == 0", "metrics.avss.avss.prune_count <= 8",
        ]})
        if r.status_code != 409:  # already there in a kept data dir
            r.raise_for_status()
        client.post(f"/v1/analyses/{ids['layers']}/gate", params={"policy": "registry"}).raise_for_status()
    return ids


def photograph(server: Server, ids: dict[str, str], out: Path, profile: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900}, device_scale_factor=1,
        )
        page = context.pages[0] if context.pages else context.new_page()
        out.mkdir(parents=True, exist_ok=True)
        for filename, (key, section) in PANELS.items():
            if key not in ids:
                continue
            page.set_viewport_size({"width": 1400, "height": 900})
            page.goto(f"{server.url}/dashboard#/a/{ids[key]}")
            page.reload()
            page.wait_for_selector("body[data-view=detail][data-ready=true]")
            page.wait_for_selector(f"#{section} canvas")
            if section == "layers":
                # Down to the end of the per-layer charts: header, verdicts, charts.
                box = page.locator("#layers").bounding_box()
                clip = {"x": 0, "y": 0, "width": 1400, "height": int(box["y"] + box["height"] + 16)}
            else:
                box = page.locator(f"#{section}").bounding_box()
                clip = {"x": max(0, box["x"] - 8), "y": box["y"] - 8, "width": box["width"] + 16, "height": box["height"] + 16}
            page.set_viewport_size({"width": 1400, "height": int(clip["y"] + clip["height"] + 16)})
            page.wait_for_selector(f"#{section} canvas")
            path = out / filename
            page.screenshot(path=str(path), clip=clip)
            print(f"{path}: analysis {ids[key]}")
        context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the service's data here and reuse it")
    parser.add_argument("--only", default=None, help="comma-separated analyses to run and photograph: layers,prune,hallucination")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        server = start_server(data, auth_disabled=True)
        try:
            ids = run_analyses(server, args.model, set(args.only.split(",")) if args.only else None)
            photograph(server, ids, args.out, Path(tmp) / "profile")
            return 0
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
