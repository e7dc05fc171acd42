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
import contextlib
import json
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import DOLLY, REPO, report, teacher_gguf
from mta_cli.paired import interval

MTA = [sys.executable, "-m", "mta_cli"]
RECIPES = REPO / "examples" / "recipes"


@dataclass(frozen=True)
class Preset:
    """The study's structure; each command's options (lengths, steps, lr, batch, device, new tokens) are in
    examples/recipes/quality-<preset>.toml, the variants' objectives in one recipe each."""

    train_records: int          # Dolly train records: the teacher's fine-tuning and the distillation data
    teacher_steps: int          # stage 0: SFT steps of the teacher
    teacher_lr: float
    keep_layers: int            # the student: this many of the fine-tuned teacher's layers, evenly spaced
    train_seeds: tuple[int, ...]
    main_records: int           # dev prompts for the three-seed rows
    main_seeds: tuple[int, ...]
    other_records: int          # dev prompts for the one-seed rows and the λ sweep
    other_seeds: tuple[int, ...]
    nll_records: int
    others: tuple[str, ...]     # the one-seed rows (names of OTHERS)


MAIN = {"sft": "sft", "srkl": "srkl", "srkl+mta": "srkl-mta"}                 # row -> recipe
OTHERS = {"fkl": "fkl", "srkl+dsa": "srkl-dsa", "srkl+hid": "srkl-hid", "distillm": "distillm",
          "distillm+mta": "distillm-mta", "srkl+mta dsa=0.5": "srkl-mta-dsa-0.5", "srkl+mta dsa=8": "srkl-mta-dsa-8",
          "srkl+mta hid=0.05": "srkl-mta-hid-0.05", "srkl+mta hid=0.8": "srkl-mta-hid-0.8",
          "srkl+mta group": "srkl-mta-group"}
# The rows: fkl, DSA only, Hid only and the λ sweep; the CPU preset leaves DistiLLM ± MTA and the
# group weighting out to fit its time.
REQUIRED_OTHERS = ("fkl", "srkl+dsa", "srkl+hid", "srkl+mta dsa=0.5", "srkl+mta dsa=8", "srkl+mta hid=0.05",
                   "srkl+mta hid=0.8")

