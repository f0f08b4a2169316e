"""The job life cycle on a real database: claim, heartbeat, cancel, time limit, reaper, sweeper."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.db import session_factory, session_scope
from app.models import Analysis, Artifact, LayerScore, utcnow
from app.schemas import AnalysisSpec, JobState
from tests.api.conftest import SPEC
from tests.conftest import make_settings
from worker.service import jobstore
from worker.service.jobstore import LostOwnership
from worker.service.runner import run_job
from worker.service.sweeper import enqueue_pending, reap
from worker.stage import ArtifactFile, JobFailed, LayerRow, StageResult


@pytest.fixture
def env(db_url: str, tmp_path: Path):  # noqa: ANN201
    settings = make_settings(db_url, tmp_path)
    return settings, session_factory(settings.resolved_database_url)


def new_job(sf, state: str = "QUEUED", **values) -> str:  # noqa: ANN001, ANN003
    spec = AnalysisSpec.model_validate(SPEC)
    analysis_id = str(uuid.uuid4())
    with session_scope(sf) as s:
        s.add(Analysis(id=analysis_id, project="p", state=state, spec=spec.model_dump(mode="json"), spec_hash="h",
                       model_name="m", progress_done=0, progress_total=0, attempt=0, warnings=[], summary={},
                       created_at=utcnow(), **values))
    return analysis_id


def row(sf, analysis_id: str) -> Analysis:  # noqa: ANN001
    with sf() as s:
        return s.get(Analysis, analysis_id)


def saving_pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
    ctx.progress("demo", 1, 2)
    save(StageResult(stage="demo", layers=[LayerRow(i, f"b{i}", "demo", {"v": float(i)}) for i in range(4)]))


def test_run_job_succeeds_and_persists(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    assert run_job(job, sf, settings, "w1", saving_pipeline) == JobState.SUCCEEDED
    r = row(sf, job)
    assert r.state == "SUCCEEDED" and r.attempt == 1 and r.started_at and r.finished_at
    assert r.progress_stage == "demo"
    with sf() as s:
        assert len(list(s.scalars(select(LayerScore).where(LayerScore.analysis_id == job)))) == 4
    # A second delivery of the same message finds nothing to claim.
    assert run_job(job, sf, settings, "w2", saving_pipeline) is None


def test_stored_progress_never_goes_back(env) -> None:  # noqa: ANN001
    """The runner's guard (worker/progress.py): a stage that restarts a count holds its bar."""
    settings, sf = env
    job = new_job(sf)

    def restarting(spec, ctx, settings, save) -> None:  # noqa: ANN001
        ctx.progress("demo", 3, 4)
        ctx.progress("demo:second_pass", 0, 4)  # goes back: not written
        ctx.progress("other", 0, 1)  # another stage starts its own bar

    assert run_job(job, sf, settings, "w1", restarting) == JobState.SUCCEEDED
    r = row(sf, job)
    assert (r.progress_stage, r.progress_done, r.progress_total) == ("other", 0, 1)
    job = new_job(sf)

    def backing_off(spec, ctx, settings, save) -> None:  # noqa: ANN001
        ctx.progress("demo", 3, 4)
        ctx.progress("demo", 3, 8)  # batches added by a back-off: 3/8 < 3/4, not written

    assert run_job(job, sf, settings, "w1", backing_off) == JobState.SUCCEEDED
    r = row(sf, job)
    assert (r.progress_stage, r.progress_done, r.progress_total) == ("demo", 3, 4)


def test_claim_is_exclusive(env) -> None:  # noqa: ANN001
    _, sf = env
    job = new_job(sf)
    tokens = [jobstore.claim(sf, job, f"w{i}") for i in range(3)]
    assert sum(t is not None for t in tokens) == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (JobFailed("dataset_empty", "The dataset has no rows."), "dataset_empty"),
        (ValueError("boom"), "internal_error"),
        (MemoryError(), "out_of_memory"),
    ],
)
def test_failures_end_failed_with_type_and_detail(env, error: Exception, kind: str) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)

    def failing(spec, ctx, settings, save) -> None:  # noqa: ANN001
        raise error

    assert run_job(job, sf, settings, "w1", failing) == JobState.FAILED
    r = row(sf, job)
    assert r.error_type == kind and r.error_detail


