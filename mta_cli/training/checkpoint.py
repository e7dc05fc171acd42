"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `step-000100/` holds model.safetensors, objective.safetensors (projectors),
optimizer.safetensors (per-parameter state), rng.safetensors (each rank's) and state.json (step, loader
position, scheduler, optimizer hyper-parameters). It is written under a temporary name and renamed when
complete, so `latest_checkpoint` never returns a half-written one. The state dicts are full (gathered
from FSDP shards), so a checkpoint resumes in one process or under any number of ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mta_cli import distributed
from mta_cli.distributed import Ranks
from mta_cli.training import parallel

STATE = "state.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Parameter-name-keyed optimizer state -> tensors "INDEX.KEY" and the param groups, parameters by index
    in the optimizer's order (the layout of `optimizer.state_dict()` in one process)."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    tensors = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index[name]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return tensors, {"param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, names: list[str]) -> dict:
    """Inverse of `_flatten_optimizer`, given the parameter names in the optimizer's order."""
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        state.setdefault(names[int(index)], {})[field] = value
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _contiguous(state_dict: dict) -> dict:
    """Untied, contiguous copies (safetensors refuses shared storage such as tied embeddings)."""
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def _part(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_checkpoint(folder: Path, model, optimizer, scheduler, progress: dict, ranks: Ranks = Ranks()) -> Path:
    """Write the checkpoint of `model` (a `parallel.Distilled`, maybe wrapped) once, on rank 0; every rank calls
    it (under FSDP the full state is gathered from all), and the ranks stop together if the write fails."""
    folder = Path(folder)
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    with distributed.together(ranks) as rng:
        rng.value = torch.get_rng_state()
    with distributed.together(ranks):
        if ranks.main:
            _write(folder, model_state, optimizer_state, rng.values, scheduler, progress)
    return folder


def _write(folder: Path, model_state: dict, optimizer_state: dict, rng: list[torch.Tensor], scheduler,
           progress: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(_part(model_state, "student.")), tmp / "model.safetensors")
        save_file(_contiguous(_part(model_state, "objective.")) or {"_empty": torch.zeros(0)},
                  tmp / "objective.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
        save_file({"torch": rng[0]} | {f"torch.{rank}": state for rank, state in enumerate(rng) if rank},
                  tmp / "rng.safetensors")
        (tmp / STATE).write_text(json.dumps({"progress": progress, "optimizer": opt_meta,
                                             "scheduler": scheduler.state_dict()}, indent=1))
    except BaseException:  # a full disk, an interrupt: the previous checkpoints stay the latest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model, optimizer, scheduler, ranks: Ranks = Ranks()) -> dict:
    """Restore everything saved by `save_checkpoint`, under any number of ranks (each reads the files); returns
    the loader/step progress dict. A rank the checkpoint has no random state for takes rank 0's."""
    folder = Path(folder)
    meta = json.loads((folder / STATE).read_text())
    model_state = {f"student.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    model_state |= {f"objective.{k}": v for k, v in load_file(folder / "objective.safetensors").items()
                    if k != "_empty"}
    opt_tensors = {k: v for k, v in load_file(folder / "optimizer.safetensors").items() if k != "_empty"}
    optimizer_state = _unflatten_optimizer(opt_tensors, meta["optimizer"], parallel.parameter_names(model, optimizer))
    parallel.load_full_state(model, optimizer, model_state, optimizer_state)
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng.get(f"torch.{ranks.rank}", rng["torch"]))
    return meta["progress"]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE).exists()
                  and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def drop_old_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (keep 0: delete none). A checkpoint of the student,
    its projectors and AdamW's two moments is ~3x the model: a 135M-parameter run writes 0.8 GB each."""
    if keep:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
