"""One extraction at a time per cache: an exclusive lock file beside a local cache folder.

`fcntl.flock` on `<cache>.lock` (beside the folder, so the cache itself holds only Zarr objects): the kernel releases it when the holder exits, crashes or is killed,
so a lock can never go stale; the file records the holder's host, pid and start time for the message
the second extraction prints. Caches behind other fsspec URLs (object stores) are not locked: run one
extraction per cache there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

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
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
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