PRESETS = {
    "cpu": Preset(train_records=1000, teacher_steps=50, teacher_lr=2e-5, keep_layers=10, train_seeds=(0, 1, 2),
                  main_records=200, main_seeds=(10, 20, 30), other_records=100, other_seeds=(10,), nll_records=1000,
                  others=REQUIRED_OTHERS),
    "gpu": Preset(train_records=2623, teacher_steps=600, teacher_lr=2e-5, keep_layers=12, train_seeds=(0, 1, 2),
                  main_records=500, main_seeds=(10, 20, 30, 40, 50), other_records=500, other_seeds=(10, 20, 30),
                  nll_records=1000, others=tuple(OTHERS)),
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
    def __init__(self, preset: Preset, work: Path, name: str):
        self.p, self.work = preset, work
        self.config = ["--config", str(RECIPES / f"quality-{name}.toml")]
        self.options = tomllib.loads((RECIPES / f"quality-{name}.toml").read_text())
        work.mkdir(parents=True, exist_ok=True)
        self.train = first_lines(DOLLY / "train.jsonl", preset.train_records, work / "train.jsonl")
        self.dev_main = first_lines(DOLLY / "dev.jsonl", preset.main_records, work / "dev-main.jsonl")
        self.dev_other = first_lines(DOLLY / "dev.jsonl", preset.other_records, work / "dev-other.jsonl")
        self.dev_nll = first_lines(DOLLY / "dev.jsonl", preset.nll_records, work / "dev-nll.jsonl")
        self.timings = work / "timings.json"

    @contextlib.contextmanager
    def stage(self, name: str):
        """Add the wall time of the block to `name` in work/timings.json (summed over interrupted runs)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = json.loads(self.timings.read_text()) if self.timings.exists() else {}
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 1)
            self.timings.write_text(json.dumps(seconds, indent=1))

    def wall_minutes(self) -> dict[str, float]:
        seconds = json.loads(self.timings.read_text()) if self.timings.exists() else {}
        return {name: round(value / 60, 1) for name, value in seconds.items()} | {
            "total": round(sum(seconds.values()) / 60, 1)}

    def teacher(self) -> tuple[str, Path]:
        """Stage 0: the instruct teacher and its SFT on Dolly train."""
        original = str(teacher_gguf())
        tuned = self.work / "teacher-sft"
        run("train", *self.config, "--data", self.train, "--loss", "sft", "--teacher", original,
            "--init-from-teacher", "--keep-layers", "30", "--max-steps", self.p.teacher_steps, "--lr",
            self.p.teacher_lr, *self.lengths, "--out", tuned)
        return original, tuned

    def cache_and_student(self, teacher: Path) -> tuple[Path, Path]:
        cache = self.work / "cache.zarr"
        run("extract", *self.config, "--teacher", teacher, "--data", self.train, "--out", cache)
        pruned = self.work / f"pruned-{self.p.keep_layers}"
        if not (pruned / "config.json").exists():
            run("prune", "--teacher", teacher, "--keep-layers", self.p.keep_layers, "--out", pruned)
        return cache, pruned

    @property
    def lengths(self) -> list[str]:
        """The extraction's lengths, for training on --data."""
        extract = self.options["extract"]
        return ["--max-length", str(extract["max-length"]), "--max-prompt-length", str(extract["max-prompt-length"])]

    def train_student(self, cache: Path, pruned: Path, name: str, recipe: str, seed: int) -> Path:
        out = self.work / "students" / f"{slug(name)}-s{seed}"
        run("train", *self.config, "--config", str(RECIPES / f"{recipe}.toml"), "--cache", cache, "--student", pruned,
            "--seed", seed, "--out", out)
        return out

    def evaluate(self, models: dict[str, Path | str], data: Path, seeds: tuple[int, ...], name: str) -> dict:
        """`mta eval` of `models` (label -> path; kept once done: re-running reads the file)."""
        out = self.work / f"eval-{name}.json"
        if not out.exists():
            partial = out.with_suffix(".partial.json")
            run("eval", *self.config, *[a for label, m in models.items() for a in ("--model", f"{label}={m}")],
                "--data", data, "--seeds", ",".join(map(str, seeds)), "--json", partial, "--generations",
                partial.with_suffix(".jsonl"))
            partial.rename(out)
        return json.loads(out.read_text())

    def nll(self, model: Path | str) -> dict:
        """Reference NLL of `model` on the NLL dev records: token mean and per record (kept once done)."""
        out = self.work / "nll" / f"{slug(Path(str(model)).name)}.json"
        if not out.exists():
            from mta_cli.evaluation import reference_nll
            from mta_cli.models import load_causal_lm, load_tokenizer
            from mta_cli.records import load_records

            extract, evaluate = self.options["extract"], self.options["eval"]
            tokenizer = load_tokenizer(str(model))
            figures = reference_nll(load_causal_lm(str(model), device=evaluate["device"]), tokenizer,
                                    load_records(self.dev_nll, tokenizer=tokenizer).records,
                                    batch_size=evaluate["batch-size"], max_length=extract["max-length"],
                                    max_prompt_length=extract["max-prompt-length"])
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({"nll": figures.nll, "per_record": figures.per_record}))
        return json.loads(out.read_text())


# --- statistics --------------------------------------------------------------------------------------------


def entry(evaluation: dict, label: str) -> dict:
    return next(m for m in evaluation["models"] if m["name"] == label)


