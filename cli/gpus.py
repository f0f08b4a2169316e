"""GPU workers: pin a worker process to its GPUs, or supervise one process per GPU.

`layerscope worker --gpu N` sets `CUDA_VISIBLE_DEVICES=N` before anything imports torch, so the
process sees exactly that GPU as `cuda:0` (`--gpu 0,1`: one process that sees both, for a model
sharded with `device_map`). `--gpus 0,1,2,3` starts one such process per GPU and restarts any that
exits, until it is itself stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from app.routing import CPU_QUEUE, GPU_QUEUE, QUEUES

RESTART_DELAY = 5.0


def parse_ids(value: str, option: str) -> list[str]:
    """`0,1` -> ["0", "1"]; ValueError naming the option for anything else."""
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids or not all(v.isdigit() for v in ids):
        raise ValueError(f"{option} takes GPU indices such as 0 or 0,1 (got {value!r})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{option} lists a GPU twice ({value!r})")
    return [str(int(v)) for v in ids]


def parse_queues(value: str | None, gpu: bool) -> list[str]:
    """The queues to consume: `cpu` for a CPU worker, `gpu,cpu` for a GPU worker, or `--queues`."""
    if value is None:
        return [GPU_QUEUE, CPU_QUEUE] if gpu else [CPU_QUEUE]
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise ValueError(f"--queues takes {' and/or '.join(QUEUES)} (got {value!r})")
    return queues


def pin(ids: Sequence[str]) -> str:
    """Make this process see only `ids`. Must run before torch is imported (CUDA reads the variable
    once, when it initialises), which is checked."""
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the GPU was pinned; CUDA_VISIBLE_DEVICES would be ignored")
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as nvidia-smi numbers them
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def visible_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def supervise(ids: Sequence[str], child_args: Sequence[str]) -> int:
    """One `layerscope worker --gpu N` per id (`{gpu}` in `child_args` becomes N); restart a child that
    exits; stop all on SIGTERM/SIGINT."""
    stopping = False
    children: dict[str, subprocess.Popen[bytes]] = {}

    def start(gpu: str) -> None:
        cmd = [sys.executable, "-m", "cli.main", "worker", "--gpu", gpu, *(a.replace("{gpu}", gpu) for a in child_args)]
        children[gpu] = subprocess.Popen(cmd)
        print(f"layerscope worker --gpus: started pid {children[gpu].pid} for GPU {gpu}", flush=True)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for gpu in ids:
        start(gpu)
    while True:
        if stopping:
            for child in children.values():
                child.wait()
            return 0
        for gpu, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping:
                print(f"layerscope worker --gpus: worker for GPU {gpu} exited {code}; restarting in "
                      f"{RESTART_DELAY:.0f}s", file=sys.stderr, flush=True)
                time.sleep(RESTART_DELAY)
                if not stopping:
                    start(gpu)
        time.sleep(0.5)
