"""Benchmark 5 — end to end, as users run it: one extraction and N students offline, against N online runs.

A paper's table trains several variants from one teacher; the cache pays the teacher forward and spaCy
once, an online run pays them at every step of every student. Six KD students (the quality study's
variants: fkl, srkl, srkl + MTA, srkl + DSA only, srkl + Hid only, srkl + MTA with λ_DSA 8; SFT is left
out, it needs no teacher either way) are trained one after another, each command as a user runs it, for
two teacher/student cost ratios:

- "pruned 8": the teacher's depth-pruned 8-layer copy (the study's kind of student),
- "small 4 x 256": a random-init 4-layer, 256-wide student with the teacher's tokenizer (--student-config).

Offline = `mta extract` once + the six `mta train --cache` runs; online = the six `mta train --teacher
--data` runs, same student, records, batches and steps. Each run trains 2 epochs over the records (the papers
train 5, method.md §8): online, every epoch runs the teacher again; offline, the extraction serves them all.
The 1-student figure is the first student's runs (srkl + MTA) with the whole extraction. Every figure is split
into its parts: extraction, each run's start (imports, loading models and spaCy) and its steps (from its
metrics.jsonl).

    .venv/bin/python -m benchmarks.end_to_end [--records 48] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, WORK, dolly_subset, report, teacher_folder

MTA = str(REPO / ".venv" / "bin" / "mta")
RECIPES = REPO / "examples" / "recipes"
VARIANTS = ["srkl-mta", "fkl", "srkl", "srkl-dsa", "srkl-hid", "srkl-mta-dsa-8"]  # recipes; the first is "1 student"
SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 49152,
         "max_position_embeddings": 2048, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
LENGTHS = ["--max-length", "256", "--max-prompt-length", "128"]


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def step_seconds(run: Path) -> float:
    """Sum of the step times a run logged in its metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("step_seconds", 0.0) for line in lines if line.strip())


def train_runs(student: list[str], source: list[str], folder: Path, epochs: int) -> list[dict]:
    """The six variants, one `mta train` each: wall seconds, of which steps (the rest: start-up and saving)."""
    runs = []
    for variant in VARIANTS:
        out = folder / variant
        wall = timed([MTA, "train", "--config", str(RECIPES / f"{variant}.toml"), *student, *source,
                      "--batch-size", "8", "--epochs", str(epochs), "--checkpoint-every", "0", "--out", str(out)])
        runs.append({"variant": variant, "wall_s": wall, "steps_s": step_seconds(out)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=48, help="Dolly train records (batches of 8)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every student run")
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    work = WORK / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pruned, small = work / "pruned-8", work / "small.json"
    subprocess.run([MTA, "prune", "--teacher", teacher, "--keep-layers", "8", "--out", str(pruned)], check=True,
                   stdout=subprocess.DEVNULL)
    small.write_text(json.dumps(SMALL))
    cache = work / "cache.zarr"
    extract_s = timed([MTA, "extract", "--teacher", teacher, "--data", data, "--out", str(cache), *LENGTHS])

    students = {"pruned 8": ["--student", str(pruned)],
                "small 4 x 256": ["--student-config", str(small)]}
    rows, runs = [], {}
    for name, student in students.items():
        offline = train_runs(student, ["--cache", str(cache)], work / name / "offline", args.epochs)
        online = train_runs(student, ["--teacher", teacher, "--data", data, *LENGTHS], work / name / "online",
                            args.epochs)
        runs[name] = {"offline": offline, "online": online}
        for n in (1, len(VARIANTS)):
            off = extract_s + sum(r["wall_s"] for r in offline[:n])
            on = sum(r["wall_s"] for r in online[:n])
            off_steps, on_steps = (sum(r["steps_s"] for r in side[:n]) for side in (offline, online))
            rows.append([name, n, round(extract_s, 1), round(off_steps, 1), round(off - extract_s - off_steps, 1),
                         round(off, 1), round(on_steps, 1), round(on - on_steps, 1), round(on, 1), off / on])
    report("end_to_end", f"End to end: extract once + N students offline vs N students online "
                         f"({args.records} records, {args.epochs} epochs, batch 8)",
           ["student", "students", "extract s", "offline steps s", "offline start-up s", "offline total s",
            "online steps s", "online start-up s", "online total s", "offline / online (target <= 0.70 at 6, pruned 8)"],
           rows, {"records": args.records, "epochs": args.epochs, "batch_size": 8, "max_length": 256,
                  "variants": VARIANTS, "small_student": SMALL},
           {"runs": runs, "extract_s": extract_s, **parts_from_train_step()})


def parts_from_train_step() -> dict:
    """The per-step parts `make bench-train` timed (teacher forward, spaCy, head matmul), when it has run."""
    path = RESULTS / "train_step.json"
    return {"train_step_parts": json.loads(path.read_text()).get("parts_seconds")} if path.exists() else {}


if __name__ == "__main__":
    main()
