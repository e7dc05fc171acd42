"""Where a run's step metrics go besides `RUN/metrics.jsonl` (`mta train --report-to`): TensorBoard event
files in `RUN/tensorboard/`, written by TensorBoard's own writer, and Weights & Biases. Both are optional
packages: asking for one that is not installed is refused before anything loads, with the install command.
Every metric of a metrics.jsonl line is logged under the same name, at the same step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> the package it needs
TENSORBOARD_DIR = "tensorboard"
NOT_LOGGED = ("step",)


def check_reporters(names: list[str]) -> None:
    """Refuse an unknown --report-to value, or one whose package is not installed (ValueError)."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"--report-to must be one of {', '.join(REPORTERS)}, got {name!r}")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ValueError(f"--report-to {name} needs the {REPORTERS[name]} package, which is not installed: "
                             f"pip install 'mta-cli[{name}]' (or drop --report-to {name})")


class TensorBoardLogger:
    """Event files in RUN/tensorboard/. A resumed run starts at `first_step`: TensorBoard then hides what the
    run logged before for the steps it redoes (`purge_step`), as metrics.jsonl drops their lines."""

    def __init__(self, out: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR),
                                    purge_step=first_step if first_step > 1 else None)

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a step takes seconds: keep a live TensorBoard current

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run named after the run folder, its files in RUN/wandb/, the run's configuration as
    its config. WANDB_PROJECT (default "mta"), WANDB_MODE=offline and the other WANDB_* variables apply."""

    def __init__(self, out: Path, run_config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mta"), name=out.name, dir=str(out),
                              config=run_config)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLoggers:
    """The loggers of one run, as a context manager: `log(metrics)` after each optimizer step with the line
    written to metrics.jsonl; closed (flushed) at the end, also when the run stops with an error."""

    def __init__(self, names: list[str], out: Path, run_config: dict, first_step: int = 1):
        check_reporters(names)
        self.loggers = [TensorBoardLogger(out, first_step) if name == "tensorboard" else WandbLogger(out, run_config)
                        for name in dict.fromkeys(names)]

    def log(self, metrics: dict) -> None:
        values = {k: v for k, v in metrics.items() if k not in NOT_LOGGED and isinstance(v, (int, float))}
        for logger in self.loggers:
            logger.log(metrics["step"], values)

    def __enter__(self) -> "MetricsLoggers":
        return self

    def __exit__(self, *exc) -> None:
        for logger in self.loggers:
            logger.close()
