"""Make the README's MLflow picture from a real run of the registry flow.

    .venv/bin/python -m tests.browser.make_mlflow_screenshot [--model smollm2-135m] [--out docs]

Starts an `mlflow server` (SQLite, local artifacts, loopback) and `layerscope serve` (embedded,
auth off) pointed at it; registers the built-in model in MLflow (`mlflow.transformers.log_model`,
version 1); saves the gate policy `release` (with `alias_on_pass: champion`); submits an AVSS
analysis whose subject is that version (the model is loaded from `models:/<name>/1`) and which
names the policy; waits for its registry updates; and photographs the version's page in MLflow's
UI in Debian's headless Chromium:

    docs/mlflow-registry.png   the version's `layerscope.*` tags, its aliases and the linked run

Every tag in the picture was set by the service. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, ROOT, start_server
from tests.integration.mlflow_server import MlflowServer

POLICY = {
    "rules": ["layers.avss.avss.avss.count >= 30", "warnings.avss <= 5"],
    "description": "every one of the 30 layers scored; at most 5 warnings from the avss stage",
    "registry": {"alias_on_pass": "champion"},
}


def register(url: str, model_name: str, registered: str) -> None:
    import mlflow
    import mlflow.transformers

    from app.config import Settings
    from app.schemas import ModelSpec
    from worker.modelzoo import load_model

    loaded = load_model(ModelSpec(name=model_name, device="cpu"), Settings(data_dir=ROOT / ".layerscope"))
    mlflow.set_tracking_uri(url)
    with mlflow.start_run(run_name=f"register-{model_name}"):
        mlflow.transformers.log_model(
            transformers_model={"model": loaded.model, "tokenizer": loaded.tokenizer}, name="model",
            task="text-generation", registered_model_name=registered, pip_requirements=["torch", "transformers"],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    registered = args.model
    with tempfile.TemporaryDirectory(prefix="layerscope-mlflow-") as tmp:
        work = Path(tmp)
        mlflow_server = MlflowServer(work)
        mlflow_server.start()
        service = None
        try:
            register(mlflow_server.url, args.model, registered)
            service = start_server(work / "service", extra_env={"LAYERSCOPE_MLFLOW_TRACKING_URI": mlflow_server.url})
            api = httpx.Client(base_url=service.url, timeout=60)
            assert api.put("/v1/gates/release", json=POLICY).status_code in (200, 201)
            resp = api.post("/v1/analyses", json={
                "registry": {"mlflow": {"model": registered, "version": "1"}},
                "dataset": {"name": "chatterbot-conversations", "limit": 16, "max_tokens": 64},
                "stages": {"avss": {}}, "gate_policy": "release", "labels": {"ci": "readme"},
            })
            assert resp.status_code == 201, resp.text
            analysis_id = resp.json()["id"]
            deadline = time.monotonic() + 1800
            while True:
                job = api.get(f"/v1/analyses/{analysis_id}").json()
                updates = ((job["summary"].get("registry") or {}).get("mlflow") or {}).get("updates") or {}
                if job["state"] in ("FAILED", "CANCELLED"):
                    raise RuntimeError(job)
                if job["state"] == "SUCCEEDED" and len(updates) == 2 and all(
                        u["state"] == "done" for u in updates.values()):
                    break
                assert time.monotonic() < deadline, job
                time.sleep(2)
            print("analysis", analysis_id, "verdicts:",
                  [v["verdict"] for v in api.get(f"/v1/analyses/{analysis_id}/verdicts").json()["items"]])
            photograph(f"{mlflow_server.url}/#/models/{registered}/versions/1", Path(args.out) / "mlflow-registry.png",
                       work / "chromium")
        finally:
            if service is not None:
                service.stop()
            mlflow_server.stop()
    return 0


def photograph(url: str, out: Path, profile: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100},
        )
        page = context.new_page()
        page.goto(url)
        page.get_by_text("layerscope.gate.policy").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        for name in ("Close", "close", "Close assistant"):  # the assistant side panel hides half the page
            button = page.get_by_role("button", name=name)
            if button.count():
                button.first.click()
                break
        # The tags table scrolls inside a box a few rows high: let it show every row.
        page.evaluate("""() => {
            for (const el of document.querySelectorAll('*')) {
                const style = getComputedStyle(el);
                if (['auto', 'scroll'].includes(style.overflowY) && el.textContent.includes('layerscope.gate.policy')
                        && el.scrollHeight > el.clientHeight) {
                    el.style.maxHeight = 'none'; el.style.height = 'auto'; el.style.overflowY = 'visible';
                }
            }
        }""")
        page.wait_for_timeout(1500)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        context.close()
    print("wrote", out)


if __name__ == "__main__":
    sys.exit(main())
