"""Several processes under `torchrun`: who this process is, its device, its process group, and how the ranks
agree that nobody failed.

`torchrun --nproc-per-node N` starts N copies of the command with RANK, WORLD_SIZE and LOCAL_RANK in their
environment; `mta extract` and `mta train` then join one process group (gloo for CPU tensors, NCCL for CUDA
ones) and split the work. Without those variables there is one rank and nothing here communicates.

Failures: the ranks meet at `together` blocks (a shard round, a checkpoint). A rank whose block raised tells
the others its message there, so every rank stops at the same point: the failing one with its own error,
the others with `RankFailed` naming it. A rank that dies outright (killed, out of memory) is torchrun's to
handle: it stops the whole job when one process exits with an error.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mta_cli.models import ModelLoadError, resolve_device


class RankFailed(RuntimeError):
    """Another rank failed; the message is that rank's, so every rank reports the real cause."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank in 0..world-1, and LOCAL_RANK (its GPU on this machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes what is written once (cache metadata, checkpoints, the final model) and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> Ranks:
    """The ranks torchrun announced in the environment (one rank when it did not), or those of a process group
    the caller initialised already."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    return Ranks(rank, world, local_rank)


def rank_device(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank: `--device` as one process takes it, except that under torchrun every rank takes
    the GPU of its LOCAL_RANK (so `cuda:N` is refused there)."""
    device = resolve_device(name)
    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ModelLoadError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                             "use --device cuda (or auto)")
    device = resolve_device(f"cuda:{ranks.local_rank}")
    torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the job's process group for the block (and leave it after) when torchrun started several ranks;
    a group the caller initialised is used and left alone."""
    ranks = launched()
    if not ranks.distributed or dist.is_initialized():
        yield ranks
        return
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


@dataclass
class Shared:
    """What a `together` block shares: set `value` inside; after the block `values` holds every rank's."""

    value: Any = None
    values: list = field(default_factory=list)


@contextmanager
def together(ranks: Ranks) -> Iterator[Shared]:
    """A block every rank runs; at its end the ranks exchange their `value`s and whether they failed, and all
    raise if one did (module docstring). A failure that rank 0 shares (bad options, a damaged cache) is left
    to rank 0 to report. One rank: no communication."""
    shared = Shared()
    try:
        yield shared
    except Exception as error:
        _exchange(ranks, shared, error)
        raise
    _exchange(ranks, shared, None)


def _exchange(ranks: Ranks, shared: Shared, error: Exception | None) -> None:
    if not ranks.distributed:
        shared.values = [shared.value]
        return
    reports: list = [None] * ranks.world
    dist.all_gather_object(reports, (None if error is None else str(error) or type(error).__name__, shared.value))
    if error is not None:
        if not ranks.main and reports[0][0] == reports[ranks.rank][0]:  # rank 0 reports the same failure
            raise RankFailed(f"rank 0 failed: {reports[0][0]}") from error
        return
    failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailed(f"rank {rank} failed: {message}")
    shared.values = [value for _, value in reports]


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
