"""Load on the HTTP API over Postgres: status polls and submissions from many concurrent clients.

    python bench/bench_load.py [--pollers 100] [--requests 40] [--interval 1.0] [--submitters 10]
                               [--submits 10] [--client raw|httpx] [--workers 1]
                               [--pg-admin postgresql://postgres@127.0.0.1:5432/postgres]

Starts its own `redis-server` (loopback, free port) and `layerscope serve --workers N` (subprocess,
loopback; N > 1 is uvicorn's worker processes, each building the app from the environment) on a
Postgres database it creates and drops. No worker runs, so submitted jobs stay QUEUED: the API's
work is all that is measured. The per-key rate limit is set very high (LAYERSCOPE_RATE_LIMIT_PER_MINUTE=
100000000) so it stays in the request path but never answers 429.

Phases, each with `--pollers` concurrent asyncio clients (one keep-alive connection each):

- `healthz` / `poll` (closed loop): every client sends `--requests` requests back to back, to
  `/healthz` (the in-run baseline: same server, process and client, no auth, no database) and to
  `GET /v1/analyses/{id}` (key check, row + labels, JSON). Latency here is mostly queueing: with
  N clients always waiting, latency ~= N / throughput (Little's law), so read it as capacity;
- `healthz paced` / `poll paced`: every client polls every `--interval` seconds (a status poller;
  `layerscope wait` polls every 1 s), `--requests` times, start times spread over one interval;
- `submit`: `--submitters` clients each POST `--submits` analyses back to back.

Prints p50 / p99 / max latency (ms), throughput (requests/s), error responses (anything but the
expected status, or a transport error: must be 0), the CPU time per request of the API
process(es) and of this load generator, and each poll phase's ratio to its healthz phase.
Target: `poll paced` p99 < 25 ms at 100 pollers. Exit status 1 when any request failed.

`--client raw` (default) is a minimal HTTP/1.1 client on asyncio streams; `--client httpx` uses
one `httpx.AsyncClient` per client. httpx costs ~3-4 ms of CPU per request on a small machine,
as much as the server's status poll: on 2 shared cores the httpx run measures mostly the load
generator (its own `healthz paced` line shows it), the raw run measures the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json as _json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from app.auth import create_key  # noqa: E402
from app.config import Settings  # noqa: E402
from app.db import engine_for, session_factory, session_scope  # noqa: E402
from app.migrate import upgrade  # noqa: E402

CLIENT = "raw"  # or "httpx" (--client)
API_PID = 0
SPEC = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": [{"text": "hello world"}, {"text": "a second text"}], "limit": 2},
    "stages": {"avss": {}},
    "labels": {"bench": "load"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # status code or exception name -> count
    wall: float = 0.0
    server_cpu: float = 0.0  # CPU seconds the API process used during the phase
    client_cpu: float = 0.0  # CPU seconds this (load generator) process used

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    @property
    def count(self) -> int:
        return len(self.latencies) + self.errors

    def line(self, baseline: Phase | None = None) -> str:
        ratio = ""
        if baseline is not None and baseline.latencies:
            ratio = (f"   x{self.pct(0.5) / baseline.pct(0.5):.2f} p50, x{self.pct(0.99) / baseline.pct(0.99):.2f} p99"
                     f" vs {baseline.name}")
        return (f"{self.name:<14} {self.count:>6} req  p50 {self.pct(0.5):7.2f} ms  p99 {self.pct(0.99):7.2f} ms  "
                f"max {self.pct(1.0):7.2f} ms  {self.count / self.wall:7.1f} req/s  errors {self.errors}"
                f"{' ' + str(self.error_kinds) if self.error_kinds else ''}  "
                f"CPU/req server {self.server_cpu / self.count * 1000:.2f} ms client {self.client_cpu / self.count * 1000:.2f} ms"
                f"{ratio}")


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams (`--client raw`): a tenth of httpx's CPU
    per request, so on a small machine the load generator takes less of the CPU the server needs."""

    def __init__(self, base: str, headers: dict):
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawHTTP:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def request(self, method: str, path: str, json: dict | None = None) -> int:
        assert self.reader is not None and self.writer is not None
        body = b"" if json is None else _json.dumps(json).encode()
        extra = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n" if json is not None else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\n{self.head}{extra}\r\n".encode() + body)
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status


