"""What `mta report` reads: training runs (a folder with metrics.jsonl), evaluations (`mta eval --json`
files) and caches; each named by its short path (`labels.short_names`), so legends stay readable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mta_cli.labels import short_names


@dataclass
class Run:
    """One training run: its metrics.jsonl lines in step order and its recorded configuration."""

    name: str
    path: str
    steps: list[dict]
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, over the steps that logged it."""
        rows = [row for row in self.steps if key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]


@dataclass
class Evaluation:
    """One `mta eval --json` file as written (see `EvalReport.to_json`)."""

    name: str
    path: str
    figures: dict

    @property
    def models(self) -> list[dict]:
        return self.figures["models"]

    @property
    def has_nll(self) -> bool:
        """False for an evaluation run with `--no-nll` (its NLL figures are null)."""
        return all(m["average"].get("nll") is not None for m in self.models)


@dataclass
class Inputs:
    runs: list[Run] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    caches: list[str] = field(default_factory=list)


def read_inputs(paths: list[str]) -> Inputs:
    """Sort each path into a run, an evaluation or a cache; anything else is refused (ValueError) naming the
    path and what was expected."""
    kinds = [_kind(str(p)) for p in paths]
    names = iter(short_names([str(p) for p in paths]))
    inputs = Inputs()
    for path, kind in zip(map(str, paths), kinds):
        name = next(names)
        if kind == "run":
            inputs.runs.append(_read_run(name, path))
        elif kind == "eval":
            inputs.evaluations.append(Evaluation(name, path, json.loads(Path(path).read_text(encoding="utf-8"))))
        else:
            inputs.caches.append(path)
    return inputs


def _kind(path: str) -> str:
    p = Path(path)
    if (p / "metrics.jsonl").is_file():
        return "run"
    if (p / "zarr.json").is_file():
        return "cache"
    if p.is_file():
        try:
            figures = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            figures = None
        if isinstance(figures, dict) and isinstance(figures.get("models"), list):
            return "eval"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise ValueError(f"{path} is neither a training run (a folder with metrics.jsonl), an evaluation (the --json "
                     "file of mta eval) nor a cache (a folder with zarr.json)")


def _read_run(name: str, path: str) -> Run:
    metrics = Path(path) / "metrics.jsonl"
    lines, steps = metrics.read_text(encoding="utf-8").splitlines(), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a run still writing (or killed) may leave a torn last line
            raise ValueError(f"{metrics}:{number}: not a JSON line") from None
    if not steps:
        raise ValueError(f"{metrics}: no step logged yet")
    record = Path(path) / "training_config.json"
    config = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    return Run(name, path, sorted(steps, key=lambda row: row["step"]), config)
