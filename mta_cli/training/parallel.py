"""Data parallelism for `mta train` under torchrun: DDP by default, FSDP2 (`--fsdp`) for students that do not fit
one device.

Every rank builds the same student and objective, draws the same global batches (their plan depends on the
seed only) and trains on its share of each (`batches.rank_share`): `--batch-size` is the global batch. The
losses are means over the global batch (`Objective.share`) and DDP or FSDP average the gradients over the
ranks, so an optimizer step equals that of one process on the whole global batch. Checkpoints hold full
(unsharded) state dicts, written once by rank 0: they resume under any number of ranks, with or without
--fsdp. The MTA projectors live in the objective; `Distilled` puts them beside the student under one
wrapper, so they are synchronised too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from mta_cli.distributed import Ranks
from mta_cli.student import decoder_layers
from mta_cli.training.objective import Objective

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU (every rank's in DDP)


class Distilled(nn.Module):
    """The student and the objective as one module: forward(batch) is the objective's losses of the student."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, batch, progress: float = 0.0) -> dict[str, Tensor]:
        return self.objective(self.student, batch, progress=progress)


def global_share(count: Tensor) -> Tensor:
    """This rank's count -> the sum over the ranks divided by their number (see `Objective.share`)."""
    total = count.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def wrap(model: Distilled, ranks: Ranks, fsdp: bool) -> nn.Module:
    """`model` for this job: itself in one process; DDP, or FSDP2 with `fsdp`, under torchrun (module docstring).

    FSDP shards every decoder block on its own and the rest (embeddings, final norm, head, projectors) as the
    root, which stays unsharded from forward to backward: the loss reads the head's weight directly."""
    if not ranks.distributed:
        return model
    model.objective.share = global_share
    if not fsdp:
        return DistributedDataParallel(model, forward_sync_buffers=False)  # no buffer changes in training
    for block in decoder_layers(model.student):
        fully_shard(block)
    fully_shard(model, reshard_after_forward=False)
    return model


def sharded(model: nn.Module) -> bool:
    """Whether the parameters are FSDP shards (the full tensors exist only gathered)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def mean_over_ranks(values: dict[str, Tensor], ranks: Ranks) -> dict[str, float]:
    """Each scalar's mean over the ranks (every rank gets the same numbers), as floats."""
    if not ranks.distributed:
        return {k: v.item() for k, v in values.items()}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / ranks.world).tolist()))


def total_over_ranks(value: int, ranks: Ranks) -> int:
    if not ranks.distributed:
        return value
    total = torch.tensor(value, dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients of all parameters to a global norm of `max_norm`; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_model_state(model: nn.Module) -> dict:
    """The full state dict of `Distilled` ("student.*", "objective.*"); under FSDP every rank takes part and rank
    0 alone receives it."""
    return get_model_state_dict(model, options=FULL)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """`full_model_state` and the optimizer's full state dict (keyed by parameter name)."""
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full state dicts (as `full_state` gives them) into a plain, DDP or FSDP model and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in its order (the order of index-keyed optimizer state)."""
    groups = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return [name for group in groups["param_groups"] for name in group["params"]]