async def _client(kind: str, base: str, headers: dict, phase: Phase, method: str, paths: list[str], expect: int,
                  n: int, interval: float, offset: float, body: dict | None) -> None:
    if kind == "raw":
        conn: Any = RawHTTP(base, headers)
    else:
        conn = httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=httpx.Limits(max_connections=1))
    async with conn as client:
        if interval:
            await asyncio.sleep(offset)
        next_at = time.perf_counter()
        for i in range(n):
            started = time.perf_counter()
            try:
                resp = await client.request(method, paths[i % len(paths)], json=body)
                outcome = str(resp if kind == "raw" else resp.status_code)
            except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                outcome = type(exc).__name__
            if outcome == str(expect):
                phase.latencies.append(time.perf_counter() - started)
            else:
                phase.errors += 1
                phase.error_kinds[outcome] = phase.error_kinds.get(outcome, 0) + 1
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def run_phase(name: str, base: str, headers: dict, clients: int, method: str, paths: list[str], expect: int,
                    n: int, interval: float = 0.0, body: dict | None = None) -> Phase:
    phase = Phase(name)
    started, server0, client0 = time.perf_counter(), _cpu(API_PID), time.process_time()
    await asyncio.gather(*(
        _client(CLIENT, base, headers, phase, method, paths[c % len(paths):] + paths[: c % len(paths)], expect, n,
                interval, interval * c / clients, body)
        for c in range(clients)
    ))
    phase.wall = time.perf_counter() - started
    phase.server_cpu, phase.client_cpu = _cpu(API_PID) - server0, time.process_time() - client0
    return phase


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children (uvicorn's workers); Linux /proc, else 0."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(_cpu(int(child)) for child in children)


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_api(env: dict, log: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", str(workers)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the API exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    sys.exit("the API did not start")


async def bench(args: argparse.Namespace, base: str, key: str) -> list[Phase]:
    auth = {"Authorization": f"Bearer {key}"}
    ids = []
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as client:
        for _ in range(args.jobs):
            resp = await client.post("/v1/analyses", json=SPEC)
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
    polls = [f"/v1/analyses/{i}" for i in ids]
    p, n = args.pollers, args.requests
    # Warm-up (connections, imports, caches), not reported.
    await run_phase("warm-up", base, auth, p, "GET", polls, 200, 5)
    await run_phase("warm-up", base, {}, p, "GET", ["/healthz"], 200, 5)
    phases = [
        await run_phase("healthz", base, {}, p, "GET", ["/healthz"], 200, n),
        await run_phase("poll", base, auth, p, "GET", polls, 200, n),
        await run_phase("healthz paced", base, {}, p, "GET", ["/healthz"], 200, n, args.interval),
        await run_phase("poll paced", base, auth, p, "GET", polls, 200, n, args.interval),
        await run_phase("submit", base, auth, args.submitters, "POST", ["/v1/analyses"], 201, args.submits, body=SPEC),
    ]
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=40, help="requests per client per phase")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a paced poller's requests")
    parser.add_argument("--submitters", type=int, default=10)
    parser.add_argument("--submits", type=int, default=10, help="submissions per submitter")
    parser.add_argument("--workers", type=int, default=1,
                        help="API processes (`layerscope serve --workers N`: uvicorn workers when N > 1)")
    parser.add_argument("--client", choices=["httpx", "raw"], default="raw",
                        help="load generator: httpx.AsyncClient per client, or a minimal asyncio HTTP/1.1 client")
    parser.add_argument("--jobs", type=int, default=20, help="analyses created before polling (polled round robin)")
    parser.add_argument("--pg-admin", default=os.environ.get("LAYERSCOPE_TEST_PG",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    global CLIENT, API_PID
    CLIENT = args.client

    dbname = f"layerscope_bench_{uuid.uuid4().hex[:10]}"
    url = f"{args.pg_admin.rsplit('/', 1)[0]}/{dbname}".replace("postgresql://", "postgresql+psycopg://")
    workdir = Path(tempfile.mkdtemp(prefix="layerscope-bench-"))
    with psycopg.connect(args.pg_admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    redis_proc = api = None
    try:
        upgrade(url)
        settings = Settings(database_url=url)
        with session_scope(session_factory(url)) as s:
            key = create_key(s, settings, "bench", "bench", ["read", "submit"])
        engine_for(url).dispose()
        redis_proc, redis_url = start_redis(workdir)
        env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "LAYERSCOPE_DATA_DIR": str(workdir / "data"),
               "LAYERSCOPE_RATE_LIMIT_PER_MINUTE": "100000000", "LAYERSCOPE_AUTH_DISABLED": "false"}
        api, base = start_api(env, workdir / "api.log", args.workers)
        API_PID = api.pid
        print(f"API ({args.workers} process{'es' if args.workers > 1 else ''}) on {base} (Postgres {dbname}, private redis-server, no worker), "
              f"{args.pollers} pollers x {args.requests} requests, paced every {args.interval:g} s; "
              f"{args.submitters} submitters x {args.submits}; {args.client} client; {os.cpu_count()} CPUs shared by "
              f"server, clients and Postgres; load average before {os.getloadavg()[0]:.2f}")
        phases = asyncio.run(bench(args, base, key))
        by_name = {ph.name: ph for ph in phases}
        for ph in phases:
            baseline = {"poll": "healthz", "poll paced": "healthz paced"}.get(ph.name)
            print(ph.line(by_name.get(baseline) if baseline else None))
        print(f"load average after {os.getloadavg()[0]:.2f}")
        paced = by_name["poll paced"]
        verdict = "met" if paced.pct(0.99) < 25 and paced.errors == 0 else "MISSED"
        print(f"target p99(poll paced) < 25 ms at {args.pollers} pollers: {verdict} ({paced.pct(0.99):.2f} ms)")
        return 1 if any(ph.errors for ph in phases) else 0
    finally:
        if api is not None and api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(api.pid, signal.SIGKILL)
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)
        with psycopg.connect(args.pg_admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
