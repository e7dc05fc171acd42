"""Does MTA help? The study of examples/quality_study.sh, on the protocol of the papers (method.md §8).

Stage 0 fine-tunes the teacher (SmolLM2-135M-Instruct) on Dolly train with SFT, as the papers do, and
extracts the fine-tuned teacher once. Every student starts from the same depth-pruned copy of the
fine-tuned teacher and trains the same number of steps from that cache. Rows: the teacher before and after
its fine-tuning, the untrained pruned student, SFT, fkl, srkl, srkl + MTA (three training seeds for SFT,
srkl and srkl + MTA), srkl + DSA only, srkl + Hid only, DistiLLM's recipe with and without MTA, and a λ
sweep with the paper's and the MTA group's weighting (one seed each).

Evaluation: the three-seed rows on `main_records` Dolly dev records (disjoint from train) with sampling
seeds 10, 20, 30; the others on `other_records` with seed 10 (beside srkl seed 0 on the same prompts); the
reference NLL on `nll_records` dev records. Δ against srkl comes with a 95% bootstrap interval: for the
three-seed rows pairs (row seed i, srkl seed i) and prompts are resampled together (training seed and
prompt both vary); for one-seed rows, prompts only. Every step resumes: re-running continues where it
stopped.

    .venv/bin/python -m benchmarks.quality_study [--preset cpu|gpu] [--work study-cpu]
    .venv/bin/python -m benchmarks.quality_study --pilot   # the student choice: SFT students of several sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import DOLLY, REPO, report, teacher_gguf

MTA = [sys.executable, "-m", "mta_cli"]
LENGTHS = ["--max-length", "256", "--max-prompt-length", "128"]


@dataclass(frozen=True)
class Preset:
    train_records: int          # Dolly train records: the teacher's fine-tuning and the distillation data
    teacher_steps: int          # stage 0: SFT steps of the teacher
    teacher_lr: float
    keep_layers: int            # the student: this many of the teacher's layers, evenly spaced
    steps: int                  # optimizer steps of every student
    lr: float
    batch_size: int
    train_seeds: tuple[int, ...]
    main_records: int           # dev prompts for the three-seed rows
    main_seeds: tuple[int, ...]
    other_records: int          # dev prompts for the one-seed rows and the λ sweep
    other_seeds: tuple[int, ...]
    nll_records: int
    new_tokens: int
    device: str


PRESETS = {
    "cpu": Preset(train_records=1000, teacher_steps=100, teacher_lr=2e-5, keep_layers=10, steps=100, lr=5e-4,
                  batch_size=8, train_seeds=(0, 1, 2), main_records=200, main_seeds=(10, 20, 30), other_records=100,
                  other_seeds=(10,), nll_records=1000, new_tokens=64, device="cpu"),
    "gpu": Preset(train_records=2623, teacher_steps=600, teacher_lr=2e-5, keep_layers=12, steps=1500, lr=5e-4,
                  batch_size=16, train_seeds=(0, 1, 2), main_records=500, main_seeds=(10, 20, 30, 40, 50),
                  other_records=500, other_seeds=(10, 20, 30), nll_records=1000, new_tokens=256, device="cuda"),
}

MAIN = {"sft": ["--loss", "sft"], "srkl": ["--loss", "srkl"], "srkl+mta": ["--loss", "srkl", "--mta"]}
OTHERS = {
    "fkl": ["--loss", "fkl"],
    "srkl+dsa": ["--loss", "srkl", "--mta", "--no-hid"],
    "srkl+hid": ["--loss", "srkl", "--mta", "--no-dsa"],
    "distillm": ["--recipe", "distillm"],
    "distillm+mta": ["--recipe", "distillm", "--mta"],
    "srkl+mta dsa=0.5": ["--loss", "srkl", "--mta", "--lambda-dsa", "0.5"],
    "srkl+mta dsa=8": ["--loss", "srkl", "--mta", "--lambda-dsa", "8"],
    "srkl+mta hid=0.05": ["--loss", "srkl", "--mta", "--lambda-hid", "0.05"],
    "srkl+mta hid=0.8": ["--loss", "srkl", "--mta", "--lambda-hid", "0.8"],
    "srkl+mta group": ["--loss", "srkl", "--mta", "--mta-weighting", "group"],
}


def run(*args: str) -> None:
    """One mta command of the study (its output on this terminal's stderr, its summary discarded)."""
    subprocess.run([*MTA, *map(str, args)], check=True, stdout=subprocess.DEVNULL, cwd=REPO)


def first_lines(source: Path, n: int, target: Path) -> Path:
    if not target.exists():
        target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return target


def slug(name: str) -> str:
    return name.replace("+", "-").replace(" ", "_").replace("=", "")


class Study:
    def __init__(self, preset: Preset, work: Path):
        self.p, self.work = preset, work
        work.mkdir(parents=True, exist_ok=True)
        self.train = first_lines(DOLLY / "train.jsonl", preset.train_records, work / "train.jsonl")
        self.dev_main = first_lines(DOLLY / "dev.jsonl", preset.main_records, work / "dev-main.jsonl")
        self.dev_other = first_lines(DOLLY / "dev.jsonl", preset.other_records, work / "dev-other.jsonl")
        self.dev_nll = first_lines(DOLLY / "dev.jsonl", preset.nll_records, work / "dev-nll.jsonl")
        self.device = ["--device", preset.device]

    def teacher(self) -> tuple[str, Path]:
        """Stage 0: the instruct teacher and its SFT on Dolly train."""
        original = str(teacher_gguf())
        tuned = self.work / "teacher-sft"
        run("train", "--data", self.train, "--loss", "sft", "--teacher", original, "--init-from-teacher",
            "--keep-layers", "30", "--max-steps", self.p.teacher_steps, "--lr", self.p.teacher_lr, "--batch-size",
            self.p.batch_size, *LENGTHS, "--checkpoint-every", "25", "--resume", "--out", tuned, *self.device)
        return original, tuned

    def cache_and_student(self, teacher: Path) -> tuple[Path, Path]:
        cache = self.work / "cache.zarr"
        run("extract", "--teacher", teacher, "--data", self.train, "--out", cache, *LENGTHS, *self.device)
        pruned = self.work / f"pruned-{self.p.keep_layers}"
        if not (pruned / "config.json").exists():
            run("prune", "--teacher", teacher, "--keep-layers", self.p.keep_layers, "--out", pruned)
        return cache, pruned

    def train_student(self, cache: Path, pruned: Path, name: str, flags: list[str], seed: int) -> Path:
        out = self.work / "students" / f"{slug(name)}-s{seed}"
        run("train", "--cache", cache, "--student", pruned, *flags, "--max-steps", self.p.steps, "--batch-size",
            self.p.batch_size, "--seed", seed, *(["--lr", self.p.lr] if "--recipe" not in flags else []),
            "--checkpoint-every", "25", "--resume", "--out", out, *self.device)
        return out

    def evaluate(self, models: list[Path | str], data: Path, seeds: tuple[int, ...], name: str) -> dict:
        """`mta eval` of `models` (kept once done: re-running reads the file)."""
        out = self.work / f"eval-{name}.json"
        if not out.exists():
            partial = out.with_suffix(".partial.json")
            run("eval", *[a for m in models for a in ("--model", m)], "--data", data, "--seeds",
                ",".join(map(str, seeds)), "--max-new-tokens", self.p.new_tokens, "--batch-size", self.p.batch_size,
                "--json", partial, "--generations", partial.with_suffix(".jsonl"), *self.device)
            partial.rename(out)
        return json.loads(out.read_text())

    def nll(self, model: Path | str) -> dict:
        """Reference NLL of `model` on the NLL dev records: token mean and per record (kept once done)."""
        out = self.work / "nll" / f"{slug(Path(str(model)).name)}.json"
        if not out.exists():
            from mta_cli.evaluation import reference_nll
            from mta_cli.models import load_causal_lm, load_tokenizer
            from mta_cli.records import load_records

            tokenizer = load_tokenizer(str(model))
            figures = reference_nll(load_causal_lm(str(model), device=self.p.device), tokenizer,
                                    load_records(self.dev_nll, tokenizer=tokenizer).records,
                                    batch_size=self.p.batch_size, max_length=256, max_prompt_length=128)
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({"nll": figures.nll, "per_record": figures.per_record}))
        return json.loads(out.read_text())


