"""The Python client (`from layerscope import Client, AsyncClient`) against the real server with its
in-process worker: submit, wait with progress, typed tables and DataFrames, typed errors."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from app.schemas import AnalysisOut
from layerscope import AsyncClient, Client, InvalidRequest, NotFound, Unauthorized
from layerscope.client import _finished
from layerscope.errors import AnalysisFailed
from tests.api.conftest import SPEC


def test_client_submits_waits_and_reads_typed_results(live_server: tuple[str, str]) -> None:
    base, key = live_server
    seen: list[tuple[str, str | None, int, int]] = []
    with Client(base, key) as ls:
        job = ls.submit(SPEC, idempotency_key="sdk-1")
        assert job.state.value == "QUEUED" and ls.submit(SPEC, idempotency_key="sdk-1").id == job.id
        done = ls.wait(job.id, interval=0.2, timeout=120,
                       on_progress=lambda j: seen.append((j.state.value, j.progress.stage, j.progress.done,
                                                          j.progress.total)))
        assert done.state.value == "SUCCEEDED", done.error
        assert seen[-1][0] == "SUCCEEDED" and len(seen) == len(set(seen))  # called on changes only

        layers = ls.layers(job.id, stage="avss")
        assert sorted(r.layer for r in layers) == [0, 1, 2, 3]
        frame = layers.to_frame()
        assert {"layer", "scorer", "avss", "rank"} <= set(frame.columns) and len(frame) == 4
        assert sorted(frame["rank"].tolist()) == [1, 2, 3, 4]
        assert all(type(r.values["rank"]) is int and type(r.values["prune"]) is bool for r in layers)
        assert str(frame["rank"].dtype) == "int64" and str(frame["prune"].dtype) == "bool"
        assert ls.metrics(job.id).to_frame().shape[0] == len(ls.metrics(job.id))
        assert ls.list(page_size=5).items[0].id == job.id

        with pytest.raises(NotFound) as missing:
            ls.get(str(uuid.uuid4()))
        assert missing.value.status == 404 and "analysis" in missing.value.detail.lower()
        with pytest.raises(InvalidRequest) as invalid:
            ls.submit({**SPEC, "dataset": {**SPEC["dataset"], "limit": 0}})
        assert [e.field for e in invalid.value.errors] == ["dataset.limit"]
    with Client(base, "ls_nope") as anonymous, pytest.raises(Unauthorized):
        anonymous.get(job.id)


def test_async_client_runs_the_same_operations(live_server: tuple[str, str]) -> None:
    base, key = live_server
    async def run() -> None:
        async with AsyncClient(base, key) as ls:
            job = await ls.submit(SPEC)
            done = await ls.wait(job.id, interval=0.2, timeout=120)
            assert done.state.value == "SUCCEEDED"
            assert len(await ls.layers(job.id, stage="avss")) == 4
            # An avss job has no answers: no rows, and the CSV is the header the sync client gets too.
            assert await ls.answers(job.id) == [] and [r async for r in ls.iter_answers(job.id)] == []
            with Client(base, key) as sync:
                assert await ls.answers_csv(job.id, page_size=1) == sync.answers_csv(job.id, page_size=1)
            assert (await ls.answers_csv(job.id)).startswith("stage,scope,id,split,question,")
            with pytest.raises(NotFound):
                await ls.get(str(uuid.uuid4()))

    asyncio.run(run())


def test_wait_raises_on_failure_only_when_asked() -> None:
    job = AnalysisOut.model_validate({
        "id": "a1", "state": "FAILED", "spec": SPEC, "labels": {}, "progress": {}, "attempt": 1,
        "created_at": "2026-12-01T00:00:00Z", "started_at": None, "finished_at": None, "heartbeat_at": None,
        "error": {"type": "model_not_found", "detail": "no such model"}, "warnings": [], "summary": {}, "links": {},
    })
    assert _finished(job, raise_on_failure=False) is job
    with pytest.raises(AnalysisFailed, match="model_not_found: no such model"):
        _finished(job, raise_on_failure=True)


def test_cli_client_commands_go_through_the_sdk(live_server: tuple[str, str], tmp_path: Path) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    import cli.main

    base, key = live_server
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    run = CliRunner().invoke
    common = ["--server", base, "--key", key]
    submitted = run(cli.main.app, ["submit", str(spec_file), *common])
    assert submitted.exit_code == 0, submitted.output
    analysis_id = submitted.output.strip()
    waited = run(cli.main.app, ["wait", analysis_id, "--interval", "0.2", *common])
    assert waited.exit_code == 0, waited.output
    assert "SUCCEEDED" in waited.output and waited.output.strip().endswith(analysis_id)
    table = run(cli.main.app, ["results", analysis_id, "--stage", "avss", *common])
    assert table.exit_code == 0 and "navss" in table.output and "rank" in table.output
    as_json = json.loads(run(cli.main.app, ["results", analysis_id, "--json", *common]).output)
    assert len([r for r in as_json["items"] if r["stage"] == "avss"]) == 4
    as_csv = run(cli.main.app, ["results", analysis_id, "--csv", "--table", "metrics", *common])
    assert as_csv.exit_code == 0 and as_csv.output.splitlines()[0].startswith("stage")
    status = json.loads(run(cli.main.app, ["status", analysis_id, *common]).output)
    assert status["state"] == "SUCCEEDED"

    picked = run(cli.main.app, ["results", analysis_id, "--stage", "avss", "--columns", "layer,rank", *common])
    assert picked.exit_code == 0 and picked.output.split("\n")[0].split() == ["layer", "rank"], picked.output
    assert sorted(int(line.split()[1]) for line in picked.output.strip().split("\n")[1:]) == [1, 2, 3, 4]
    wrong = run(cli.main.app, ["results", analysis_id, "--columns", "nope", *common])
    assert wrong.exit_code == 2 and "unknown column(s) nope" in wrong.output
    listed = run(cli.main.app, ["list", *common])
    assert listed.exit_code == 0 and analysis_id in listed.output and "SUCCEEDED" in listed.output
    arts = run(cli.main.app, ["artifacts", analysis_id, *common])
    assert arts.exit_code == 0, arts.output
    names = [line.split()[0] for line in arts.output.strip().split("\n")[1:] if line.strip()]
    assert any(n.endswith(".png") for n in names), arts.output  # avss plots by default
    out = tmp_path / "artifact.bin"
    got = run(cli.main.app, ["artifacts", analysis_id, "--download", names[0], "-o", str(out), *common])
    assert got.exit_code == 0 and out.read_bytes() == Client(base, key).download(analysis_id, names[0])
    no_answers = run(cli.main.app, ["answers", analysis_id, *common])
    assert no_answers.exit_code == 0 and "(no rows)" in no_answers.output
    finished = run(cli.main.app, ["cancel", analysis_id, *common])
    assert finished.exit_code == 2 and "409" in finished.output

    spec_file.write_text(yaml.safe_dump({**SPEC, "dataset": {**SPEC["dataset"], "limit": 0}}))
    refused = run(cli.main.app, ["submit", str(spec_file), *common])
    assert refused.exit_code == 2 and "422" in refused.output and "dataset.limit:" in refused.output
    missing = run(cli.main.app, ["status", str(uuid.uuid4()), *common])
    assert missing.exit_code == 2 and "404" in missing.output