def test_cooperative_cancel_between_batches(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    batches = []

    def long_pipeline(spec, ctx, settings, save) -> None:  # noqa: ANN001
        for i in range(200):
            ctx.check_cancelled()
            batches.append(i)
            time.sleep(0.05)

    def cancel_soon() -> None:
        time.sleep(0.5)
        with session_scope(sf) as s:
            s.execute(update(Analysis).where(Analysis.id == job).values(state="CANCELLING"))

    threading.Thread(target=cancel_soon).start()
    assert run_job(job, sf, settings, "w1", long_pipeline) == JobState.CANCELLED
    assert 3 < len(batches) < 100
    assert row(sf, job).state == "CANCELLED"


def test_time_limit_fails_with_timeout(env, tmp_path) -> None:  # noqa: ANN001
    _, sf = env
    settings = make_settings(env[0].database_url, tmp_path, job_soft_time_limit=0)
    job = new_job(sf)

    def slow(spec, ctx, settings, save) -> None:  # noqa: ANN001
        time.sleep(0.01)
        ctx.check_cancelled()

    assert run_job(job, sf, settings, "w1", slow) == JobState.FAILED
    assert row(sf, job).error_type == "timeout"


def test_reaper_requeues_then_fails_at_attempt_cap(env) -> None:  # noqa: ANN001
    settings, sf = env
    old = utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout + 5)
    dead = new_job(sf, state="RUNNING", heartbeat_at=old)
    capped = new_job(sf, state="RUNNING", heartbeat_at=old)
    cancelling = new_job(sf, state="CANCELLING", heartbeat_at=old)
    alive = new_job(sf, state="RUNNING", heartbeat_at=utcnow())
    with session_scope(sf) as s:
        s.execute(update(Analysis).where(Analysis.id == capped).values(attempt=settings.max_attempts))
    counts = reap(sf, settings)
    assert counts["requeued"] >= 1 and counts["failed"] >= 1 and counts["cancelled"] >= 1
    assert row(sf, dead).state == "QUEUED" and row(sf, dead).enqueued_at is None
    failed = row(sf, capped)
    assert failed.state == "FAILED" and failed.error_type == "worker_lost"
    assert row(sf, cancelling).state == "CANCELLED"
    assert row(sf, alive).state == "RUNNING"


def test_a_reaped_worker_cannot_write_over_the_new_owner(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    old_token = jobstore.claim(sf, job, "zombie")
    with session_scope(sf) as s:
        s.execute(update(Analysis).where(Analysis.id == job)
                  .values(heartbeat_at=utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout + 1)))
    reap(sf, settings)
    new_token = jobstore.claim(sf, job, "fresh")
    assert new_token and new_token != old_token
    with pytest.raises(LostOwnership):
        jobstore.heartbeat(sf, job, old_token)
    with pytest.raises(LostOwnership):
        jobstore.save_stage(sf, settings, job, old_token, StageResult(stage="x"))
    assert not jobstore.finish(sf, job, old_token, JobState.SUCCEEDED)
    assert row(sf, job).state == "RUNNING" and row(sf, job).attempt == 2


class FlakyBroker:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[str] = []

    def enqueue(self, analysis_id: str, queue: str = "cpu") -> bool:
        if self.up:
            self.sent.append(analysis_id)
        return self.up


def test_sweeper_sends_jobs_whose_enqueue_failed(env) -> None:  # noqa: ANN001
    settings, sf = env
    job = new_job(sf)
    broker = FlakyBroker()
    assert enqueue_pending(sf, settings, broker) == 0
    assert row(sf, job).enqueued_at is None
    broker.up = True
    assert enqueue_pending(sf, settings, broker) >= 1
    assert job in broker.sent and row(sf, job).enqueued_at is not None
    broker.sent.clear()
    enqueue_pending(sf, settings, broker)
    assert job not in broker.sent  # sent once, not again until requeue_after passes


def test_a_job_reads_another_analysis_artifact_only_in_its_project_and_only_when_succeeded(env) -> None:  # noqa: ANN001
    settings, sf = env
    source, reader = new_job(sf, "SUCCEEDED"), new_job(sf, "RUNNING")
    stranger, unfinished = new_job(sf, "RUNNING"), new_job(sf, "RUNNING")
    with session_scope(sf) as s:
        s.get(Analysis, stranger).project = "another-project"
    big = b"x" * (jobstore.INLINE_ARTIFACT_BYTES + 1)  # kept on the artifact volume, not in the row
    for job in (source, unfinished):
        with session_scope(sf) as s:
            s.get(Analysis, job).claim_token = "t"
        jobstore.save_stage(sf, settings, job, "t", StageResult(
            stage="demo", artifacts=[ArtifactFile("small.bin", "application/octet-stream", b"abc"),
                                     ArtifactFile("big.bin", "application/octet-stream", big)]))
    assert jobstore.read_artifact(sf, settings, reader, source, "small.bin") == b"abc"
    assert jobstore.read_artifact(sf, settings, reader, source, "big.bin") == big
    assert jobstore.read_artifact(sf, settings, reader, source, "missing.bin") is None
    assert jobstore.read_artifact(sf, settings, stranger, source, "small.bin") is None  # another project
    assert jobstore.read_artifact(sf, settings, reader, unfinished, "small.bin") is None  # not SUCCEEDED
    with session_scope(sf) as s:  # a recorded path that leads off the artifact volume is never read
        s.get(Artifact, (source, "big.bin")).path = "../../etc/passwd"
    assert jobstore.read_artifact(sf, settings, reader, source, "big.bin") is None
