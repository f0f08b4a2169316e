"""Faults on real processes: Postgres restarted under a serving API, a job past its time limit,
a model that does not fit in the worker's memory.

(kill -9 of a worker and Redis down at submit are in tests/integration/test_celery_worker.py.)

The Postgres here is a private cluster (initdb into a temporary folder, its own port), so the
test can stop and start it without touching the machine's database. As root, its commands
run as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from app.auth import create_key
from app.db import engine_for, session_factory, session_scope
from app.migrate import upgrade
from tests.conftest import IN_CI, free_port, make_settings, share_smollm2_cache
from tests.integration.conftest import Cluster, RedisServer, cluster  # noqa: F401 - `cluster` is a fixture
from worker.service.runner import _is_out_of_memory

TINY_LAYERS = 4


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}; CI needs it")
    pytest.skip(what)


def rows_spec(rows: int, batch_size: int = 4, model: str = "tiny-random-llama") -> dict:
    texts = [{"text": f"sample {i}: the quick brown fox jumps over the lazy dog"} for i in range(rows)]
    return {
        "model": {"name": model, "dtype": "float32", "device": "cpu"},
        "dataset": {"rows": texts, "limit": rows, "max_tokens": 32},
        "stages": {"profile": {"batch_size": batch_size}, "avss": {"plots": False}},
    }


# ------------------------------------------------------------------ a private Postgres


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


class PrivatePostgres:
    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            _missing("Postgres server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        # Not under pytest's tmp_path: as root that folder is closed to the `postgres` user.
        self.dir = Path(tempfile.mkdtemp(prefix="layerscope-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                _missing("running as root needs a `postgres` user for initdb")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = {"user": pw.pw_uid, "group": pw.pw_gid}

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, timeout=timeout,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd=self.dir, **self.as_user,
        )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        with psycopg.connect(pg.url("postgres").replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("CREATE DATABASE layerscope")
        yield pg
    finally:
        pg.cleanup()


def _problem_503(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["status"] == 503 and resp.json()["detail"]
    assert int(resp.headers["retry-after"]) >= 1


@pytest.mark.integration
def test_postgres_restart_under_a_serving_api_is_503_then_recovers(private_pg: PrivatePostgres, tmp_path: Path) -> None:
    url = private_pg.url("layerscope")
    upgrade(url)
    settings = make_settings(url, tmp_path)
    with session_scope(session_factory(url)) as s:
        key = create_key(s, settings, "faults", "faults", ["read", "submit", "admin"])
    engine_for(url).dispose()
    redis = RedisServer(tmp_path)
    redis.start()
    env = {
        **os.environ, "DATABASE_URL": url, "REDIS_URL": redis.url, "LAYERSCOPE_DATA_DIR": str(tmp_path / "data"),
        "LAYERSCOPE_AUTH_DISABLED": "false", "OMP_NUM_THREADS": "1",
    }
    served = Cluster(env, redis, tmp_path)
    try:
        api = served.start_api()
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=served.api_url, timeout=30, headers=auth) as client:
            before = []
            for _ in range(3):
                resp = client.post("/v1/analyses", json=rows_spec(4))
                assert resp.status_code == 201, resp.text
                before.append(resp.json()["id"])

            for mode in ("fast", "immediate"):  # a clean restart, then a crash
                private_pg.stop(mode)
                outage = [
                    ("GET", f"/v1/analyses/{before[0]}", None), ("GET", "/v1/analyses", None),
                    ("POST", "/v1/analyses", rows_spec(4)), ("GET", f"/v1/analyses/{before[1]}/layers", None),
                    ("GET", "/v1/keys", None), ("GET", "/v1/gates", None),
                ]
                for _ in range(3):
                    for method, path, body in outage:
                        started = time.monotonic()
                        resp = client.request(method, path, json=body)
                        assert time.monotonic() - started < 5, f"{method} {path} hung during the outage"
                        _problem_503(resp)
                    assert client.get("/readyz").status_code == 503
                    assert client.get("/healthz").status_code == 200  # the process itself is fine
                # A burst at once: the pool must not hang the requests either.
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    started = time.monotonic()
                    burst = list(pool.map(lambda _: client.get(f"/v1/analyses/{before[2]}"), range(32)))
                assert time.monotonic() - started < 10
                for resp in burst:
                    _problem_503(resp)

                private_pg.start()
                deadline = time.monotonic() + 20
                while client.get(f"/v1/analyses/{before[0]}").status_code != 200:
                    assert time.monotonic() < deadline, "the API did not recover after Postgres came back"
                    time.sleep(0.2)
                assert api.proc.poll() is None  # the same API process, never restarted
                for analysis_id in before:
                    assert client.get(f"/v1/analyses/{analysis_id}").json()["state"] == "QUEUED"
                resp = client.post("/v1/analyses", json=rows_spec(4))
                assert resp.status_code == 201, resp.text
                before.append(resp.json()["id"])
                assert client.get("/readyz").status_code == 200

            # Nothing was lost and nothing refused was half-applied: exactly the accepted jobs exist.
            listed = client.get("/v1/analyses", params={"page_size": 200}).json()["items"]
            assert sorted(a["id"] for a in listed) == sorted(before)
    finally:
        for p in served.procs:
            p.stop()
        redis.stop()


# ------------------------------------------------------------------ time limit


@pytest.mark.integration
def test_a_job_past_its_time_limit_fails_with_timeout_and_the_worker_goes_on(cluster: Cluster) -> None:  # noqa: F811
    cluster.env["LAYERSCOPE_JOB_SOFT_TIME_LIMIT"] = "5"
    worker = cluster.start_worker()
    cluster.start_api()
    with cluster.client() as client:
        resp = client.post("/v1/analyses", json=rows_spec(10_000, batch_size=1))  # minutes of work on a CPU
        assert resp.status_code == 201, resp.text
        job = cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"}, timeout=120)
        assert job["state"] == "FAILED" and job["error"]["type"] == "timeout", job
        assert "time limit" in job["error"]["detail"]
        assert job["progress"]["done"] < job["progress"]["total"] or job["progress"]["stage"] != "profile"
        # The same worker process takes the next job and finishes it.
        resp = client.post("/v1/analyses", json=rows_spec(4))
        job = cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"}, timeout=120)
        assert job["state"] == "SUCCEEDED" and job["attempt"] == 1, job
        assert len(client.get(f"/v1/analyses/{job['id']}/layers", params={"stage": "avss"}).json()["items"]) == TINY_LAYERS
    assert worker.proc.poll() is None


# ------------------------------------------------------------------ out of memory


def _vm_peak(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmPeak:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.integration
def test_a_model_that_does_not_fit_fails_out_of_memory_and_the_worker_goes_on(cluster: Cluster) -> None:  # noqa: F811
    if not Path("/proc/self/status").exists():
        _missing("/proc is needed to read the worker's memory")
    share_smollm2_cache(Path(cluster.env["LAYERSCOPE_DATA_DIR"]))
    cluster.env["MALLOC_ARENA_MAX"] = "2"  # fewer, steadier malloc arenas: a steadier address-space size
    worker = cluster.start_worker()
    cluster.start_api()
    with cluster.client() as client:
        resp = client.post("/v1/analyses", json=rows_spec(8))
        assert cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"
        # The worker's address space after a small job (torch and all loaded) plus some headroom: room
        # for small jobs, not for SmolLM2-135M in float32 (a 538 MB weights file that safetensors maps,
        # then torch maps again). 768 MiB: the first map fits and torch's fails (a RuntimeError);
        # 256 MiB: safetensors' own map fails (a MemoryError).
        peak = _vm_peak(worker.proc.pid)
        for headroom in (768 * 2**20, 256 * 2**20):
            limit = peak + headroom
            resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (limit, limit))
            resp = client.post("/v1/analyses", json=rows_spec(8, model="smollm2-135m"))
            job = cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"})
            assert job["state"] == "FAILED" and job["error"]["type"] == "out_of_memory", (headroom, job)
            assert "memory" in job["error"]["detail"]
            resp = client.post("/v1/analyses", json=rows_spec(8))
            job = cluster.wait_for(client, resp.json()["id"], {"SUCCEEDED", "FAILED"})
            assert job["state"] == "SUCCEEDED", (headroom, job)
    assert worker.proc.poll() is None  # the same process served all five jobs
    assert resource.prlimit(worker.proc.pid, resource.RLIMIT_AS)[0] == limit


@pytest.mark.parametrize(
    ("exc", "oom"),
    [
        (MemoryError(), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                      "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)"), True),
        (RuntimeError("unable to mmap 538090408 bytes from file <model.safetensors>: Cannot allocate memory (12)"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (OSError(12, "Cannot allocate memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_allocation_failures_are_classified_out_of_memory(exc: BaseException, oom: bool) -> None:
    assert _is_out_of_memory(exc) is oom