# --- statistics --------------------------------------------------------------------------------------------


def per_prompt(evaluation: dict, model: str) -> np.ndarray:
    """ROUGE-L per prompt (mean over the sampling seeds) of `model` in an eval JSON: [n_prompts]."""
    entry = next(m for m in evaluation["models"] if m["model"] == model)
    seeds = entry["files"][0]["rougeL_per_record"]
    return np.mean([seeds[s] for s in sorted(seeds)], axis=0)


def paired_interval(rows: list[np.ndarray], bases: list[np.ndarray], samples: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean difference and 95% percentile interval: pairs (row seed i, base seed i) and prompts resampled.

    rows, bases: per training seed, ROUGE-L per prompt [n]. One seed: prompts only."""
    diffs = np.stack([r - b for r, b in zip(rows, bases)])           # [seeds, prompts]
    rng = np.random.default_rng(seed)
    k, n = diffs.shape
    pick_seeds = rng.integers(0, k, size=(samples, k))
    pick_prompts = rng.integers(0, n, size=(samples, n))
    replicates = np.array([diffs[s][:, p].mean() for s, p in zip(pick_seeds, pick_prompts)])
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def rouge_of(evaluation: dict, model: str) -> float:
    return next(m for m in evaluation["models"] if m["model"] == model)["average"]["rougeL_mean"]


def table(study: Study, teachers: dict, pruned: Path, students: dict, evals: dict, nll: dict) -> tuple[list, dict]:
    """Rows: model, training seeds, ROUGE-L mean ± std over training seeds, Δ vs srkl [95% CI], NLL."""
    rows, figures = [], {}
    main_eval, other_eval = evals["main"], evals["other"]
    srkl = [str(p) for p in students["srkl"]]
    for name, path in [*teachers.items(), ("pruned (untrained)", pruned)]:
        score = rouge_of(evals["reference"], str(path))
        rows.append([name, "-", f"{score:.2f}", "-", f"{nll[str(path)]['nll']:.3f}"])
        figures[name] = {"rougeL": score, "nll": nll[str(path)]["nll"], "eval": "reference"}
    for name, paths in students.items():
        paths = [str(p) for p in paths]
        main = name in MAIN
        evaluation = main_eval if main else other_eval
        scores = [rouge_of(evaluation, p) for p in paths]
        bases = srkl if main else srkl[:1]
        if name == "srkl":
            delta = None
        else:
            delta = paired_interval([per_prompt(evaluation, p) for p in paths],
                                    [per_prompt(evaluation, b) for b in bases])
        nlls = [nll[p]["nll"] for p in paths] if all(p in nll for p in paths) else None
        spread = f" ± {statistics.pstdev(scores):.2f}" if len(scores) > 1 else ""
        rows.append([name, len(paths), f"{statistics.fmean(scores):.2f}{spread}",
                     "-" if delta is None else f"{delta[0]:+.2f} [{delta[1]:+.2f}, {delta[2]:+.2f}]",
                     "-" if nlls is None else f"{statistics.fmean(nlls):.3f}" +
                     (f" ± {statistics.pstdev(nlls):.3f}" if len(nlls) > 1 else "")])
        figures[name] = {"rougeL_per_seed": scores, "nll_per_seed": nlls, "eval": "main" if main else "other",
                         "delta_vs_srkl": None if delta is None else dict(zip(("mean", "low", "high"), delta))}
    return rows, figures


PILOT = [(8, 5e-4), (10, 5e-4), (15, 5e-4), (10, 2e-4), (10, 1e-3)]  # (kept layers, lr) of SFT students


def pilot(study: Study) -> None:
    """The student choice: SFT students of several sizes and learning rates, `steps` steps each, against the
    untrained pruned copies and the fine-tuned teacher (NLL on the NLL records, ROUGE-L on the other records)."""
    _, tuned = study.teacher()
    rows, models = [], [tuned]
    for keep, lr in PILOT:
        pruned = study.work / f"pruned-{keep}"
        if not (pruned / "config.json").exists():
            run("prune", "--teacher", tuned, "--keep-layers", keep, "--out", pruned)
        out = study.work / "pilot" / f"sft-{keep}-{lr:g}"
        run("train", "--data", study.train, "--loss", "sft", "--student", pruned, "--max-steps", study.p.steps,
            "--lr", lr, "--batch-size", study.p.batch_size, *LENGTHS, "--checkpoint-every", "25", "--resume",
            "--out", out, *study.device)
        models += [pruned, out]
    evaluation = study.evaluate(sorted(set(models), key=models.index), study.dev_other, study.p.other_seeds, "pilot")
    for model in sorted(set(models), key=models.index):
        rows.append([Path(str(model)).name, f"{rouge_of(evaluation, str(model)):.2f}", f"{study.nll(model)['nll']:.3f}"])
    report("quality_pilot", "The student choice: SFT students after the same steps (Dolly dev)",
           ["model", f"ROUGE-L ({study.p.other_records} prompts)", f"NLL ({study.p.nll_records} records)"], rows,
           asdict(study.p) | {"candidates": PILOT})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--pilot", action="store_true", help="train and compare the candidate students only")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    study = Study(preset, args.work or REPO / f"study-{args.preset}")
    if args.pilot:
        pilot(study)
        return
    started = time.perf_counter()
    original, tuned = study.teacher()
    cache, pruned = study.cache_and_student(tuned)
    students = {name: [study.train_student(cache, pruned, name, flags, s) for s in preset.train_seeds]
                for name, flags in MAIN.items()}
    students |= {name: [study.train_student(cache, pruned, name, flags, 0)] for name, flags in OTHERS.items()}
    teachers = {"teacher (instruct)": original, "teacher (SFT on Dolly)": tuned}
    evals = {"reference": study.evaluate([original, tuned, pruned], study.dev_other, preset.other_seeds, "reference"),
             "main": study.evaluate([p for n in MAIN for p in students[n]], study.dev_main, preset.main_seeds, "main"),
             "other": study.evaluate([students["srkl"][0], *[students[n][0] for n in OTHERS]], study.dev_other,
                                     preset.other_seeds, "other")}
    nll = {str(m): study.nll(m) for m in [original, tuned, pruned, *[p for n in MAIN for p in students[n]]]}
    rows, figures = table(study, {k: str(v) for k, v in teachers.items()}, pruned, students, evals, nll)
    report(f"quality_{args.preset}", "Does MTA help? ROUGE-L on held-out Dolly dev (x100)",
           ["model", "training seeds", "ROUGE-L (mean ± std over training seeds)", "Δ vs srkl [95% CI]",
            f"NLL ({preset.nll_records} dev records)"], rows,
           asdict(preset) | {"wall_minutes": round((time.perf_counter() - started) / 60, 1)}, {"figures": figures})


if __name__ == "__main__":
    main()
