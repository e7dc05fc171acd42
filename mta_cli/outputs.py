"""Whether an output path can be written, checked before anything slow runs (extract, train, prune, eval)."""

from __future__ import annotations

import os
from pathlib import Path


def check_folder(path: Path | str, option: str = "--out", error: type[Exception] = ValueError) -> None:
    """`path` can be (or is) a folder: not a file, no file among its parents, under a writable folder."""
    path = Path(path)
    if path.is_file():
        raise error(f"{option} {path} is a file; give a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise error(f"{option} {path}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{option} {path}: {existing} is not writable (read-only file system or no permission)")


def check_file(path: Path | str | None, option: str) -> None:
    """`path` (when given) can be written as a file: not a folder, in an existing writable folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable (read-only file system or no permission)")