def per_prompt(evaluation: dict, label: str) -> np.ndarray:
    """ROUGE-L per prompt (mean over the sampling seeds) of the model `label` in an eval JSON: [n_prompts]."""
    entry_ = entry(evaluation, label)
    seeds = entry_["files"][0]["rougeL_per_record"]
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
    low, high = interval(replicates)
    return float(diffs.mean()), low, high


def eval_size(evaluation: dict, label: str) -> str:
    """"prompts x sampling seeds" of the model `label` in an eval JSON."""
    seeds = entry(evaluation, label)["files"][0]["rougeL_per_record"]
    return f"{len(next(iter(seeds.values())))} x {len(seeds)}"


def rouge_of(evaluation: dict, label: str) -> float:
    return entry(evaluation, label)["average"]["rougeL_mean"]


def table(students: dict[str, list[Path]], evals: dict, nll: dict) -> tuple[list, dict]:
    """Rows: model, training seeds, prompts x sampling seeds, ROUGE-L mean ± std over training seeds, Δ vs srkl
    [95% CI], NLL (models missing from `nll`: not yet computed)."""
    rows, figures = [], {}
    for label in REFERENCE:
        score = rouge_of(evals["reference"], label)
        figures[label] = {"rougeL": score, "nll": nll[label]["nll"] if label in nll else None, "eval": "reference"}
        rows.append([label, "-", eval_size(evals["reference"], label), f"{score:.2f}", "-",
                     "-" if figures[label]["nll"] is None else f"{figures[label]['nll']:.3f}"])
    srkl = labels("srkl", students["srkl"])
    for name, paths in students.items():
        main = name in MAIN
        evaluation, own = evals["main" if main else "other"], labels(name, paths)
        scores = [rouge_of(evaluation, label) for label in own]
        delta = None if name == "srkl" else paired_interval([per_prompt(evaluation, label) for label in own],
                                                            [per_prompt(evaluation, b) for b in srkl[:len(own)]])
        nlls = [nll[label]["nll"] for label in own] if main and all(label in nll for label in own) else None
        rows.append([name, len(own), eval_size(evaluation, own[0]), mean_spread(scores, 2),
                     "-" if delta is None else f"{delta[0]:+.2f} [{delta[1]:+.2f}, {delta[2]:+.2f}]",
                     "-" if nlls is None else mean_spread(nlls, 3)])
        figures[name] = {"rougeL_per_seed": scores, "nll_per_seed": nlls, "eval": "main" if main else "other",
                         "delta_vs_srkl": None if delta is None else dict(zip(("mean", "low", "high"), delta))}
    return rows, figures


def mean_spread(values: list[float], digits: int) -> str:
    spread = f" ± {statistics.pstdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"


def labels(name: str, paths: list[Path]) -> list[str]:
    """The eval labels of a row's students: its name and training seed."""
    return [f"{slug(name)}-s{Path(p).name.rsplit('-s', 1)[1]}" for p in paths]


REFERENCE = ("teacher (instruct)", "teacher (SFT on Dolly)", "pruned (untrained)")
PILOT = [(8, 5e-4), (10, 5e-4), (15, 5e-4), (10, 2e-4), (10, 1e-3)]  # (kept layers, lr) of SFT students


