"""A CUDA error in a real Celery worker process: the worker requeues the job and exits with
EXIT_DEVICE_ERROR; the restarted worker (the test plays the supervisor) runs it to the end."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Cluster
from tests.integration.test_celery_worker import spec
from worker.service.runner import EXIT_DEVICE_ERROR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Loaded by the worker's interpreter at start-up (PYTHONPATH): the first job it runs raises the
# error CUDA raises after an illegal memory access; a marker file makes it happen only once.
INJECT = '''
import os, sys
marker = os.environ.get("LS_TEST_CUDA_ERROR_ONCE")
if marker:
    sys.path.insert(0, os.getcwd())  # the checkout under test, as `python -m cli.main` would
    import worker.service.runner as runner
    real_run_job = runner.run_job

    def failing_once(spec, ctx, settings, save):
        from worker.pipeline import run_pipeline
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        run_pipeline(spec, ctx, settings, save)

    def run_job(*args, **kwargs):
        kwargs.setdefault("pipeline", failing_once)
        return real_run_job(*args, **kwargs)

    runner.run_job = run_job
'''


def test_cuda_error_exits_the_worker_and_the_restarted_worker_finishes_the_job(cluster: Cluster, tmp_path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    cluster.env = {**cluster.env, "PYTHONPATH": str(inject), "LS_TEST_CUDA_ERROR_ONCE": str(tmp_path / "once")}
    first = cluster.start_worker()
    cluster.start_api()
    with cluster.client() as client:
        analysis_id = client.post("/v1/analyses", json=spec(4)).json()["id"]
        assert first.proc.wait(timeout=120) == EXIT_DEVICE_ERROR, first.output()[-3000:]
        assert "requeueing the job and exiting this worker" in first.output()
        job = client.get(f"/v1/analyses/{analysis_id}").json()
        assert (job["state"], job["attempt"]) == ("QUEUED", 1), job
        cluster.start_worker()  # what the restart policy does
        job = cluster.wait_for(client, analysis_id, {"SUCCEEDED", "FAILED"})
        assert (job["state"], job["attempt"]) == ("SUCCEEDED", 2), job
