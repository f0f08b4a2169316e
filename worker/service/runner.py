"""Run one job: claim the row, heartbeat, run the pipeline, persist, end in a final state.

Shared by the Celery task and the embedded in-process worker, so both modes run
exactly the same code. Knows nothing of Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.config import Settings
from app.logs import analysis_id_var
from app.routing import GPU_QUEUE
from app.schemas import AnalysisSpec, JobState
from worker import runtime
from worker.lm.batching import is_out_of_memory as _is_out_of_memory
from worker.progress import Monotonic
from worker.service import jobstore, registry
from worker.service.jobstore import LostOwnership, SessionFactory
from worker.service.webhooks import on_finished
from worker.stage import JobCancelled, JobContext, JobFailed, StageResult

log = logging.getLogger("layerscope.worker")

EXIT_DEVICE_ERROR = 75  # EX_TEMPFAIL: the worker exits after a CUDA error; its supervisor restarts it
_DEVICE_ERROR_TEXT = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                      "device-side assert", "CUDA driver")


def is_device_error(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory (an illegal access, a device-side assert, a lost
    device): the process's CUDA context is unusable, so every later job here would fail too."""
    if _is_out_of_memory(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":  # torch >= 2.8 raises it for CUDA errors
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_ERROR_TEXT)

Pipeline = Callable[[AnalysisSpec, JobContext, Settings, Callable[[StageResult], None]], None]


class _Heartbeat(threading.Thread):
    def __init__(self, sf: SessionFactory, analysis_id: str, token: str, interval: float):
        super().__init__(name=f"heartbeat-{analysis_id[:8]}", daemon=True)
        self.sf, self.analysis_id, self.token, self.interval = sf, analysis_id, token, interval
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                jobstore.heartbeat(self.sf, self.analysis_id, self.token)
            except LostOwnership:
                self.lost = True
                return
            except Exception as exc:  # database blip: keep trying, the reaper tolerates a gap
                log.warning("heartbeat failed for %s: %s", self.analysis_id, exc)


def _job_context(sf: SessionFactory, settings: Settings, analysis_id: str, token: str, beat: _Heartbeat) -> JobContext:
    """Progress (never backwards, throttled to one write per 0.5 s), cancellation (read at most once a second; a lost
    claim stops the run), the time limit and artifact reads, all conditioned on this claim."""
    last_check = [0.0, False]
    last_progress = [0.0]

    def is_cancelled() -> bool:
        if beat.lost:
            raise LostOwnership(analysis_id)
        now = time.monotonic()
        if now - last_check[0] >= 1.0:
            last_check[:] = [now, jobstore.current_state(sf, analysis_id, token) == JobState.CANCELLING.value]
        return bool(last_check[1])

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last_progress[0] >= 0.5:
            last_progress[0] = now
            jobstore.set_progress(sf, analysis_id, token, stage, done, total)

    return JobContext(
        progress=Monotonic(progress),  # never backwards, whatever a stage reports (worker/progress.py)
        is_cancelled=is_cancelled,
        deadline=time.monotonic() + settings.job_soft_time_limit,
        read_artifact=lambda other_id, name: jobstore.read_artifact(sf, settings, analysis_id, other_id, name),
        analysis_id=analysis_id,
    )


def _end_on_error(
    sf: SessionFactory, settings: Settings, analysis_id: str, token: str, exc: Exception, *, give_back: bool
) -> JobState | None:
    """An unexpected error: a CUDA error gives the job back to the queue (up to the attempt cap);
    anything else fails it, out of memory with advice, the rest as `internal_error`."""
    if give_back:
        log.exception("analysis %s: CUDA error; requeueing the job and exiting this worker", analysis_id)
        return jobstore.give_back(
            sf, analysis_id, token, settings.max_attempts, "device_error",
            f"The GPU failed on each of {settings.max_attempts} attempts ({type(exc).__name__}: {exc}); "
            "check the worker logs and the GPU (nvidia-smi), or run on another worker.",
        )
    if _is_out_of_memory(exc):
        kind, detail = "out_of_memory", (
            "The model ran out of memory; try dtype float16, fewer examples per batch, or a bigger worker."
        )
    else:
        log.exception("analysis %s failed", analysis_id)
        kind, detail = "internal_error", f"{type(exc).__name__}: {exc}"
    jobstore.finish(sf, analysis_id, token, JobState.FAILED, kind, detail)
    return JobState.FAILED


