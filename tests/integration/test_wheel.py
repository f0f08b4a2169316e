"""The wheel, as a user installs it: built from a copy of the sources, installed (not editable) into a
fresh virtualenv outside the checkout, and run from an unrelated folder: `layerscope migrate` on a fresh
Postgres database, `keys create`, `serve` and `worker` on a private Redis, `worker-health` (the image's healthcheck), one job
on a tiny model.

The fresh venv holds only the wheel. Its third-party packages (torch, transformers, ...) come from the
test interpreter's site-packages through a `.pth` path line, so nothing is downloaded; a path line does
not run that folder's own `.pth` files, so the checkout's editable install is not reachable from the
venv (the test checks that `app`, `cli`, `worker`, `migrations` and `layerscope` load from the venv). What this cannot
show: a third-party package the wheel uses but does not declare would still be found.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import _pg_url, create_database, drop_database, free_port, wait_for_analysis
from tests.integration.conftest import Proc, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Not the sources: what a checkout may hold besides them (a venv, the embedded data, caches, builds).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".layerscope", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    "build", "dist", "*.egg-info", "var", "test-artifacts", "node_modules",
)


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class Installed:
    venv: Path
    bin: Path
    site_packages: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES, symlinks=True)
    dist = tmp / "dist"
    # The backend from this environment (setuptools, a dev dependency): no index, no download.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(dist), str(src)])
    [wheel] = dist.glob("layerscope-*.whl")
    shutil.rmtree(src)  # nothing below may read the sources

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    bin_dir = venv / "bin"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(_run([str(bin_dir / "python"), "-c", code]).stdout.strip())
    (site_packages / "_third_party.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps", "--no-index",
          str(wheel)])
    return Installed(venv, bin_dir, site_packages)


@pytest.fixture
def fresh_db() -> Iterator[str]:
    name = create_database()
    yield _pg_url(name)
    drop_database(name)


def test_the_wheel_migrates_serves_and_runs_a_job_outside_the_checkout(
    installed: Installed, fresh_db: str, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"  # the working directory of every command: not the checkout
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        "PATH": f"{installed.bin}{os.pathsep}{env.get('PATH', '')}",
        "DATABASE_URL": fresh_db,
        "LAYERSCOPE_DATA_DIR": str(tmp_path / "data"),
        "LAYERSCOPE_KEY_PEPPER": "wheel-test-pepper",
        "LAYERSCOPE_LOG_FORMAT": "text",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    })
    layerscope = str(installed.bin / "layerscope")

    # Every first-party package is the wheel's, none the checkout's.
    packages = ("app", "cli", "worker", "migrations", "layerscope")
    code = f"import importlib; print('\\n'.join(importlib.import_module(p).__file__ for p in {packages!r}))"
    files = _run([str(installed.bin / "python"), "-c", code], cwd=elsewhere, env=env).stdout.split()
    assert len(files) == len(packages) and all(Path(f).is_relative_to(installed.site_packages) for f in files), files

    _run([layerscope, "migrate"], cwd=elsewhere, env=env)
    with psycopg.connect(fresh_db) as conn:
        [(head,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert head and {"analyses", "layer_scores", "api_keys"} <= tables

    redis = RedisServer(tmp_path)
    redis.start()
    env["REDIS_URL"] = redis.url
    procs: list[Proc] = []

    def spawn(name: str, *args: str) -> Proc:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen([layerscope, *args], cwd=elsewhere, env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(Proc(proc, log))
        return procs[-1]

    def logs() -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in procs)

    try:
        key = _run([layerscope, "keys", "create", "--project", "wheel", "--scopes", "read,submit"],
                   cwd=elsewhere, env=env).stdout.strip().splitlines()[-1]
        worker = spawn("worker", "worker", "--name", "wheel@%h")
        port = free_port()
        api = spawn("api", "serve", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while " ready." not in worker.output() or not _healthy(base):
            assert worker.proc.poll() is None and api.proc.poll() is None, logs()
            assert time.monotonic() < deadline, f"not ready in 120 s\n{logs()}"
            time.sleep(0.3)

        health = _run([layerscope, "worker-health", "--name", "wheel@%h"], cwd=elsewhere, env=env)
        assert "answered a ping" in health.stdout
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
            page = client.get("/dashboard")  # the dashboard's files are package data
            assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:200]
            assert client.get("/dashboard/assets/app.js").status_code == 200
            rows = [{"text": f"row {i}: the quick brown fox jumps over the lazy dog"} for i in range(8)]
            resp = client.post("/v1/analyses", json={
                "model": {"name": "tiny-random-llama"},
                "dataset": {"rows": rows, "max_tokens": 32},
                "stages": {"profile": {"batch_size": 4}, "avss": {"plots": False}},
            })
            assert resp.status_code == 201, resp.text
            try:
                job = wait_for_analysis(client.get, resp.json()["id"], timeout=180)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{logs()}") from None
            assert job["state"] == "SUCCEEDED", f"{job}\n{logs()}"
            layers = client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "avss"}).json()["items"]
            assert [r["layer"] for r in layers] == [0, 1, 2, 3]
            assert all(r["values"]["avss"] is not None for r in layers)
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
