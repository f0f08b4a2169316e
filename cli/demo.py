"""`layerscope demo`: the embedded service in this process, one analysis over real HTTP, the result printed."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import typer

from app.config import Settings, get_settings
from cli.client import render_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(model: str, dataset: str, limit: int) -> int:
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade
    from cli.main import start_embedded_worker

    # The demo is always embedded and key-less, but keeps its data where the user keeps it (LAYERSCOPE_DATA_DIR).
    data_dir = get_settings().data_dir
    settings = Settings(database_url=None, redis_url=None, auth_disabled=True, data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo("layerscope demo: embedded mode (SQLite + in-process worker).")
    typer.echo("NOTE: authentication is OFF for this local demo (auth_disabled=True).")
    api = create_app(settings)
    worker = start_embedded_worker(api, settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(100):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            spec = {
                "model": {"name": model},
                "dataset": {"name": dataset, "limit": limit, "max_tokens": 128},
                "stages": {"avss": {}},
                "labels": {"source": "demo"},
            }
            resp = client.post("/v1/analyses", json=spec)
            if resp.status_code != 201:
                typer.echo(f"submit failed: {resp.status_code} {resp.text}", err=True)
                return 2
            location = resp.headers["location"]
            typer.echo(f"submitted {location}")
            last = None
            while True:
                job = client.get(location).json()
                shown = (job["state"], job["progress"]["stage"], job["progress"]["done"])
                if shown != last:
                    p = job["progress"]
                    typer.echo(f"  {job['state']:<10} {p['stage'] or '':<14} {p['done']}/{p['total']}")
                    last = shown
                if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(0.5)
            if job["state"] != "SUCCEEDED":
                typer.echo(f"analysis {job['state']}: {job['error']}", err=True)
                return 1
            layers = client.get(f"{location}/layers", params={"stage": "avss"}).json()["items"]
            typer.echo(f"\nAVSS per layer ({model}, {limit} examples of {dataset}):")
            columns = ["variance", "sparsity", "avss", "navss", "cumulative", "rank", "prune"]
            typer.echo(render_table([{"layer": r["layer"], **{c: r["values"].get(c) for c in columns}} for r in layers]))
            avss = job["summary"].get("avss", {})
            typer.echo(f"\nlayers AVSS would prune ({len(avss.get('prune_layers', []))}): {avss.get('prune_layers')}")
            for warning in job["warnings"]:
                typer.echo(f"warning: {warning}")
            typer.echo(
                f"\nstored in {settings.resolved_database_url}. To browse it:\n"
                f"  LAYERSCOPE_DATA_DIR={settings.data_dir} LAYERSCOPE_AUTH_DISABLED=true layerscope serve\n"
                f"  dashboard: http://127.0.0.1:8000/dashboard#/a/{job['id']}\n"
                f"  API:       http://127.0.0.1:8000{location}"
            )
            return 0
    finally:
        server.should_exit = True
        worker.stop()
        thread.join(timeout=5)
