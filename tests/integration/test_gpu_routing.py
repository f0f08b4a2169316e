"""Queue routing and GPU pinning over real processes: API, Redis, two Celery workers, Postgres.

This machine has no GPU. The "GPU worker" here is `layerscope worker --gpu 1` as a GPU host would
start it: pinned (CUDA_VISIBLE_DEVICES=1, set before torch is imported) and consuming the `gpu` and
`cpu` queues. It sees no CUDA device, so the gpu-queue jobs it takes must fail `gpu_unavailable`
(never run on its CPU); what the test shows is who takes which job, and what each records.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import redis as redis_lib

from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


def tiny(device: str = "auto", dtype: str = "auto") -> dict:
    rows = [{"text": f"sample {i}: the quick brown fox jumps over the lazy dog"} for i in range(4)]
    return {
        "model": {"name": "tiny-random-llama", "device": device, "dtype": dtype},
        "dataset": {"rows": rows, "limit": 4, "max_tokens": 32},
        "stages": {"profile": {"batch_size": 4}, "avss": {"plots": False}},
    }


def test_gpu_jobs_wait_for_a_gpu_worker_and_never_run_on_the_cpu_one(cluster: Cluster) -> None:
    # tiny-random-llama: 2.1M parameters = 8.4 MB in float32, 4.2 MB in bfloat16; a 5 MB CPU limit
    # routes the same model by its size: float32 -> gpu, bfloat16 -> cpu.
    cluster.env["LAYERSCOPE_CPU_MAX_MODEL_GB"] = "0.005"
    cpu_worker = cluster.start_worker()
    cluster.start_api()
    broker = redis_lib.Redis.from_url(cluster.redis.url)
    with cluster.client() as client:
        submitted = {
            "cuda": client.post("/v1/analyses", json=tiny(device="cuda")).json(),
            "auto_big": client.post("/v1/analyses", json=tiny()).json(),
            "auto_small": client.post("/v1/analyses", json=tiny(dtype="bfloat16")).json(),
            "cpu": client.post("/v1/analyses", json=tiny(device="cpu")).json(),
        }
        routes = {k: v["summary"]["routing"]["queue"] for k, v in submitted.items()}
        assert routes == {"cuda": "gpu", "auto_big": "gpu", "auto_small": "cpu", "cpu": "cpu"}
        assert submitted["auto_big"]["summary"]["routing"]["params"] == 2_101_440

        # The CPU worker runs both cpu jobs; the gpu jobs stay queued in the broker's gpu list.
        for key in ("auto_small", "cpu"):
            job = cluster.wait_for(client, submitted[key]["id"], {"SUCCEEDED", "FAILED"})
            assert job["state"] == "SUCCEEDED", job
            assert job["summary"]["runtime"]["queue"] == "cpu"
            assert job["summary"]["runtime"]["device"] == "cpu"
        time.sleep(2)  # more time for a wrong worker to take them
        for key in ("cuda", "auto_big"):
            job = client.get(f"/v1/analyses/{submitted[key]['id']}").json()
            assert job["state"] == "QUEUED" and job["attempt"] == 0, job
        assert broker.llen("gpu") == 2

        gpu_worker = cluster.start_worker("--gpu", "1")
        assert "CUDA_VISIBLE_DEVICES=1, 0 CUDA device(s) visible, queues gpu,cpu" in gpu_worker.output()
        for key in ("cuda", "auto_big"):
            job = cluster.wait_for(client, submitted[key]["id"], {"SUCCEEDED", "FAILED"})
            assert job["state"] == "FAILED" and job["error"]["type"] == "gpu_unavailable", job
            assert "not run on the CPU" in job["error"]["detail"]
            runtime = job["summary"]["runtime"]
            assert runtime["worker"].startswith("layerscope-gpu1-")
            assert runtime["cuda_visible_devices"] == "1" and runtime["queue"] == "gpu"
            assert runtime["device"] is None  # no model was loaded: failed before, not on the CPU
            assert runtime["torch"] and runtime["transformers"]

        # With the CPU worker gone, the GPU worker takes cpu jobs too; its pin shows in the result.
        cpu_worker.stop()
        job = client.post("/v1/analyses", json=tiny(device="cpu")).json()
        job = cluster.wait_for(client, job["id"], {"SUCCEEDED", "FAILED"})
        assert job["state"] == "SUCCEEDED", job
        runtime = job["summary"]["runtime"]
        assert runtime["worker"].startswith("layerscope-gpu1-") and runtime["cuda_visible_devices"] == "1"
        assert (runtime["device"], runtime["dtype"], runtime["gpu_name"]) == ("cpu", "float32", None)


def test_gpus_starts_one_pinned_worker_per_gpu_and_restarts_one_that_dies(cluster: Cluster) -> None:
    group = cluster.spawn("workers", "worker", "--gpus", "2,3")

    def wait_for(pattern: str, count: int = 1, timeout: float = 90) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(pattern, group.output())
            if len(found) >= count:
                return found
            assert group.proc.poll() is None, group.output()
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} x{count} not seen:\n{group.output()}")

    started = dict((gpu, int(pid)) for pid, gpu in wait_for(r"started pid (\d+) for GPU (\d)", 2))
    assert set(started) == {"2", "3"}
    wait_for(r"CUDA_VISIBLE_DEVICES=2, 0 CUDA device\(s\) visible, queues gpu,cpu")
    wait_for(r"CUDA_VISIBLE_DEVICES=3, 0 CUDA device\(s\) visible, queues gpu,cpu")
    wait_for(r" ready\.", 2)

    os.kill(started["3"], signal.SIGKILL)
    wait_for(r"worker for GPU 3 exited -9; restarting")
    wait_for(r"started pid (\d+) for GPU 3", 2)
    wait_for(r" ready\.", 3)

    children = [int(pid) for pid, _ in wait_for(r"started pid (\d+) for GPU (\d)", 3)]
    group.proc.send_signal(signal.SIGTERM)  # to the supervisor only: it stops its children
    assert group.proc.wait(timeout=60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
