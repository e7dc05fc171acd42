"""The run folder of `mta train`: whether --out can take this run, what a resumed run may change, and the
run's record (`training_config.json`), which must keep saying what was trained.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

from mta_cli import __version__
from mta_cli.outputs import check_folder
from mta_cli.training.mixing import parse_cache_spec
from mta_cli.training.checkpoint import latest_checkpoint
from mta_cli.training.loggers import TENSORBOARD_DIR

RECORD = "training_config.json"
LOGS = (TENSORBOARD_DIR, "wandb")  # folders of --report-to
# What a run leaves before its first checkpoint: a failed first attempt that the same command may start over.
FIRST_ATTEMPT_FILES = {"metrics.jsonl", RECORD, "checkpoints", *LOGS}
# Options a resumed run may change: they extend or relocate the run (a copied run folder resumes too) without
# changing what one step does.
RESUMABLE = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "device", "fsdp", "report_to", "out",
             "resume")
# Objective settings a resumed run may change: derived from the others, or how fast a step runs, not what it does.
RESUMABLE_OBJECTIVE = ("key_layers", "compile_loss")
PATH_FIELDS = ("out", "cache", "dev_cache", "teacher", "data", "student", "student_config")


def run_config(config) -> dict:
    """The run's record: every option, local paths made absolute, the derived key layers included."""
    record = {"tool": f"mta-cli {__version__}", **asdict(config)}
    for name in PATH_FIELDS:
        value = record.get(name)
        if isinstance(value, list):
            record[name] = [_absolute(v) for v in value]
        elif value:
            record[name] = _absolute(value)
    return json.loads(json.dumps(record))  # tuples as lists, as read back from the file


def _absolute(spec: str) -> str:
    """A local path made absolute, keeping a cache's ":WEIGHT"; URLs and hub names as they are."""
    path, weight = parse_cache_spec(spec)
    if "://" in path or not Path(path).exists():
        return spec
    return str(Path(path).resolve()) + ("" if weight is None else f":{weight:g}")


def write_run_config(out: Path, config) -> None:
    (out / RECORD).write_text(json.dumps(run_config(config), indent=1) + "\n")


def holds_run(out: Path) -> bool:
    """A checkpoint or a final model is there: the folder holds a run to resume, not to overwrite."""
    return latest_checkpoint(out) is not None or (out / "config.json").exists()


def check_run_folder(out: Path, config) -> None:
    """Refuse an --out this run cannot use, before anything is loaded (ValueError with what to do)."""
    check_folder(out)
    if not out.is_dir():
        return
    if holds_run(out):
        if not config.resume:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        check_resume(out, config)
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in FIRST_ATTEMPT_FILES)
    if others:
        raise ValueError(f"--out {out} holds files that are not an mta run ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); choose another --out")


def check_resume(out: Path, config) -> None:
    """A resumed run must train what the run trained: refuse any other difference than RESUMABLE."""
    path = out / RECORD
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    now, default = run_config(config), defaults(config)
    differences = []
    for key in sorted(set(recorded) | set(now)):
        if key in RESUMABLE or key == "tool":
            continue
        old, new = recorded.get(key, default.get(key)), now.get(key)
        if key == "objective":
            old_objective = defaults(config.objective) | (old or {})
            old, new = ({k: v for k, v in d.items() if k not in RESUMABLE_OBJECTIVE} for d in (old_objective, new))
            differences += [f"objective.{k}: run has {json.dumps(old.get(k))}, this command has {json.dumps(new.get(k))}"
                            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differences.append(f"{key}: run has {json.dumps(old)}, this command has {json.dumps(new)}")
    if differences:
        raise ValueError(f"{out} was trained with a different configuration; refusing to resume it with this one.\n  "
                         + "\n  ".join(differences)
                         + f"\nResume with the run's options (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE[:-2])} "
                         "may change), or train into a new --out.")


def defaults(config) -> dict:
    """The default of each option of a config dataclass: what a record written before the option existed means."""
    values = {}
    for f in fields(config):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
            values[f.name] = asdict(value) if is_dataclass(value) else value
    return json.loads(json.dumps(values))


def start_over(out: Path) -> None:
    """Forget a failed first attempt (nothing to resume): its metrics, TensorBoard events and record are
    rewritten."""
    for name in ("metrics.jsonl", RECORD):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
