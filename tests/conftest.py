"""Shared fixtures: a real Postgres database and a real Redis per test run.

Locally a missing service skips the tests that need it; under CI=true it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN = os.environ.get("LAYERSCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("LAYERSCOPE_TEST_REDIS", "redis://127.0.0.1:6379")
# Served-mode processes refuse the public default key pepper (cli.main._check_pepper). Every Settings
# built here and every process a test starts gets this one, so a key created in-process also
# authenticates against a spawned `layerscope serve`.
os.environ.setdefault("LAYERSCOPE_KEY_PEPPER", "layerscope-test-pepper")
# One OpenMP thread for the suite and every process it starts (set before torch is imported): the
# tiny models run faster on one, and far faster on a busy machine, where two spinning OpenMP threads
# on two shared cores slow a test tenfold (test_batching's generation back-off: 40 s -> 4 s). Set
# OMP_NUM_THREADS to override; tests/integration/conftest.py sets it for its workers as well.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _missing(what: str) -> None:
    message = f"{what} is not reachable"
    if IN_CI:
        pytest.fail(f"{message}; CI needs it (.ci/run starts it)")
    pytest.skip(message)


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def create_database() -> str:
    name = f"layerscope_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        _missing("Postgres")
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database at schema head for this test run."""
    from app.migrate import upgrade

    name = create_database()
    url = _pg_url(name).replace("postgresql://", "postgresql+psycopg://")
    upgrade(url)
    yield url
    from app.db import engine_for

    engine_for(url).dispose()
    drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = f"{REDIS_BASE}/15"
    try:
        client = redis_lib.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.flushdb()
    except redis_lib.RedisError:
        _missing("Redis")
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated to head once per test run, for `sqlite_url` to copy."""
    from app.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "layerscope.db"
    upgrade(f"sqlite:///{path}")  # its engine is disposed: the WAL is checkpointed into the file
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh SQLite database at schema head, this test's own: a copy of `sqlite_template`
    (the same file a migration writes, without running Alembic for each of ~150 tests)."""
    target = tmp_path / "layerscope.db"
    shutil.copyfile(sqlite_template, target)
    wal = sqlite_template.with_name(sqlite_template.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, target.with_name(target.name + "-wal"))
    return f"sqlite:///{target}"


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test on both backends: Postgres (served) and SQLite (embedded)."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return request.getfixturevalue("sqlite_url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(db_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "redis_url": None,
        "data_dir": tmp_path / "data",
        "auth_disabled": False,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 3.0,
        "sweep_interval": 0.5,
        "requeue_after": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def wait_for_analysis(
    get: Callable[[str], Any], analysis_id: str, *, states: Collection[str] = FINAL_STATES,
    timeout: float = 300, interval: float = 0.1,
) -> dict:
    """Poll `get("/v1/analyses/<id>")` (a TestClient's or httpx client's get) until the job is in
    one of `states`; honours 429 Retry-After like a polite client. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        resp = get(f"/v1/analyses/{analysis_id}")
        if resp.status_code == 429:
            time.sleep(float(resp.headers.get("retry-after", "1")))
            continue
        assert resp.status_code == 200, resp.text
        job = resp.json()
        if job["state"] in states:
            return job
        time.sleep(interval)
    raise AssertionError(f"analysis stuck in {job.get('state')}: {job}")


def store_analysis(sf: Any, project: str, spec: dict) -> str:
    """Queue a job straight in the database, past the API's checks at submit: a job the API accepted
    under another configuration (other roots, other judges) or before a check existed. Returns its id."""
    import hashlib
    import json

    from app.db import session_scope
    from app.models import Analysis, utcnow

    analysis_id = str(uuid.uuid4())
    with session_scope(sf) as s:
        s.add(Analysis(
            id=analysis_id, project=project, state="QUEUED", spec=spec,
            spec_hash=hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
            model_name=str(spec.get("model", {}).get("name", "")), progress_done=0, progress_total=0, attempt=0,
            warnings=[], summary={}, created_at=utcnow(),
        ))
    return analysis_id


def share_smollm2_cache(data_dir: Path) -> None:
    """Give `data_dir` the converted SmolLM2 cache (under the checkout's .layerscope, built once by
    `make demo` or here, then kept between runs), so a test measures loading or running the model,
    not the one-off GGUF conversion (tests/unit/test_modelzoo_real.py tests the conversion itself)."""
    shared = ROOT / ".layerscope" / "cache" / "models"
    if not list(shared.glob("smollm2-135m-*/layerscope-cache.json")):
        subprocess.run(
            [sys.executable, "-c", "from app.config import Settings; from app.schemas import ModelSpec; "
             "from worker.modelzoo import load_model; load_model(ModelSpec(name='smollm2-135m'), Settings())"],
            cwd=ROOT, env={**os.environ, "LAYERSCOPE_DATA_DIR": str(ROOT / ".layerscope")}, check=True, timeout=300,
        )
    target = data_dir / "cache" / "models"
    target.mkdir(parents=True, exist_ok=True)
    for entry in shared.glob("smollm2-135m-*"):
        (target / entry.name).symlink_to(entry)
