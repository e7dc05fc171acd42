"""One round of each of the paper's three bases, with and without MTA, on the real teacher.

SmolLM2-135M-Instruct teaches its 8-layer depth-pruned copy on the first `--records` Dolly train records
(max length 256). One round: the untrained student and the teacher answer the training prompts (`mta
generate`, 64 new tokens), the teacher is extracted on the dataset's responses and on both kinds of
generated answers, then each configuration trains `--steps` steps (batch 8) from the same student in its
own process: srkl (the reference), FDD, DistiLLM (its recipe, adaptive share of the student's answers
against a dev cache), DistiLLM-2 (teacher's vs student's answers), each with and without `--mta`. Reports
the median step time, the peak memory (VmHWM of the training process) and the loss curves.

    .venv/bin/python -m benchmarks.bases_round [--records 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from benchmarks.common import WORK, dolly_subset, peak_rss_mib, report, teacher_folder
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.generation import GenerateConfig, generate_records

LENGTHS = dict(max_length=256, max_prompt_length=128)


def configurations(base: str, dev: str, teacher_gen: str, student_gen: str) -> dict[str, list[str]]:
    """name -> `mta train` options (the student and output are added per run)."""
    distillm = ["--recipe", "distillm", "--cache", base, "--cache", student_gen, "--student-data", "adaptive",
                "--dev-cache", dev, "--eval-every", "5"]
    distillm2 = ["--loss", "distillm2", "--cache", teacher_gen, "--cache", student_gen]
    plain = {"srkl": ["--loss", "srkl", "--cache", base], "fdd": ["--loss", "fdd", "--cache", base],
             "distillm": distillm, "distillm2": distillm2}
    return {f"{name}{suffix}": options + extra for name, options in plain.items()
            for suffix, extra in (("", []), (" --mta", ["--mta"]))}


def train_child(student: str, out: str, options: list[str], steps: int) -> None:
    """Train in this process and print its peak RSS (MiB) as JSON."""
    from mta_cli.cli import app

    shutil.rmtree(out, ignore_errors=True)
    try:
        app(["train", "--student", student, "--out", out, "--max-steps", str(steps), "--batch-size", "8",
             "--checkpoint-every", "0", *options])
    except SystemExit as e:
        if e.code:
            raise
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        student, out, steps, options = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
        train_child(student, out, options, steps)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    teacher = str(teacher_folder())
    data, dev = str(dolly_subset("train", args.records)), str(dolly_subset("dev", 32))
    work = WORK / f"bases-{args.records}"
    work.mkdir(parents=True, exist_ok=True)

    student = work / "pruned-8"
    if not (student / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mta_cli", "prune", "--teacher", teacher, "--keep-layers", "8",
                        "--out", str(student)], check=True)
    caches = {}
    for name, model in (("student", str(student)), ("teacher", teacher)):
        generated = work / f"{name}-answers.jsonl"
        generate_records(GenerateConfig(model=model, data=data, out=str(generated), max_new_tokens=64))
        caches[name] = extract_once(teacher, str(generated), work / f"{name}-answers.zarr")
    base = extract_once(teacher, data, work / "data.zarr")
    dev_cache = extract_once(teacher, dev, work / "dev.zarr")

    rows, curves = [], {}
    for name, options in configurations(base, dev_cache, caches["teacher"], caches["student"]).items():
        out = work / "runs" / name.replace(" --", "-")
        done = subprocess.run([sys.executable, "-m", "benchmarks.bases_round", "--train-child", str(student), str(out),
                               str(args.steps), json.dumps(options)], check=True, capture_output=True, text=True)
        peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [{k: v for k, v in s.items() if k not in ("epoch", "tokens", "tokens_per_second")} for s in steps]
        seconds = statistics.median(s["step_seconds"] for s in steps[1:])
        rows.append([name, seconds, round(peak), steps[0]["loss"], steps[-1]["loss"]])
    reference = {r[0]: r for r in rows}
    for row in rows:
        srkl = reference["srkl --mta" if row[0].endswith("--mta") else "srkl"]
        row += [row[1] / srkl[1], row[2] / srkl[2]]
    report("bases_round", "One round of each base (+ MTA) beside srkl: step time, peak memory, loss",
           ["configuration", "s/step (median)", "peak MiB", "first loss", "last loss", "s/step / srkl",
            "peak / srkl"], rows,
           {"teacher": "SmolLM2-135M-Instruct (30 layers)", "student": "depth-pruned copy, 8 layers",
            "records": args.records, "steps": args.steps, "batch_size": 8, "max_length": 256,
            "generated": "64 new tokens, seed 10, by the untrained student and by the teacher"},
           {"curves": curves})


def extract_once(teacher: str, data: str, out) -> str:
    extract(ExtractConfig(teacher=teacher, data=data, out=str(out), **LENGTHS))
    return str(out)


if __name__ == "__main__":
    main()
