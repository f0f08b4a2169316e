"""A client generated from our OpenAPI document with `openapi-python-client` works against the real
server: submit, poll to SUCCEEDED, and typed problems (not None) for a 404 and a 422."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from app.main import create_app
from tests.api.conftest import SPEC
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The generated package `layerscope_client`, imported from a temporary folder."""
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        pytest.fail("openapi-python-client is not installed (it is in the dev extra)")
    out = tmp_path_factory.mktemp("client")
    app = create_app(make_settings(f"sqlite:///{out / 'unused.db'}", out))
    (out / "openapi.json").write_text(json.dumps(app.openapi()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [generator, "generate", "--path", "openapi.json", "--meta", "none", "--output-path", "layerscope_client"],
        cwd=out, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("layerscope_client")
    finally:
        sys.path.remove(str(out))


def test_generated_client_submits_polls_and_gets_typed_problems(
    generated: object, live_server: tuple[str, str]
) -> None:
    from layerscope_client import AuthenticatedClient
    from layerscope_client.api.analyses import get_analysis, get_layers, get_layers_csv, submit_analysis
    from layerscope_client.models import AnalysisOut, AnalysisSpec, LayerTable, Problem

    base, key = live_server
    client = AuthenticatedClient(base_url=base, token=key)

    job = submit_analysis.sync(client=client, body=AnalysisSpec.from_dict(SPEC))
    assert isinstance(job, AnalysisOut), job
    deadline = time.monotonic() + 120
    while job.state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = get_analysis.sync(job.id, client=client)
        assert isinstance(job, AnalysisOut), job
    assert job.state == "SUCCEEDED", job.error

    table = get_layers.sync(job.id, client=client, stage="avss")
    assert isinstance(table, LayerTable) and len(table.items) == 4
    values = [row.values for row in table.items]  # typed attributes for ranks and flags, numbers for the rest
    assert sorted(v.rank for v in values) == [1, 2, 3, 4] and all(type(v.rank) is int for v in values)
    assert all(type(v.prune) is bool for v in values) and sum(v.prune for v in values) == 1
    assert all(type(v["avss"]) is float for v in values)

    # CSV is its own operation answering text; the JSON operation cannot be asked for CSV.
    assert "format_" not in inspect.signature(get_layers.sync).parameters
    text = get_layers_csv.sync(job.id, client=client, stage="avss")
    assert isinstance(text, str) and text.startswith("stage,scorer,layer,block_name,") and len(text.splitlines()) == 5
    missing_csv = get_layers_csv.sync(str(uuid.uuid4()), client=client)
    assert isinstance(missing_csv, Problem) and missing_csv.status == 404

    missing = get_analysis.sync(str(uuid.uuid4()), client=client)
    assert isinstance(missing, Problem) and missing.status == 404
    assert "analysis" in missing.detail.lower()

    bad = AnalysisSpec.from_dict({**SPEC, "dataset": {**SPEC["dataset"], "limit": 0}})
    invalid = submit_analysis.sync(client=client, body=bad)
    assert isinstance(invalid, Problem) and invalid.status == 422, invalid
    assert [e.field for e in invalid.errors] == ["dataset.limit"]

    anonymous = get_analysis.sync(job.id, client=AuthenticatedClient(base_url=base, token="ls_nope"))
    assert isinstance(anonymous, Problem) and anonymous.status == 401
