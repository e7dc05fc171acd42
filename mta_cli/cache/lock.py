"""One extraction at a time per cache: a lock beside the cache, `<cache>.lock`.

Local caches: `fcntl.flock` on the file `<cache>.lock` (beside the folder, so the cache itself holds only
Zarr objects): the kernel releases it when the holder exits, crashes or is killed, so a lock can never go
stale; the file records the holder's host, pid and start time for the message the second extraction prints.

Object stores (any other fsspec URL, e.g. s3://bucket/cache.zarr): the object `<cache>.lock`, created only
if absent (S3's conditional write, If-None-Match; fsspec's exclusive "x" mode), holding the same record and a
heartbeat that the holder rewrites every HEARTBEAT seconds. No kernel releases it when the holder is killed,
so a lock not heard of for STALE seconds is taken over (clocks of the machines must agree to within a
minute). A store that cannot create objects exclusively is written unlocked: run one extraction per cache
there. Under torchrun the job's rank 0 holds the lock for all ranks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

import fsspec

HEARTBEAT = 15.0   # seconds between the holder's heartbeats (object stores)
STALE = 120.0      # seconds without a heartbeat after which an object-store lock counts as abandoned

class LockedError(RuntimeError):
    """Another process holds the cache's lock; the message names it."""


def local_path(url: str) -> Path | None:
    """The folder of a cache URL on the local file system, or None for other fsspec URLs."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


class CacheLock:
    """`with CacheLock(folder):` holds the cache's lock for the block; raises LockedError when taken."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).absolute()
        self.path = self.folder.with_name(self.folder.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "CacheLock":
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise LockedError(f"{self.folder} is being written by another extraction ({holder}); "
                                  "wait for it to finish or stop it, then re-run this command") from None
            # the previous holder may have removed the file between our open and flock: lock the live file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = holder_record()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {record['pid']} on {record['host']}, since {record['since']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class ObjectLock:
    """`with ObjectLock(url):` holds the lock object of a cache on an object store (module docstring); raises
    LockedError when another extraction holds it. `locked` is False when the store cannot lock."""

    def __init__(self, url: str, heartbeat: float = HEARTBEAT, stale: float = STALE):
        self.url, self.heartbeat, self.stale = str(url), heartbeat, stale
        self.fs, self.path = fsspec.core.url_to_fs(self.url + ".lock")
        self.record = holder_record()
        self.locked = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps(self.record | {"heartbeat": time.time()}).encode()

    def _create(self) -> None:
        with self.fs.open(self.path, "xb") as f:
            f.write(self._payload())

    def __enter__(self) -> "ObjectLock":
        try:
            self._create()
        except FileExistsError:
            self._take_over()
        except (NotImplementedError, ValueError):  # no exclusive create on this store: unlocked (module docstring)
            return self
        self.locked = True
        self._beat = threading.Thread(target=self._beating, daemon=True, name="mta-lock-heartbeat")
        self._beat.start()
        return self

    def _take_over(self) -> None:
        """Create the lock in place of an abandoned one; LockedError when its holder is alive."""
        try:
            holder = json.loads(self.fs.cat_file(self.path))
            silent = time.time() - float(holder["heartbeat"])
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            silent, who = self.stale, "holder unknown"
        if silent < self.stale:
            raise LockedError(f"{self.url} is being written by another extraction ({who}; last heard of "
                              f"{max(silent, 0):.0f} s ago); wait for it to finish or stop it, then re-run this command")
        self.fs.rm_file(self.path)
        try:
            self._create()
        except FileExistsError:
            raise LockedError(f"{self.url}: another extraction took over its abandoned lock at the same moment; "
                              "wait for it to finish or stop it, then re-run this command") from None

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.fs.pipe_file(self.path, self._payload())
            except OSError:  # a missed heartbeat is retried at the next one
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.locked:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
            self.locked = False


def cache_lock(url: str) -> CacheLock | ObjectLock:
    """The lock of the cache at `url`: a file lock for a local folder, a lock object on an object store."""
    folder = local_path(url)
    return CacheLock(folder) if folder is not None else ObjectLock(url)
