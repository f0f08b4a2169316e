"""A non-OOM CUDA error: the job goes back to the queue (attempt cap, then FAILED) and the
worker is told to exit; an OOM or any other error still fails the job as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.db import session_factory
from app.schemas import JobState
from tests.conftest import make_settings
from tests.test_jobs import new_job, row
from worker.service.runner import is_device_error, run_job
from worker.service.sweeper import enqueue_pending

ILLEGAL = "CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA`"


class AcceleratorError(RuntimeError):  # the name torch >= 2.8 raises CUDA errors under
    pass


@pytest.fixture
def env(db_url: str, tmp_path: Path):  # noqa: ANN201
    settings = make_settings(db_url, tmp_path, max_attempts=2)
    return settings, session_factory(settings.resolved_database_url)


def failing(exc: BaseException):  # noqa: ANN201
    def pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
        raise exc

    return pipeline


@pytest.mark.parametrize(
    ("exc", "device"),
    [
        (RuntimeError(ILLEGAL), True),
        (AcceleratorError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (RuntimeError("CUDA error: out of memory"), False),  # an OOM: fails (or backs off), no exit
        (RuntimeError("shape mismatch"), False),
        (ValueError("CUDA error: not a RuntimeError"), False),
    ],
)
def test_is_device_error(exc: BaseException, device: bool) -> None:
    assert is_device_error(exc) is device


def test_cuda_error_requeues_the_job_and_asks_the_worker_to_exit(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    exits: list[str] = []
    final = run_job(job, sf, settings, "gpu-w1", failing(RuntimeError(ILLEGAL)), on_device_error=lambda: exits.append("x"))
    assert final == JobState.QUEUED and exits == ["x"]
    r = row(sf, job)
    assert (r.state, r.attempt, r.claim_token, r.worker, r.enqueued_at, r.finished_at) == ("QUEUED", 1, None, None, None, None)
    assert r.error_type is None

    class Sent:  # a broker that records what the sweeper sends
        def __init__(self) -> None:
            self.ids: list[str] = []

        def enqueue(self, analysis_id: str, queue: str = "cpu") -> bool:
            self.ids.append(analysis_id)
            return True

    sent = Sent()
    # the sweeper sends it again (the Postgres database is shared by the run: other tests' queued
    # jobs may be sent in the same sweep, so only this job's presence is asserted)
    assert enqueue_pending(sf, settings, sent) >= 1 and job in sent.ids

    # the second claim hits the cap (max_attempts=2): FAILED with a stable type, the worker still exits
    final = run_job(job, sf, settings, "gpu-w2", failing(RuntimeError(ILLEGAL)), on_device_error=lambda: exits.append("x"))
    r = row(sf, job)
    assert final == JobState.FAILED and exits == ["x", "x"]
    assert (r.state, r.attempt, r.error_type) == ("FAILED", 2, "device_error")
    assert "illegal memory access" in r.error_detail and r.finished_at is not None


def test_cuda_error_then_success_on_a_fresh_worker(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    run_job(job, sf, settings, "gpu-w1", failing(AcceleratorError(ILLEGAL)), on_device_error=lambda: None)
    assert run_job(job, sf, settings, "gpu-w2", lambda *a: None) == JobState.SUCCEEDED
    assert row(sf, job).attempt == 2


def test_without_the_exit_hook_or_for_other_errors_the_job_fails(env) -> None:  # noqa: ANN001
    settings, sf = env
    embedded = new_job(sf)  # the embedded worker (inside the API) must not exit: it fails the job
    assert run_job(embedded, sf, settings, "emb", failing(RuntimeError(ILLEGAL))) == JobState.FAILED
    assert row(sf, embedded).error_type == "internal_error"
    exits: list[str] = []
    for exc, kind in ((RuntimeError("CUDA out of memory"), "out_of_memory"), (KeyError("x"), "internal_error")):
        job = new_job(sf)
        assert run_job(job, sf, settings, "w", failing(exc), on_device_error=lambda: exits.append("x")) == JobState.FAILED
        assert row(sf, job).error_type == kind
    assert exits == []
