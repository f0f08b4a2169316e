"""Which package may import which (read from the source, nothing imported): background
jobs call services, never API routers; the analysis library's scorers never import the
prune stage that uses them; the API never imports torch or the worker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports(package: str) -> dict[str, set[str]]:
    """Module path -> every module it imports (lazy imports inside functions included)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(package: str, forbidden: tuple[str, ...], under: str = "") -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in imports(package).items()
        if path.startswith(under or package)
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize(
    ("package", "under", "forbidden"),
    [
        ("worker", "", ("app.api",)),
        ("worker", "worker/scoring", ("worker.pruning", "worker.stages", "worker.pipeline")),
        ("worker", "worker/lm", ("worker.pruning", "worker.scoring", "worker.stages", "worker.pipeline")),
        ("app", "", ("torch", "worker")),
    ],
)
def test_layering(package: str, under: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(package, forbidden, under) == []


def test_the_analysis_library_never_imports_the_job_service() -> None:
    """worker/service (Celery, runner, jobstore, sweeper) calls the library; never the other way."""
    found = [o for o in offenders("worker", ("worker.service",)) if not o.startswith("worker/service/")]
    assert found == []
