"""Opening a cache for writing: config checks, resume, and whole-shard commits.

Every shard is written into its own group and marked complete (`attrs["complete"] = True`) only
after all its arrays are on disk, so a crash never leaves a shard that reads as complete. Re-running
the same extraction keeps complete shards and rewrites the rest; a different configuration is
refused, because mixing two teachers or two tokenizations in one cache would silently corrupt
every student trained on it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

from mta_cli.cache.layout import FORMAT_VERSION, INNER_CHUNK_ROWS, compressors, shard_name


class CacheError(RuntimeError):
    """A cache cannot be used as asked; the message says why and what to do."""


def open_root(url: str, mode: str) -> zarr.Group:
    """Open the cache's root group at a local path or any fsspec URL (s3://, gs://, file://, memory://)."""
    url = str(url)
    options = {"auto_mkdir": True} if url.startswith("file://") else None  # object stores need no folders
    try:
        return zarr.open_group(url, mode=mode, storage_options=options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise CacheError(f"no mta cache at {url}: {e}") from None


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two nested config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {json.dumps(a)}, this run has {json.dumps(b)}")
    return diffs


class CacheWriter:
    """Creates a cache, or resumes one written with the identical `config`.

    `meta` is the full root metadata; `meta["config"]` holds everything that decides the cache's
    content and must match on resume.
    """

    def __init__(self, url: str, meta: dict[str, Any]):
        self.url = str(url)
        self.root = open_root(self.url, mode="a")
        existing = self.root.attrs.get("mta")
        if existing is None:
            if len(list(self.root.keys())):
                raise CacheError(f"{self.url} exists and is not an mta cache; choose another --out")
            self.root.attrs["mta"] = {**meta, "complete": False}
        else:
            if existing.get("format_version") != FORMAT_VERSION:
                raise CacheError(f"{self.url} has cache format {existing.get('format_version')}, "
                                 f"this mta writes {FORMAT_VERSION}; use a new --out")
            diffs = config_differences(existing["config"], meta["config"])
            if diffs:
                raise CacheError(
                    f"{self.url} holds a cache made with a different configuration; refusing to mix them.\n  "
                    + "\n  ".join(diffs)
                    + "\nUse a new --out, or delete the old cache first."
                )
            self.root.attrs["mta"] = {**existing, **meta, "complete": False}

    def shard_complete(self, index: int) -> bool:
        name = shard_name(index)
        try:
            group = self.root[name]
        except KeyError:
            return False
        return bool(group.attrs.get("complete"))

    def write_arrays(self, group: zarr.Group, arrays: dict[str, np.ndarray]) -> int:
        """Write each array compressed (states in 4096-row inner chunks); returns bytes stored."""
        stored = 0
        for name, data in arrays.items():
            rows = max(1, data.shape[0])
            inner = min(rows, INNER_CHUNK_ROWS)
            kwargs = {}
            if rows > inner:  # sharding codec: one file, inner chunks decodable on their own
                kwargs["shards"] = (-(-rows // inner) * inner, *data.shape[1:])
            array = group.create_array(
                name, shape=data.shape, chunks=(inner, *data.shape[1:]), dtype=data.dtype,
                compressors=compressors(data.dtype.itemsize), overwrite=True, **kwargs,
            )
            if data.size:
                array[...] = data
            stored += array.nbytes_stored()
        return stored

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> int:
        """Write one shard whole, replacing any partial one, and mark it complete last; returns bytes stored."""
        name = shard_name(index)
        if name in self.root:
            del self.root[name]
        group = self.root.create_group(name)
        stored = self.write_arrays(group, arrays)
        group.attrs.update({**attrs, "complete": True})
        return stored

    def write_head(self, arrays: dict[str, np.ndarray]) -> None:
        group = self.root.require_group("head")
        self.write_arrays(group, arrays)

    def finish(self, summary: dict[str, Any]) -> None:
        """Record totals and mark the whole cache complete."""
        self.root.attrs["mta"] = {**self.root.attrs["mta"], **summary, "complete": True}
