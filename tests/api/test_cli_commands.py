"""CLI commands against the real server (uvicorn, in-process worker, SQLite): `submit --wait` with its
progress lines, the `gate-policy` commands, and `keys list/revoke` on the database; the progress
display as it prints off a terminal and as rich bars on one."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

import cli.main
from app.config import get_settings
from cli.progress import Bars, Lines, display
from tests.api.conftest import SPEC


def test_submit_wait_and_gate_policies(live_admin_server: tuple[str, str], tmp_path: Path) -> None:
    base, key = live_admin_server
    common = ["--server", base, "--key", key]
    run = CliRunner().invoke
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))

    done = run(cli.main.app, ["submit", str(spec_file), "--wait", *common])
    assert done.exit_code == 0, done.output
    analysis_id = done.stdout.strip()
    lines = done.stderr.strip().splitlines()
    assert lines[0] == f"submitted {analysis_id}" and lines[-1].startswith("SUCCEEDED")
    assert len(lines[1:]) == len(set(lines[1:]))  # a line per change, not per poll

    rules = tmp_path / "release.yaml"
    rules.write_text(yaml.safe_dump({"description": "release gate", "rules": ["layers.avss.avss.prune.sum >= 1"]}))
    valid = run(cli.main.app, ["gate-policy", "validate", str(rules)])
    assert valid.exit_code == 0 and "1 rule(s) valid" in valid.output
    invalid = run(cli.main.app, ["gate-policy", "validate", "--rule", "layers.avss.avss.prune.sum >>= 1"])
    assert invalid.exit_code == 2 and "invalid rule 0" in invalid.output
    saved = run(cli.main.app, ["gate-policy", "save", "release", str(rules), *common])
    assert saved.exit_code == 0 and "release v1: 1 rule(s)" in saved.output, saved.output
    again = run(cli.main.app, ["gate-policy", "save", "release", str(rules), "--rule", "warnings.avss <= 100", *common])
    assert "release v2: 2 rule(s)" in again.output, again.output
    listed = run(cli.main.app, ["gate-policy", "list", *common])
    assert listed.exit_code == 0 and "release" in listed.output and "release gate" in listed.output
    shown = run(cli.main.app, ["gate-policy", "show", "release", "--version", "1", *common])
    assert shown.exit_code == 0 and shown.output.splitlines()[1].strip() == "layers.avss.avss.prune.sum >= 1"
    every = run(cli.main.app, ["gate-policy", "show", "release", "--versions", *common])
    assert "release v1" in every.output and "release v2" in every.output
    missing = run(cli.main.app, ["gate-policy", "show", "nope", *common])
    assert missing.exit_code == 2 and "404" in missing.output
    verdict = run(cli.main.app, ["gate", analysis_id, "--policy", "release", *common])
    assert verdict.exit_code == 0 and "PASS" in verdict.output, verdict.output  # one layer proposed, flags summed


def test_keys_list_and_revoke_on_the_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "LAYERSCOPE_DATABASE_URL", "LAYERSCOPE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAYERSCOPE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    run = CliRunner().invoke
    try:
        created = run(cli.main.app, ["keys", "create", "--project", "p1", "--name", "ci"])
        assert created.exit_code == 0 and created.stdout.startswith("ls_"), created.output
        run(cli.main.app, ["keys", "create", "--project", "p2"])
        listed = run(cli.main.app, ["keys", "list", "--project", "p1"])
        rows = listed.stdout.strip().splitlines()
        assert listed.exit_code == 0 and len(rows) == 2 and " ci " in f" {rows[1]} " and created.stdout.strip() not in listed.stdout
        key_id = rows[1].split()[0]
        assert run(cli.main.app, ["keys", "revoke", key_id]).exit_code == 0
        assert rows[1].split()[-1] == "-" and run(cli.main.app, ["keys", "list", "--project", "p1"]).stdout.strip(
        ).splitlines()[1].split()[-1] != "-"
        again = run(cli.main.app, ["keys", "revoke", key_id])
        assert again.exit_code == 2 and "no active API key" in again.output
        assert len(run(cli.main.app, ["keys", "list"]).stdout.strip().splitlines()) == 3
    finally:
        get_settings.cache_clear()


def _job(state: str, stage: str | None, done: int, total: int) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(value=state), progress=SimpleNamespace(stage=stage, done=done,
                                                                                        total=total))


def test_progress_lines_off_a_terminal_and_bars_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    lines = Lines(out)
    clock = iter([0.0, 0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr("cli.progress.time.monotonic", lambda: next(clock))
    for job in (_job("QUEUED", None, 0, 0), _job("RUNNING", "prune:score:cim", 0, 40),
                _job("RUNNING", "prune:score:cim", 10, 40), _job("RUNNING", "prune:score:cim", 10, 40),
                _job("RUNNING", "prune:original:perplexity", 20, 40), _job("SUCCEEDED", "prune", 40, 40)):
        lines(job)  # type: ignore[arg-type]
    printed = out.getvalue().splitlines()
    assert len(printed) == 5  # the repeat is not printed
    assert printed[2].split() == ["RUNNING", "prune:score:cim", "10/40", "ETA", "30s"]  # 10 units in 10 s, 30 left
    assert printed[3].split()[-2:] == ["ETA", "20s"]  # same stage (prune), its start kept across phases

    assert isinstance(display(tty=False), Lines)
    bars = display(tty=True)
    assert isinstance(bars, Bars)
    try:
        for job in (_job("RUNNING", "profile", 2, 8), _job("RUNNING", "avss", 0, 1), _job("RUNNING", "avss", 1, 1)):
            bars(job)  # type: ignore[arg-type]
        tasks = bars.progress.tasks
        assert [(t.description, t.completed, t.total) for t in tasks] == [("profile", 8, 8), ("avss", 1, 1)]
    finally:
        bars.close()
