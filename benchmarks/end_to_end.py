"""Benchmark 5 — end to end: extract once + N epochs offline, against N epochs online.

Both sides train the same 8-layer student with `srkl --mta`, batch 8, max length 256, on the same
records; wall time of each side (the commands, as a user runs them). The issue's setting is 512
records and 3 epochs; `--records`/`--epochs` scale it.

    .venv/bin/python -m benchmarks.end_to_end [--records 512] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

from benchmarks.common import REPO, WORK, dolly_subset, report, teacher_folder

MTA = str(REPO / ".venv" / "bin" / "mta")


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    cache, offline, online = WORK / "e2e.zarr", WORK / "e2e-offline", WORK / "e2e-online"
    for path in (cache, offline, online):
        shutil.rmtree(path, ignore_errors=True)
    train = ["--init-from-teacher", "--keep-layers", "8", "--loss", "srkl", "--mta", "--epochs", str(args.epochs),
             "--batch-size", "8", "--checkpoint-every", "0"]
    lengths = ["--max-length", "256", "--max-prompt-length", "128"]
    extract_s = timed([MTA, "extract", "--teacher", teacher, "--data", data, "--out", str(cache), *lengths])
    offline_s = timed([MTA, "train", "--cache", str(cache), "--out", str(offline), *train])
    online_s = timed([MTA, "train", "--teacher", teacher, "--data", data, "--out", str(online), *train, *lengths])
    rows = [["extract once", extract_s, ""], [f"train {args.epochs} epochs offline", offline_s, ""],
            ["extract + offline", extract_s + offline_s, (extract_s + offline_s) / online_s],
            [f"train {args.epochs} epochs online", online_s, 1.0]]
    report("end_to_end", f"End to end: {args.records} records, {args.epochs} epochs, srkl --mta",
           ["", "wall s", "x online"], rows,
           {"records": args.records, "epochs": args.epochs, "student": "8-layer pruned SmolLM2", "batch_size": 8,
            "max_length": 256}, {"speedup": online_s / (extract_s + offline_s)})


if __name__ == "__main__":
    main()