def pilot(study: Study) -> None:
    """The student choice: SFT students of several sizes and learning rates, the study's steps each, against the
    untrained pruned copies and the fine-tuned teacher (NLL on the NLL records, ROUGE-L on the other records).

    Each candidate trains exactly as the study's SFT row (same cache, seed 0), so the study's own choice is its
    SFT seed-0 student, reused when it exists."""
    _, tuned = study.teacher()
    cache, _ = study.cache_and_student(tuned)
    models = {"teacher-sft": tuned}
    for keep, lr in PILOT:
        pruned = study.work / f"pruned-{keep}"
        if not (pruned / "config.json").exists():
            run("prune", "--teacher", tuned, "--keep-layers", keep, "--out", pruned)
        if (keep, lr) == (study.p.keep_layers, study.options["train"]["lr"]):
            out = study.train_student(cache, pruned, "sft", MAIN["sft"], 0)
        else:
            out = study.work / "pilot" / f"sft-{keep}-{lr:g}"
            run("train", *study.config, "--config", str(RECIPES / "sft.toml"), "--cache", cache, "--student", pruned,
                "--lr", lr, "--seed", 0, "--out", out)
        models |= {pruned.name: pruned, f"sft-{keep}-{lr:g}": out}
    evaluation = study.evaluate(models, study.dev_other, study.p.other_seeds, "pilot")
    rows = [[label, f"{rouge_of(evaluation, label):.2f}", f"{study.nll(path)['nll']:.3f}"]
            for label, path in models.items()]
    report("quality_pilot", "The student choice: SFT students after the same steps (Dolly dev)",
           ["model", f"ROUGE-L ({study.p.other_records} prompts)", f"NLL ({study.p.nll_records} records)"], rows,
           asdict(study.p) | {"candidates": PILOT, "steps": study.options["train"]["max-steps"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--pilot", action="store_true", help="train and compare the candidate students only")
    parser.add_argument("--main-only", action="store_true",
                        help="the three-seed rows only (SFT, srkl, srkl + MTA) and the reference rows; a later run "
                             "without it adds the others")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    study = Study(preset, args.work or REPO / f"study-{args.preset}", args.preset)
    if args.pilot:
        pilot(study)
        return
    with study.stage("teacher SFT"):
        original, tuned = study.teacher()
    with study.stage("extraction and pruning"):
        cache, pruned = study.cache_and_student(tuned)
    with study.stage("students (three-seed rows)"):
        students = {name: [study.train_student(cache, pruned, name, recipe, s) for s in preset.train_seeds]
                    for name, recipe in MAIN.items()}
    others = {} if args.main_only else {name: OTHERS[name] for name in preset.others}
    with study.stage("students (one-seed rows)"):
        students |= {name: [study.train_student(cache, pruned, name, recipe, 0)] for name, recipe in others.items()}
    reference = dict(zip(REFERENCE, (original, tuned, pruned)))
    main_rows = {label: path for name in MAIN for label, path in zip(labels(name, students[name]), students[name])}
    other_rows = {label: students[name][0] for name in ("srkl", *others) for label in labels(name, students[name][:1])}
    with study.stage("evaluation (three-seed rows)"):
        evals = {"main": study.evaluate(main_rows, study.dev_main, preset.main_seeds, "main")}
    with study.stage("evaluation (reference rows)"):
        evals["reference"] = study.evaluate(reference, study.dev_other, preset.other_seeds, "reference")
    if others:
        with study.stage("evaluation (one-seed rows)"):
            evals["other"] = study.evaluate(other_rows, study.dev_other, preset.other_seeds, "other")

    def publish(nll: dict) -> None:
        rows, figures = table(students, evals, nll)
        report(f"quality_{args.preset}", "Does MTA help? ROUGE-L on held-out Dolly dev (x100)",
               ["model", "training seeds", "dev prompts x sampling seeds",
                "ROUGE-L (mean ± std over training seeds)", "Δ vs srkl [95% CI]",
                f"NLL ({preset.nll_records} dev records)"], rows,
               asdict(preset) | study.options | {"wall_minutes": study.wall_minutes(),
                                                 "rows": "main only" if args.main_only else "all"},
               {"figures": figures})

    publish({})  # the ROUGE-L figures first: the reference NLL of every model takes a while
    with study.stage("reference NLL"):
        nll = {label: study.nll(path) for label, path in main_rows.items()}
        publish(nll)
        nll |= {label: study.nll(path) for label, path in reference.items()}
    publish(nll)
    run("report", *[p for paths in students.values() for p in paths],
        *[study.work / f"eval-{name}.json" for name in evals if name != "reference"], cache,
        "--title", f"Quality study ({args.preset})", "--out", study.work / "report.html")


if __name__ == "__main__":
    main()
