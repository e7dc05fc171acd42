"""mta: offline LLM distillation with Multi-Granular Trajectory Alignment.

Every command is a plain function here, the CLI a thin layer on it:

    from mta_cli import ExtractConfig, extract, TrainConfig, ObjectiveConfig, train, evaluate, CacheReader
    extract(ExtractConfig(teacher="teacher.gguf", data="train.jsonl", out="cache.zarr"))
    train(TrainConfig(out="runs/s1", cache="cache.zarr", init_from_teacher=True, keep_layers=8,
                      objective=ObjectiveConfig(loss="srkl", mta=True)))
    report = evaluate(["runs/s1"], ["dev.jsonl"], seeds=(10, 20))
"""

__version__ = "0.1.0"

from mta_cli.cache import CacheReader  # noqa: E402
from mta_cli.evaluation import evaluate  # noqa: E402
from mta_cli.extract import ExtractConfig, extract  # noqa: E402
from mta_cli.train.objective import ObjectiveConfig  # noqa: E402
from mta_cli.train.trainer import TrainConfig, train  # noqa: E402

__all__ = ["CacheReader", "ExtractConfig", "ObjectiveConfig", "TrainConfig", "__version__", "evaluate", "extract",
           "train"]
