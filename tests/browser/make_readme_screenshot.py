"""Make the README's dashboard screenshot from a real SmolLM2-135M analysis.

    .venv/bin/python -m tests.browser.make_readme_screenshot [docs/dashboard.png]

Starts `layerscope serve` (embedded, auth off, data in a temporary folder), runs
AVSS on SmolLM2-135M over 16 texts of the built-in conversation set, gates it
when the server has gates, and photographs the analysis page in Debian's headless
Chromium. Not a test (pytest does not collect it); the browser test is
tests/browser/test_dashboard.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, ROOT, start_server


def main(out: Path) -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "data", auth_disabled=True)
        try:
            client = server.client()
            spec = {
                "model": {"name": "smollm2-135m"},
                "dataset": {"name": "chatterbot-conversations", "limit": 16, "max_tokens": 64},
                "stages": {"avss": {}},
                "labels": {"team": "search", "candidate": "v7"},
            }
            r = client.post("/v1/analyses", json=spec)
            r.raise_for_status()
            job = server.wait_for(client, r.json()["id"], timeout=900)
            if job["state"] != "SUCCEEDED":
                print(job, server.output()[-4000:], file=sys.stderr)
                return 1
            if client.get(f"/v1/analyses/{job['id']}/verdicts").status_code != 404:
                client.post("/v1/gates", json={"name": "registry", "rules": [
                    "layers.avss.warnings == 0", "metrics.avss.avss.prune_count <= 8",
                ]}).raise_for_status()
                client.post(f"/v1/analyses/{job['id']}/gate", params={"policy": "registry"}).raise_for_status()

            with sync_playwright() as p:
                context = p.chromium.launch_persistent_context(
                    str(Path(tmp) / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                    viewport={"width": 1400, "height": 900}, device_scale_factor=1,
                )
                page = context.pages[0] if context.pages else context.new_page()
                page.goto(f"{server.url}/dashboard#/a/{job['id']}")
                page.wait_for_selector("body[data-view=detail][data-ready=true]")
                page.wait_for_selector("#chart-grid canvas")
                # Down to the end of the per-layer charts: header, verdicts, charts.
                box = page.locator("#layers").bounding_box()
                height = int(box["y"] + box["height"] + 16)
                page.set_viewport_size({"width": 1400, "height": height})
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1400, "height": height})
                context.close()
            print(f"{out}: analysis {job['id']}")
            return 0
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png"))
