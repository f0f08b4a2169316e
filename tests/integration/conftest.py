"""Real processes: a private redis-server, `layerscope serve` and `layerscope worker` on Postgres.

The Redis here is our own process on a free port, so a test can stop and restart
it without touching the machine's Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from tests.conftest import IN_CI, free_port, wait_for_analysis

ROOT = Path(__file__).resolve().parents[2]


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if IN_CI:
                pytest.fail("redis-server is not installed; CI needs it")
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis_lib.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    env: dict[str, str]
    redis: RedisServer
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    api_url: str = ""

    def spawn(self, name: str, *args: str) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT, env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        p = Proc(proc, log)
        self.procs.append(p)
        return p

    def start_worker(self, *args: str) -> Proc:
        """`layerscope worker` with `args` (e.g. `--gpu`, `1`), once Celery says it is ready."""
        worker = self.spawn("worker", "worker", *args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if " ready." in worker.output():
                return worker
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{worker.output()}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready:\n{worker.output()}")

    def start_api(self) -> Proc:
        port = free_port()
        api = self.spawn("api", "serve", "--port", str(port))
        self.api_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return api
            except httpx.TransportError:
                pass
            if api.proc.poll() is not None:
                raise RuntimeError(f"api exited:\n{api.output()}")
            time.sleep(0.2)
        raise RuntimeError(f"api not ready:\n{api.output()}")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30)

    def wait_for(self, client: httpx.Client, analysis_id: str, states: set[str], timeout: float = 180) -> dict:
        try:
            return wait_for_analysis(client.get, analysis_id, states=states, timeout=timeout)
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in self.procs)
            raise AssertionError(f"{exc}\n{logs}") from None


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    redis = RedisServer(tmp_path)
    redis.start()
    env = {
        **os.environ,
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis.url,
        "LAYERSCOPE_DATA_DIR": str(tmp_path / "data"),
        "LAYERSCOPE_AUTH_DISABLED": "true",
        "LAYERSCOPE_DEFAULT_PROJECT": f"it-{tmp_path.name}",
        "LAYERSCOPE_HEARTBEAT_INTERVAL": "0.5",
        "LAYERSCOPE_HEARTBEAT_TIMEOUT": "4",
        "LAYERSCOPE_SWEEP_INTERVAL": "0.5",
        "LAYERSCOPE_REQUEUE_AFTER": "30",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    c = Cluster(env, redis, tmp_path)
    try:
        yield c
    finally:
        for p in c.procs:
            p.stop()
        redis.stop()
