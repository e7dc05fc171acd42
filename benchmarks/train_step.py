"""Benchmark 3 — offline vs online training step.

Step time and peak memory of `mta train --cache` against the online baseline (`--teacher --data`:
teacher forward and spaCy every step), for `--loss sft`, `--loss srkl` and `--loss srkl --mta`.
Each run is a separate process (its own peak RSS); the step time is the median over the steps after
the first. The offline/online ratio of `srkl --mta` is then explained from its parts, each timed
alone on a typical batch: student step, teacher forward, teacher head matmul, spaCy, cache read.

    .venv/bin/python -m benchmarks.train_step [--records 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import WORK, dolly_subset, peak_rss_mib, report, teacher_folder
from mta_cli.extract import ExtractConfig, extract

LOSSES = [("sft", "sft", False), ("srkl", "srkl", False), ("srkl --mta", "srkl", True)]


def child(mode: str, loss: str, mta: bool, steps: int, cache: str, data: str, teacher: str) -> None:
    """One training run in this process; prints {"step_s", "tokens_per_step", "peak_rss_mib"} as JSON."""
    from mta_cli.train.objective import ObjectiveConfig
    from mta_cli.train.trainer import TrainConfig, train

    out = WORK / f"step-{mode}-{loss}-{int(mta)}"
    shutil.rmtree(out, ignore_errors=True)
    source = {"cache": cache} if mode == "offline" else {"teacher": teacher, "data": data}
    train(TrainConfig(out=str(out), init_from_teacher=True, keep_layers=8, objective=ObjectiveConfig(loss=loss, mta=mta),
                      max_steps=steps, batch_size=8, checkpoint_every=0, max_length=256, max_prompt_length=128,
                      **source))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"step_s": statistics.median(r["step_seconds"] for r in rows[1:]),
                      "tokens_per_step": statistics.mean(r["tokens"] for r in rows[1:]),
                      "peak_rss_mib": peak_rss_mib()}))


def run(mode: str, loss: str, mta: bool, steps: int, cache: str, data: str, teacher: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--child", mode, loss, str(int(mta)), str(steps), cache, data,
           teacher]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parts(cache: str, teacher: str) -> dict:
    """Seconds of each piece of one step, timed alone on a typical cached batch of 8."""
    from mta_cli.cache.reader import CacheReader
    from mta_cli.models import load_causal_lm
    from mta_cli.segment import Segmenter
    from mta_cli.teacher import output_head, teacher_forward
    from mta_cli.train.batches import CacheBatches

    reader = CacheReader(cache)
    loader = CacheBatches(reader, 8, [15, 22, 30], seed=0, pad_id=0, prefetch=False)
    started = time.perf_counter()
    batches = list(loader.iterate(0))
    read_s = (time.perf_counter() - started) / len(batches)
    batch = sorted(batches, key=lambda b: b.n_tokens)[len(batches) // 2]
    model = load_causal_lm(teacher)
    teacher_forward(model, batch.input_ids, batch.attention_mask, [15, 22, 30])  # warm-up
    started = time.perf_counter()
    teacher_forward(model, batch.input_ids, batch.attention_mask, [15, 22, 30])
    forward_s = time.perf_counter() - started
    head = output_head(model)
    targets = batch.labels != -100
    started = time.perf_counter()
    with torch.no_grad():
        head(batch.teacher_states[30][targets])
    head_s = time.perf_counter() - started
    segmenter = Segmenter()
    texts = [reader[i].text for i in batch.sample_indices]
    list(segmenter(texts))
    started = time.perf_counter()
    list(segmenter(texts))
    parse_s = time.perf_counter() - started
    return {"tokens": batch.n_tokens, "teacher_forward_s": forward_s, "teacher_head_matmul_s": head_s,
            "spacy_s": parse_s, "cache_read_s": read_s}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, loss, mta, steps, cache, data, teacher = sys.argv[2:9]
        child(mode, loss, mta == "1", int(steps), cache, data, teacher)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    cache = WORK / f"train-{args.records}.zarr"
    extract(ExtractConfig(teacher=teacher, data=data, out=str(cache), max_length=256, max_prompt_length=128))
    results = {}
    for name, loss, mta in LOSSES:
        for mode in ("offline", "online"):
            results[(name, mode)] = run(mode, loss, mta, args.steps, str(cache), data, teacher)
    sft = results[("sft", "offline")]["step_s"]
    base = results[("srkl", "offline")]["step_s"]
    rows = []
    for name, _, _ in LOSSES:
        off, on = results[(name, "offline")], results[(name, "online")]
        rows.append([name, off["step_s"], on["step_s"], off["step_s"] / on["step_s"], off["step_s"] / sft,
                     round(off["peak_rss_mib"]), round(on["peak_rss_mib"])])
    mta_cost = results[("srkl --mta", "offline")]["step_s"] / base - 1
    pieces = parts(str(cache), teacher)
    report("train_step", "Training step: offline (cache) vs online (live teacher + spaCy), 8-layer student",
           ["loss", "offline s/step", "online s/step", "offline/online", "offline / offline sft", "offline peak MiB",
            "online peak MiB"], rows,
           {"teacher": "SmolLM2-135M-Instruct (30 layers)", "student": "depth-pruned copy, 8 layers",
            "batch_size": 8, "max_length": 256, "steps": args.steps, "records": args.records},
           {"mta_overhead_over_srkl": mta_cost,
            "srkl_mta_over_sft": results[("srkl --mta", "offline")]["step_s"] / sft,
            "parts_seconds": pieces,
            "runs": {f"{k[0]} / {k[1]}": v for k, v in results.items()}})
    print(f"\nMTA adds {100 * mta_cost:.1f}% to the offline srkl step (target <= 15%); offline srkl --mta = "
          f"{results[('srkl --mta', 'offline')]['step_s'] / sft:.2f}x offline sft (target <= 1.25)")
    print("parts of one step (s): " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in pieces.items()))


if __name__ == "__main__":
    main()
