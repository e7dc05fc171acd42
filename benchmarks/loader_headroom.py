"""Benchmark 4 — loader headroom.

Samples/s that the cache loader delivers (shard reads, bf16 decode, collation into padded batches,
layers 15/22/30 as `srkl --mta` needs them) divided by the samples/s a training step consumes
(offline `srkl --mta`, 8-layer student, batch 8). Target: at least 10x, so the step never waits.

    .venv/bin/python -m benchmarks.loader_headroom [--records 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

from benchmarks.common import WORK, dolly_subset, report, teacher_folder
from mta_cli.cache.reader import CacheReader
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.training.batches import CacheBatches
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    cache = WORK / f"loader-{args.records}.zarr"
    extract(ExtractConfig(teacher=teacher, data=data, out=str(cache), max_length=256, max_prompt_length=128,
                          shard_size=64))
    reader = CacheReader(str(cache))
    rates = {}
    for prefetch in (False, True):
        loader = CacheBatches(reader, 8, [15, 22, 30], seed=0, pad_id=0, prefetch=prefetch)
        started = time.perf_counter()
        samples = sum(len(b.sample_indices) for b in loader.iterate(0))
        rates[prefetch] = samples / (time.perf_counter() - started)
    out = WORK / "headroom-run"
    shutil.rmtree(out, ignore_errors=True)
    train(TrainConfig(out=str(out), cache=str(cache), init_from_teacher=True, keep_layers=8,
                      objective=ObjectiveConfig(loss="srkl", mta=True), max_steps=args.steps, batch_size=8,
                      checkpoint_every=0))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    step_rate = 8 / statistics.median(s["step_seconds"] for s in steps)
    rows = [["loader, one thread (read + decode + collate)", rates[False], rates[False] / step_rate],
            ["loader, background prefetch", rates[True], rates[True] / step_rate],
            ["training step, srkl --mta (consumes)", step_rate, 1.0]]
    report("loader_headroom", "Loader headroom: samples/s delivered vs consumed",
           ["", "samples/s", "x training step (target >= 10)"], rows,
           {"records": args.records, "shard_size": 64, "layers": "15,22,30 bf16", "batch_size": 8,
            "student": "8-layer pruned SmolLM2", "max_length": 256},
           {"headroom": rates[False] / step_rate})


if __name__ == "__main__":
    main()