def run_job(
    analysis_id: str,
    sf: SessionFactory,
    settings: Settings,
    worker_name: str,
    pipeline: Pipeline | None = None,
    timeout_exceptions: tuple[type[BaseException], ...] = (),
    on_device_error: Callable[[], None] | None = None,
) -> JobState | None:
    """Returns the final state, or None when the job was not ours to run.

    With `on_device_error` (the Celery worker: exit the process), a non-OOM CUDA error gives
    the job back to the queue (`jobstore.give_back`, at most `max_attempts` claims) and then
    calls it; without it (the embedded worker) the job fails as any other error."""
    token = jobstore.claim(sf, analysis_id, worker_name)
    if token is None:
        log.info("analysis %s not claimable (already taken, cancelled or gone); skipping", analysis_id)
        return None
    log.info("analysis %s claimed by %s", analysis_id, worker_name)
    if pipeline is None:
        from worker.pipeline import run_pipeline  # heavy imports (torch) only when a job runs

        pipeline = run_pipeline

    log_context = analysis_id_var.set(analysis_id)
    beat = _Heartbeat(sf, analysis_id, token, settings.heartbeat_interval)
    beat.start()
    ctx = _job_context(sf, settings, analysis_id, token, beat)

    def save(result: StageResult) -> None:
        jobstore.save_stage(sf, settings, analysis_id, token, result)

    final: JobState | None = None
    device_error = False
    try:
        spec = AnalysisSpec.from_stored(jobstore.load_spec(sf, analysis_id))
        queue = jobstore.load_queue(sf, analysis_id)
        record = lambda block: jobstore.set_summary_entry(sf, analysis_id, token, "runtime", block)  # noqa: E731
        with runtime.recording(record, worker_name, queue):
            if queue == GPU_QUEUE:
                runtime.require_gpu(spec.model, worker_name)
            pipeline(spec, ctx, settings, save)
        final = JobState.SUCCEEDED
        jobstore.finish(sf, analysis_id, token, final)
    except LostOwnership:
        log.warning("analysis %s was reassigned to another worker; dropping this run", analysis_id)
        final = None
    except JobCancelled:
        final = JobState.CANCELLED
        jobstore.finish(sf, analysis_id, token, final)
    except JobFailed as exc:
        final = JobState.FAILED
        jobstore.finish(sf, analysis_id, token, final, exc.error_type, exc.detail)
    except timeout_exceptions:
        final = JobState.FAILED
        jobstore.finish(sf, analysis_id, token, final, "timeout", "The job ran past its time limit.")
    except Exception as exc:
        device_error = on_device_error is not None and is_device_error(exc)
        final = _end_on_error(sf, settings, analysis_id, token, exc, give_back=device_error)
    finally:
        beat.stop_event.set()
        log.info("analysis %s ended %s", analysis_id, final.value if final else "elsewhere")
        analysis_id_var.reset(log_context)
    if device_error:
        if final is not None and final != JobState.QUEUED:
            on_finished(sf, settings, analysis_id, final)
        assert on_device_error is not None
        on_device_error()
        return final
    on_finished(sf, settings, analysis_id, final)  # terminal event + the spec's gate verdict (outbox)
    if final == JobState.SUCCEEDED:
        registry.apply_now(sf, settings, analysis_id)  # the registry's copy now; a failure is retried by the sweep
    return final
