"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `step-000100/` holds model.safetensors, objective.safetensors (projectors),
optimizer.safetensors (per-parameter state), rng.safetensors and state.json (step, loader position,
scheduler, optimizer hyper-parameters). It is written under a temporary name and renamed when
complete, so `latest_checkpoint` never returns a half-written one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _contiguous(state_dict: dict) -> dict:
    """Untied, contiguous copies (safetensors refuses shared storage such as tied embeddings)."""
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def save_checkpoint(folder: Path, model, objective, optimizer, scheduler, progress: dict) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
        save_file(_contiguous(objective.state_dict()) or {"_empty": torch.zeros(0)}, tmp / "objective.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / STATE).write_text(json.dumps({"progress": progress, "optimizer": opt_meta,
                                             "scheduler": scheduler.state_dict()}, indent=1))
    except BaseException:  # a full disk, an interrupt: the previous checkpoints stay the latest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(folder: Path, model, objective, optimizer, scheduler) -> dict:
    """Restore everything saved by `save_checkpoint`; returns the loader/step progress dict."""
    folder = Path(folder)
    meta = json.loads((folder / STATE).read_text())
    model.load_state_dict(load_file(folder / "model.safetensors"))
    objective_state = {k: v for k, v in load_file(folder / "objective.safetensors").items() if k != "_empty"}
    objective.load_state_dict(objective_state)
    opt_tensors = {k: v for k, v in load_file(folder / "optimizer.safetensors").items() if k != "_empty"}
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch"])
    return meta["progress"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    candidates = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE).exists()
                        and not p.name.endswith(".tmp"))
    return candidates[-1] if candidates else None
