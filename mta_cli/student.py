"""Building the student: a named model, a depth-pruned copy of the teacher, or a random init from a config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mta_cli.models import ModelLoadError, load_causal_lm, n_layers
from mta_cli.outputs import check_folder


def evenly_spaced(n: int, keep: int) -> list[int]:
    """`keep` indices from 0 to n - 1 inclusive, evenly spaced (first and last always kept)."""
    if not 1 <= keep <= n:
        raise ValueError(f"--keep-layers must be between 1 and the teacher's {n} layers, got {keep}")
    if keep == 1:
        return [n - 1]
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, keep)})


def decoder_layers(model) -> nn.ModuleList:
    """The ModuleList holding a model's transformer blocks (Llama-style `.layers`, GPT-2-style `.h`)."""
    count = n_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelLoadError(f"cannot find the {count} decoder layers of {type(model).__name__} to prune")


def prune_layers(model, keep: int):
    """Keep `keep` evenly spaced blocks (embeddings, final norm and head kept); in place, returns model."""
    layers = decoder_layers(model)
    chosen = evenly_spaced(len(layers), keep)
    kept = nn.ModuleList(layers[i] for i in chosen)
    for new_index, block in enumerate(kept):
        for sub in block.modules():  # attention modules index their KV-cache slot by layer_idx
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    parent = next(m for m in model.modules() if any(child is layers for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is layers)
    setattr(parent, name, kept)
    config = model.config.get_text_config()
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen]
    if hasattr(config, "n_layer"):
        config.n_layer = keep
    return model


def check_model_output(path: Path | str, force: bool = False) -> None:
    """Refuse to save a model at `path` when that would overwrite one (unless `force`), or cannot work (a file,
    a file among its parents, a read-only location); before any model is loaded."""
    path = Path(path)
    check_folder(path)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"--out {path} already holds files; choose another --out, or pass --force to replace them")


def build_student(student: str | None = None, init_from_teacher: str | None = None, keep_layers: int | None = None,
                  student_config: str | None = None, seed: int = 0, trust_remote_code: bool = False,
                  check_teacher: Callable[[nn.Module], None] | None = None):
    """Exactly one of: `student` (name/folder/.gguf), `init_from_teacher` + `keep_layers`, `student_config` (JSON).

    `check_teacher(model)` sees the whole teacher before it is pruned (e.g. to check its fingerprint)."""
    chosen = [x is not None for x in (student, init_from_teacher, student_config)]
    if sum(chosen) != 1:
        raise ValueError("give exactly one of --student, --init-from-teacher (with --keep-layers) or --student-config")
    if student is not None:
        return load_causal_lm(student, "fp32", "cpu", trust_remote_code).train()
    if init_from_teacher is not None:
        if keep_layers is None:
            raise ValueError("--init-from-teacher needs --keep-layers K")
        teacher = load_causal_lm(init_from_teacher, "fp32", "cpu", trust_remote_code)
        if check_teacher is not None:
            check_teacher(teacher)
        return prune_layers(teacher, keep_layers).train()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(student_config)
    try:
        spec = json.loads(path.read_text())
        config = AutoConfig.for_model(**spec)
    except (OSError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a usable model config JSON ({e}); it needs at least 'model_type'") from e
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
