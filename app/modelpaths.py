"""Where a model name points on disk, without torch: shared by the worker's loader
(`worker/modelzoo/loading.py`), the API's size estimate for queue routing (`app/modelsize.py`)
and the checks at submit (`app/api/precheck.py`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from app.config import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or name in (".", "..")
        or name.lower().endswith(".gguf")
        or "\\" in name
    )


def local_candidate(name: str, settings: Settings) -> Path | None:
    """The path `name` means, or None when it is a hub id. A relative name that exists
    under a model root is local (roots can mirror hub ids offline)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    for root in settings.model_roots:
        candidate = Path(root).expanduser() / path
        if candidate.exists():
            return candidate
    if looks_like_path(name):
        return path
    return None


def resolved_under_roots(path: Path, roots: list[Path]) -> Path | None:
    """`path` resolved (symlinks and `..`), or None when that is outside every root."""
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    return None


def first_escape(folder: Path, roots: list[Path]) -> Path | None:
    """The first entry inside `folder` (a file or folder, at any depth, symlinked folders
    followed) that resolves outside every root, or None. `folder` itself is checked by the
    caller; this catches a real folder under a root whose files link to a model elsewhere.
    Nothing is opened: only directory listings and link targets are read."""
    if not folder.is_dir():
        return None
    seen: set[Path] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                path = Path(entry.path)
                if resolved_under_roots(path, roots) is None:
                    return path
                if entry.is_dir(follow_symlinks=True):
                    pending.append(path)
    return None


def certainly_outside(name: str, roots: list[Path]) -> bool:
    """Whether the local path `name` is outside every root however the worker resolves it: neither
    its normalized spelling (`..` removed) nor its resolved path here lies under any root, spelled
    or resolved. With no roots every local path is outside. A name inside a root that only a
    symlink leads out of is not certain here; the worker refuses it when it resolves the path."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(r).expanduser() / path for r in roots]
    bases: list[Path] = []
    for root in roots:
        spelled = Path(root).expanduser()
        bases += [Path(os.path.normpath(spelled)), spelled.resolve()]
    for candidate in candidates:
        for where in (Path(os.path.normpath(candidate)), candidate.resolve()):
            if any(where.is_relative_to(base) for base in bases):
                return False
    return True
