"""Large artifacts in a store every worker and API replica reads: a shared directory, and an
S3-compatible server (moto's, started here on loopback). The worker writes with one data dir,
another machine (another data dir) reads the job's artifact and the API serves it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.artifact_store import LocalStore, S3Store, parse_store, store_for
from app.auth import create_key
from app.config import Settings
from app.db import session_factory, session_scope
from app.main import create_app
from app.models import Analysis
from tests.conftest import free_port, make_settings
from tests.test_jobs import new_job
from worker.service import jobstore
from worker.stage import ArtifactFile, StageResult

ROOT = Path(__file__).resolve().parents[1]
BIG = bytes(range(256)) * (jobstore.INLINE_ARTIFACT_BYTES // 256 + 4099)  # over the inline limit


def _produce(sf, settings: Settings) -> tuple[str, str]:  # noqa: ANN001
    """A succeeded analysis with a large artifact written by a worker with `settings`, and a
    running job of the same project that reads it."""
    source, reader = new_job(sf, "SUCCEEDED"), new_job(sf, "RUNNING")
    with session_scope(sf) as s:
        s.get(Analysis, source).claim_token = "t"
    jobstore.save_stage(sf, settings, source, "t", StageResult(
        stage="mitigate", artifacts=[ArtifactFile("mitigation.safetensors", "application/octet-stream", BIG)]))
    return source, reader


def _download(settings: Settings, sf, analysis_id: str) -> httpx.Response:  # noqa: ANN001
    with session_scope(sf) as s:
        key = create_key(s, settings, "p", "t", ["read", "submit"])
    client = TestClient(create_app(settings))
    return client.get(f"/v1/analyses/{analysis_id}/artifacts/mitigation.safetensors",
                      headers={"Authorization": f"Bearer {key}"})


def test_shared_directory_written_by_one_machine_read_by_another(db_url: str, tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    worker = make_settings(db_url, tmp_path / "gpu-host", artifact_store=str(shared))
    api = make_settings(db_url, tmp_path / "api-host", artifact_store=f"file://{shared}")
    sf = session_factory(worker.resolved_database_url)
    source, reader = _produce(sf, worker)
    assert (shared / source / "mitigation.safetensors").read_bytes() == BIG
    assert not worker.artifacts_dir.exists()  # nothing on the producing machine's own disk
    assert jobstore.read_artifact(sf, api, reader, source, "mitigation.safetensors") == BIG
    resp = _download(api, sf, source)
    assert resp.status_code == 200 and resp.content == BIG
    # without the shared store the other machine has no copy: a clear 404, as before
    alone = make_settings(db_url, tmp_path / "lonely-host")
    assert _download(alone, sf, source).status_code == 404
    assert _download(api, sf, source).status_code == 200
    with session_scope(sf) as s:
        key = create_key(s, api, "p", "admin", ["read", "submit", "admin"])
    assert TestClient(create_app(api)).delete(f"/v1/analyses/{source}",
                                              headers={"Authorization": f"Bearer {key}"}).status_code == 204
    assert not (shared / source / "mitigation.safetensors").exists()


def test_store_urls() -> None:
    assert isinstance(parse_store(None, Path("/d")), LocalStore)
    assert parse_store("/mnt/shared", Path("/d")).root == Path("/mnt/shared")  # type: ignore[attr-defined]
    s3 = parse_store("s3://bucket/some/prefix/", Path("/d"), "http://minio:9000")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.endpoint_url) == ("bucket", "some/prefix", "http://minio:9000")
    for bad in ("s3://", "ftp://host/x", "gs://bucket"):
        with pytest.raises(ValidationError):
            Settings(artifact_store=bad)
    store = LocalStore(Path("/tmp/none"))
    for key in ("../x", "a/../../b", "/etc/passwd", "a//b", ""):
        with pytest.raises(ValueError):
            store.put(key, b"x")


# ----------------------------------------------------------------------- S3 (moto server)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201
    binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(binary).exists():
        pytest.skip("moto[server] is not installed")
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp_path / "moto.log").read_text()) from None
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="layerscope-artifacts")
        yield url, creds
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_store_written_by_a_worker_read_by_another_and_served(sqlite_url: str, tmp_path: Path, s3_server) -> None:  # noqa: ANN001
    import boto3

    endpoint, creds = s3_server
    url = "s3://layerscope-artifacts/prod"
    worker = make_settings(sqlite_url, tmp_path / "gpu-host", artifact_store=url, artifact_s3_endpoint_url=endpoint)
    other = make_settings(sqlite_url, tmp_path / "cpu-host", artifact_store=url, artifact_s3_endpoint_url=endpoint)
    sf = session_factory(worker.resolved_database_url)
    source, reader = _produce(sf, worker)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    obj = s3.get_object(Bucket="layerscope-artifacts", Key=f"prod/{source}/mitigation.safetensors")
    assert obj["Body"].read() == BIG
    assert not worker.artifacts_dir.exists()
    assert jobstore.read_artifact(sf, other, reader, source, "mitigation.safetensors") == BIG
    assert store_for(other).get(f"{source}/missing") is None

    # an API replica (its own process, which must not import torch) streams it from the bucket
    with session_scope(sf) as s:
        key = create_key(s, other, "p", "t", ["read", "submit", "admin"])
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "c = TestClient(create_app())\n"
        f"r = c.get('/v1/analyses/{source}/artifacts/mitigation.safetensors', headers={{'Authorization': 'Bearer {key}'}})\n"
        "open(sys.argv[1], 'wb').write(r.content)\n"
        "print(r.status_code, r.headers.get('content-length'), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, **creds, "DATABASE_URL": sqlite_url, "LAYERSCOPE_DATA_DIR": str(tmp_path / "api-host"),
           "LAYERSCOPE_ARTIFACT_STORE": url, "LAYERSCOPE_ARTIFACT_S3_ENDPOINT_URL": endpoint,
           "LAYERSCOPE_KEY_PEPPER": other.key_pepper, "LAYERSCOPE_ALLOW_DEV_PEPPER": "true"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "got")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["200", str(len(BIG)), "False"], out.stdout
    assert (tmp_path / "got").read_bytes() == BIG

    # deleting the analysis deletes the object
    resp = TestClient(create_app(other)).delete(f"/v1/analyses/{source}", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 204
    listed = s3.list_objects_v2(Bucket="layerscope-artifacts", Prefix="prod/")
    assert listed.get("KeyCount", 0) == 0


def test_s3_store_down_gives_a_503_not_a_500(sqlite_url: str, tmp_path: Path, s3_server) -> None:  # noqa: ANN001
    endpoint, _ = s3_server
    settings = make_settings(sqlite_url, tmp_path / "h", artifact_store="s3://layerscope-artifacts/x",
                             artifact_s3_endpoint_url=endpoint)
    sf = session_factory(settings.resolved_database_url)
    source, _ = _produce(sf, settings)
    dead = make_settings(sqlite_url, tmp_path / "h", artifact_store="s3://layerscope-artifacts/x",
                         artifact_s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    resp = _download(dead, sf, source)
    assert resp.status_code == 503 and resp.headers["content-type"].startswith("application/problem+json")


def test_a_job_whose_store_is_unreachable_fails_with_a_stable_type(sqlite_url: str, tmp_path: Path) -> None:
    from worker.service.runner import run_job

    dead = make_settings(sqlite_url, tmp_path / "h", artifact_store="s3://layerscope-artifacts/x",
                         artifact_s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    sf = session_factory(dead.resolved_database_url)
    job = new_job(sf)

    def pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
        save(StageResult(stage="mitigate", artifacts=[ArtifactFile("big.bin", "application/octet-stream", BIG)]))

    assert run_job(job, sf, dead, "w", pipeline).value == "FAILED"
    with session_scope(sf) as s:
        row = s.get(Analysis, job)
        assert row.error_type == "artifact_store_unavailable" and "LAYERSCOPE_ARTIFACT_STORE" in row.error_detail
