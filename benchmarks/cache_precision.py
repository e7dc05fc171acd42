"""Benchmark 7 — a smaller cache that trains the same: int8 key layers against the bf16 cache.

Four caches of the same records from the real teacher: bf16 (the default), mixed (`--key-dtype int8`: the
last layer, which feeds the exact logits, in bf16, the other key layers in int8), all int8 (`--dtype
int8`) and fp32. The same student (the teacher's 8-layer pruned copy) trains `srkl --mta` from each with
the same seed, hence the same batches and projector initialisation. For every loss component the table
gives the largest per-step difference from the bf16 run, against two yardsticks measured the same way:

- run-to-run noise: the bf16 run again with one intra-op thread instead of two. CPU runs are
  deterministic for a given thread count; another thread count changes the order of float reductions,
  which is the noise two runs of one job see across machines and GPU kernels;
- the precision bf16 already costs: the fp32 cache against the bf16 one.

Each student is then evaluated with `mta eval --cache` against the bf16 cache: DSA and linear CKA per
key-layer pair. Not part of `make bench` (about 10 minutes): `make bench-precision`.

    .venv/bin/python -m benchmarks.cache_precision [--records 160] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

from benchmarks.common import REPO, WORK, dolly_subset, report, teacher_folder

MTA = str(REPO / ".venv" / "bin" / "mta")
CACHES = {"bf16": ["--dtype", "bf16"], "mixed": ["--dtype", "bf16", "--key-dtype", "int8"],
          "int8": ["--dtype", "int8"], "fp32": ["--dtype", "fp32"]}
COMPONENTS = ("loss", "ce", "kd", "dsa", "hid")


def mta(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    subprocess.run([MTA, *map(str, args)], check=True, stdout=subprocess.DEVNULL, env=env)


def curve(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in line]


def max_difference(a: list[dict], b: list[dict], key: str) -> float:
    assert [x["step"] for x in a] == [x["step"] for x in b], "the two runs must log the same steps"
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    work = WORK / "precision"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pruned = work / "pruned-8"
    mta("prune", "--teacher", teacher, "--keep-layers", "8", "--out", pruned)
    caches = {}
    for name, options in CACHES.items():
        caches[name] = work / f"{name}.zarr"
        mta("extract", "--teacher", teacher, "--data", data, "--out", caches[name], "--max-length", "256",
            "--max-prompt-length", "128", *options)
    runs = {name: work / "runs" / name for name in CACHES} | {"bf16, 1 thread": work / "runs" / "bf16-1-thread"}
    for name, run in runs.items():
        mta("train", "--config", REPO / "examples" / "recipes" / "srkl-mta.toml", "--cache",
            caches[name.split(",")[0]], "--student", pruned, "--max-steps", args.steps, "--batch-size", 8,
            "--checkpoint-every", 0, "--seed", 0, "--out", run, threads=1 if "thread" in name else None)
    curves = {name: curve(run) for name, run in runs.items()}
    evaluation = work / "eval.json"
    mta("eval", *[a for name, run in runs.items() for a in ("--model", f"{name}={run}")], "--data", data,
        "--max-records", 8, "--seeds", 10, "--max-new-tokens", 1, "--cache", caches["bf16"], "--cache-samples", 32,
        "--json", evaluation)
    trajectory = {m["name"]: m["trajectory"] for m in json.loads(evaluation.read_text())["models"]}

    rows = []
    for name in ("bf16, 1 thread", "fp32", "mixed", "int8"):
        differences = [max_difference(curves[name], curves["bf16"], key) for key in COMPONENTS]
        dsa = max(abs(a["dsa"] - b["dsa"]) for a, b in zip(trajectory[name], trajectory["bf16"]))
        cka = max(abs(a["cka"] - b["cka"]) for a, b in zip(trajectory[name], trajectory["bf16"]))
        rows.append([name, *differences, dsa, cka])
    report("cache_precision", f"Training from smaller caches: largest per-step difference from the bf16 cache's run "
                              f"(srkl --mta, {args.steps} steps, same batches)",
           ["run", *[f"max |Δ {key}|" for key in COMPONENTS], "max |Δ DSA| at eval", "max |Δ CKA| at eval"], rows,
           {"records": args.records, "steps": args.steps, "batch_size": 8, "student": "8-layer pruned copy",
            "eval_cache_samples": 32},
           {"curves": curves, "trajectory": trajectory,
            "final": {name: {key: c[-1][key] for key in COMPONENTS} for name, c in curves.items()}})


if __name__ == "__main__":
    main()
