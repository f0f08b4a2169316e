"""Real-browser fixtures: the real service as a subprocess and Debian's headless Chromium under Playwright.

Locally a missing Chromium or Playwright skips these tests; under CI=true it fails
them (CI installs Debian's `chromium` and the `playwright` Python package; no
`playwright install`: the browser is the system one).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, free_port, wait_for_analysis

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("LAYERSCOPE_TEST_CHROMIUM", "/usr/bin/chromium")
# As root on a machine with no network but the package registries: no sandbox, no GPU,
# no background connections (they would be refused, many at a time).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium against the running service")


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}; CI needs it (apt-get install chromium; pip install playwright)")
    pytest.skip(what)


@dataclass
class Server:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def wait_for(self, client: httpx.Client, analysis_id: str, timeout: float = 300) -> dict[str, Any]:
        try:
            return wait_for_analysis(client.get, analysis_id, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output()[-4000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def service_env(data_dir: Path, *, auth_disabled: bool) -> dict[str, str]:
    """Embedded mode: no DATABASE_URL / REDIS_URL, SQLite and artifacts under data_dir."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "LAYERSCOPE_DATABASE_URL", "LAYERSCOPE_REDIS_URL")}
    env.update({
        "LAYERSCOPE_DATA_DIR": str(data_dir),
        "LAYERSCOPE_AUTH_DISABLED": "true" if auth_disabled else "false",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def start_server(data_dir: Path, *, auth_disabled: bool = True, extra_env: dict[str, str] | None = None) -> Server:
    """`layerscope serve` as a subprocess, embedded mode, answering /healthz."""
    env = {**service_env(data_dir, auth_disabled=auth_disabled), **(extra_env or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / f"serve-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", env, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"layerscope serve exited:\n{server.output()}")
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"layerscope serve not ready:\n{server.output()}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """A factory: `serve(auth_disabled=True)` starts a service; all are stopped at teardown."""
    started: list[Server] = []

    def factory(**kwargs: Any) -> Server:
        server = start_server(tmp_path / f"data{len(started)}", **kwargs)
        started.append(server)
        return server

    yield factory
    for s in started:
        s.stop()


@dataclass
class Browser:
    """One Chromium with a fresh profile, its page, and what the page logged."""

    context: Any
    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)

    def console(self, kind: str, text: str) -> None:
        # A failed HTTP response is also logged as a console error; `failed` has it with its URL.
        if kind == "error" and not text.startswith("Failed to load resource"):
            self.errors.append(f"console.error: {text}")


def _launch(playwright: Any, user_data_dir: Path, viewport: dict[str, int]) -> Any:
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport=viewport,
        accept_downloads=True,
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        _missing(f"Chromium is not installed at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed")
    with sync_playwright() as p:
        context = _launch(p, tmp_path / "chromium-profile", {"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            b = Browser(context, page)
            page.on("console", lambda m: b.console(m.type, m.text))
            page.on("pageerror", lambda e: b.errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: b.requests.append(r))
            page.on("response", lambda r: b.failed.append((r.status, r.url)) if r.status >= 400 else None)
            yield b
        finally:
            context.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
