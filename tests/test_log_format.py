"""`layerscope serve` writes every log line in one format: JSON, uvicorn's own lines included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_serve_logs_every_line_as_json(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(LAYERSCOPE_DATA_DIR=str(tmp_path / "data"), LAYERSCOPE_LOG_FORMAT="json", LAYERSCOPE_LOG_LEVEL="INFO")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{port}/v1/analyses", timeout=5).status_code == 401
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    loggers = {e["logger"] for e in entries}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers, loggers
    assert any("/healthz" in e["msg"] for e in entries if e["logger"] == "uvicorn.access")


def test_transformers_and_python_warnings_come_out_as_json(capsys) -> None:  # noqa: ANN001
    import logging
    import warnings

    import worker.modelzoo.loading  # noqa: F401  (routes transformers' logger to the root handler)
    from app.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", json_format=True)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.captureWarnings(False)
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [e["msg"] for e in entries if e["logger"] == "transformers.modeling_utils"] == ["a transformers warning"]
    assert any("a python warning" in e["msg"] for e in entries if e["logger"] == "py.warnings")
