"""The deployment files say what the code does: every worker service's healthcheck asks for the node
name its command starts, each GPU worker pins its own GPU, the pepper must be set, the build context
leaves out the venv, the embedded data and the history, and the GPU image takes torch from PyPI."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_worker_has_a_restart_policy_and_a_healthcheck_on_its_own_node() -> None:
    workers = {k: v for k, v in COMPOSE["services"].items() if k.startswith("worker")}
    assert {"worker", "worker-gpu0", "worker-gpu1"} <= set(workers)
    for name, service in workers.items():
        command = service["command"]
        assert command[:2] == ["layerscope", "worker"], name
        test = service["healthcheck"]["test"]
        assert test[1:3] == ["layerscope", "worker-health"], name
        assert _option(test, "--name") == _option(command, "--name"), name
        assert service["restart"] == "unless-stopped", name
        assert "data:/data" in service["volumes"], name


def test_one_pinned_worker_per_gpu_with_a_device_reservation() -> None:
    for name, service in COMPOSE["services"].items():
        match = re.fullmatch(r"worker-gpu(\d+)", name)
        if not match:
            continue
        assert service["profiles"] == ["gpu"]
        assert _option(service["command"], "--gpu") == match.group(1)
        assert service["build"]["args"] == {"TORCH": "cuda"}
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
    assert "profiles" not in COMPOSE["services"]["worker"]  # the CPU worker runs without the profile


def test_served_mode_needs_a_pepper_and_the_model_cache_is_on_the_data_volume() -> None:
    env = COMPOSE["x-env"]
    assert env["LAYERSCOPE_KEY_PEPPER"].startswith("${LAYERSCOPE_KEY_PEPPER:?")  # compose refuses unset
    assert env["HF_HOME"].startswith(env["LAYERSCOPE_DATA_DIR"] + "/")


def test_the_build_context_leaves_out_the_venv_data_and_history() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".layerscope", ".git", "**/__pycache__"} <= ignored


def test_the_gpu_image_takes_the_pinned_torch_from_pypi() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "whl/cu" not in dockerfile  # the CUDA indexes of download.pytorch.org lack torch 2.13.0
    assert 'cuda) pip install "torch==$TORCH_VERSION"' in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH \?= torch==(\S+)", makefile, re.M).group(1) == (
        re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M).group(1)
    )
