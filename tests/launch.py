"""Multi-process runs for the tests: `torchrun` with 2 CPU ranks (gloo) on a free port, one thread per process,
a timeout so that nothing can hang the suite, and a way to kill the whole job at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds; a run that takes longer has hung


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(extra: dict | None = None) -> dict:
    """One thread per process (results reproducible bit for bit, and 2 cores shared fairly)."""
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"} | (extra or {})


def torchrun_command(*args, nproc: int = 2) -> list[str]:
    """`torchrun --nproc-per-node N -m mta_cli ARGS` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "mta_cli", *map(str, args)]


def torchrun(*args, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command line under torchrun to the end, or fail the test after TIMEOUT with every rank killed
    (they run in sessions of their own, so a timeout that killed torchrun alone would leave them behind)."""
    command = torchrun_command(*args, nproc=nproc)
    process = subprocess.Popen(command, cwd=REPO, env=environment(env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def start(*args, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """Start the command line under torchrun (see `kill`)."""
    return subprocess.Popen(torchrun_command(*args, nproc=nproc), cwd=REPO, env=environment(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own, so no process group
    holds them all)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank it started at once (as a machine failure would)."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
