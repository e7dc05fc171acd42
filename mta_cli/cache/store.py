"""Opening a cache for writing: output checks, the lock, configuration checks, resume, and whole-group commits.

Every shard is written into its own group and marked complete (`attrs["complete"] = True`, with the
manifest of its arrays) only after a listing of the store shows every array and chunk present, so a
crash, a full disk or a concurrent writer never leaves a shard that reads as complete. Re-running the
same extraction keeps complete shards and rewrites the rest; a different configuration is refused,
because mixing two teachers or two tokenizations in one cache would silently corrupt every student
trained on it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from typing import Any

import numpy as np
import zarr

from mta_cli.cache.integrity import confirm_written
from mta_cli.cache.layout import FORMAT_VERSION, INNER_CHUNK_ROWS, compressors, shard_name
from mta_cli.cache.lock import LockedError, cache_lock, local_path
from mta_cli.outputs import check_folder


class CacheError(RuntimeError):
    """A cache cannot be used as asked; the message says why and what to do."""


def open_root(url: str, mode: str) -> zarr.Group:
    """Open the cache's root group at a local path or any fsspec URL (s3://, gs://, file://, memory://)."""
    url = str(url)
    path = local_path(url)
    if path is not None and path.is_file():
        raise CacheError(f"{url} is a file, not a cache folder; give the cache's folder")
    options = {"auto_mkdir": True} if url.startswith("file://") else None  # object stores need no folders
    try:
        return zarr.open_group(url, mode=mode, storage_options=options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise CacheError(f"no mta cache at {url}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CacheError(f"{url}/zarr.json is damaged ({type(e).__name__}: {e}); the cache's root metadata is "
                         "lost: re-extract with --force, or into a new --out") from None


def config_differences(old: dict, new: dict, prefix: str = "", held: str = "cache") -> list[str]:
    """Human-readable list of keys whose values differ between two nested config dicts (`held`: what holds old)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.", held)
        elif a != b:
            diffs.append(f"{prefix}{key}: {held} has {json.dumps(a)}, this run has {json.dumps(b)}")
    return diffs


def check_output(url: str, force: bool = False) -> None:
    """Refuse an --out that cannot become this cache, before any model is loaded.

    A local --out must be a folder or not exist yet, under a writable folder; an existing folder must
    be empty or an mta cache (resumed or refused by `CacheWriter`), unless `force` replaces it.
    """
    path = local_path(url)
    if path is None:
        return
    check_folder(path, "--out", CacheError)
    if path.is_dir() and not force:
        entries = [p.name for p in path.iterdir()]
        if entries and "zarr.json" not in entries:
            raise CacheError(f"--out {url} is a folder that holds other files ({', '.join(sorted(entries)[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}) and no mta cache; choose another --out, or "
                             "pass --force to replace its contents")


def _clear(url: str) -> None:
    """Remove everything at a cache URL (for --force)."""
    path = local_path(url)
    if path is not None:
        if path.is_dir():
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return
    root = zarr.open_group(url, mode="a")
    for name in list(root.keys()):
        del root[name]
    root.attrs.clear()


class CacheWriter:
    """Creates a cache, or resumes one written with the identical `meta["config"]`; holds the cache's lock
    (`cache.lock`) until `close`.

    `meta` is the full root metadata; `meta["config"]` holds everything that decides the cache's
    content and must match on resume. `force` replaces whatever is at `url` instead. `join` only opens a
    cache that another process of the same job opened, locked and checked (rank 0 under torchrun), to
    write shards into it.
    """

    def __init__(self, url: str, meta: dict[str, Any], force: bool = False, join: bool = False):
        self.url = str(url)
        self._exit = ExitStack()
        if join:
            self.root = open_root(self.url, mode="a")
            return
        check_output(self.url, force)
        folder = local_path(self.url)
        try:
            self._exit.enter_context(cache_lock(self.url))
            if folder is not None:
                for stale in folder.rglob("*.partial"):  # left by a write that was killed; no writer is active
                    stale.unlink(missing_ok=True)
            if force:
                _clear(self.url)
            self.root = open_root(self.url, mode="a")
            self._start(meta)
        except LockedError as e:
            self._exit.close()
            raise CacheError(str(e)) from None
        except BaseException:
            self._exit.close()
            raise

    def _start(self, meta: dict[str, Any]) -> None:
        existing = self.root.attrs.get("mta")
        if existing is None:
            if len(list(self.root.keys())):
                raise CacheError(f"{self.url} exists and is not an mta cache; choose another --out, or pass --force "
                                 "to replace it")
            self.root.attrs["mta"] = {**meta, "complete": False}
            return
        if existing.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.url} has cache format {existing.get('format_version')}, this mta writes "
                             f"{FORMAT_VERSION}; use a new --out, or pass --force to replace it")
        diffs = config_differences(existing.get("config", {}), meta["config"])
        if diffs:
            raise CacheError(
                f"{self.url} holds a cache made with a different configuration; refusing to mix them.\n  "
                + "\n  ".join(diffs)
                + "\nUse a new --out, or pass --force to replace the old cache."
            )
        self.root.attrs["mta"] = {**existing, **meta, "complete": False}

    def close(self) -> None:
        """Release the lock (the cache stays as written)."""
        self._exit.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, name: str) -> bool:
        """Whether the group `name` (a shard, or "head") was written whole."""
        try:
            group = self.root[name]
        except (KeyError, ValueError):
            return False
        return bool(group.attrs.get("complete"))

    def shard_complete(self, index: int) -> bool:
        return self.complete(shard_name(index))

    def write_arrays(self, group: zarr.Group, arrays: dict[str, np.ndarray]) -> int:
        """Write each array compressed (states in 4096-row inner chunks); returns bytes stored.

        Every chunk is written, even one that holds only zeros, so that a missing chunk is always a fault."""
        stored = 0
        for name, data in arrays.items():
            rows = max(1, data.shape[0])
            inner = min(rows, INNER_CHUNK_ROWS)
            kwargs = {}
            if rows > inner:  # sharding codec: one file, inner chunks decodable on their own
                kwargs["shards"] = (-(-rows // inner) * inner, *data.shape[1:])
            array = group.create_array(
                name, shape=data.shape, chunks=(inner, *data.shape[1:]), dtype=data.dtype,
                compressors=compressors(data.dtype.itemsize), overwrite=True,
                config={"write_empty_chunks": True}, **kwargs,
            )
            if data.size:
                array[...] = data
            stored += array.nbytes_stored()
        return stored

    def _write_group(self, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> int:
        """Write group `name` whole, replacing any partial one; mark it complete last; returns bytes stored."""
        if name in self.root:
            del self.root[name]
        group = self.root.create_group(name)
        stored = self.write_arrays(group, arrays)
        manifest = confirm_written(group, list(arrays))
        group.attrs.update({**attrs, "arrays": manifest, "complete": True})
        return stored

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> int:
        """Write one shard whole and mark it complete last; returns bytes stored."""
        return self._write_group(shard_name(index), arrays, attrs)

    def write_head(self, arrays: dict[str, np.ndarray]) -> int:
        """Write the teacher's head unless a complete one is there (same config: same teacher); returns bytes."""
        if self.complete("head"):
            return 0
        return self._write_group("head", arrays, {})

    def stored_bytes(self, name: str) -> int:
        """Compressed bytes of every array under group `name`."""
        group = self.root[name]
        return sum(a.nbytes_stored() for _, a in group.members(max_depth=None) if isinstance(a, zarr.Array))

    def finish(self, summary: dict[str, Any]) -> None:
        """Record totals and mark the whole cache complete."""
        self.root.attrs["mta"] = {**self.root.attrs["mta"], **summary, "complete": True}
