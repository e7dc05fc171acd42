"""mta: offline LLM distillation with Multi-Granular Trajectory Alignment.

Every command is a plain function here, the CLI a thin layer on it:

    from mta_cli import ExtractConfig, extract, TrainConfig, ObjectiveConfig, train, evaluate, CacheReader
    extract(ExtractConfig(teacher="teacher.gguf", data="train.jsonl", out="cache.zarr"))
    train(TrainConfig(out="runs/s1", cache="cache.zarr", init_from_teacher=True, keep_layers=8,
                      objective=ObjectiveConfig(loss="srkl", mta=True)))
    report = evaluate(["runs/s1"], ["dev.jsonl"], seeds=(10, 20))
    generate_records(GenerateConfig(model="runs/s1", data="train.jsonl", out="gen.jsonl", seeds=[10, 20]))
    write_report(["runs/s1", "eval.json"], html="report.html")   # eval.json: report.to_json() saved

The names are imported on first use, so that `import mta_cli` (and `mta --help`) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CacheReader": "mta_cli.cache",
    "evaluate": "mta_cli.evaluation",
    "ExtractConfig": "mta_cli.extraction",
    "extract": "mta_cli.extraction",
    "GenerateConfig": "mta_cli.generation",
    "generate_records": "mta_cli.generation",
    "ObjectiveConfig": "mta_cli.training.objective",
    "TrainConfig": "mta_cli.training.trainer",
    "train": "mta_cli.training.trainer",
    "write_report": "mta_cli.report",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mta_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
