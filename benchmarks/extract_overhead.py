"""Benchmark 1 — extraction overhead.

`mta extract` tokens/s divided by the bare teacher forward's tokens/s on the same batches (same
dtype, same `output_hidden_states` forward, same length-bucketed batches). A ratio near 1 means
tokenization, spaCy, encoding and writing are hidden behind the forward. Bare and extract runs
alternate and the ratio is taken pair by pair (the machine is noisy).

    .venv/bin/python -m benchmarks.extract_overhead [--records 96] [--pairs 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import numpy as np
import torch

from benchmarks.common import WORK, dolly_subset, report, teacher_folder
from mta_cli.extraction import ExtractConfig, extract, length_batches, plan
from mta_cli.models import load_causal_lm
from mta_cli.teacher import teacher_forward


def bare_forward_tokens_per_second(model, samples, config: ExtractConfig, layers: list[int]) -> float:
    """The teacher alone over extract's batches (shard by shard, length-bucketed)."""
    tokens, started = 0, time.perf_counter()
    for first in range(0, len(samples), config.shard_size):
        shard = samples[first:first + config.shard_size]
        for batch in length_batches([len(s.input_ids) for s in shard], config.batch_size):
            width = max(len(shard[i].input_ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(shard[i].input_ids)
                ids[row, :n] = torch.from_numpy(shard[i].input_ids.astype(np.int64))
                mask[row, :n] = 1
            teacher_forward(model, ids, mask, layers)
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()

    out = WORK / "extract-overhead.zarr"
    config = ExtractConfig(teacher=str(teacher_folder()), data=str(dolly_subset("train", args.records)), out=str(out),
                           max_length=256, max_prompt_length=128, batch_size=8, shard_size=32)
    samples = plan(config).samples
    model = load_causal_lm(config.teacher)
    layers = [15, 22, 30]
    bare_forward_tokens_per_second(model, samples[:16], config, layers)  # warm-up
    rows, ratios = [], []
    for pair in range(args.pairs):
        bare = bare_forward_tokens_per_second(model, samples, config, layers)
        shutil.rmtree(out, ignore_errors=True)
        summary = extract(config)
        ratio = summary.tokens_per_second / bare
        ratios.append(ratio)
        rows.append([pair + 1, round(bare), round(summary.tokens_per_second), ratio])
    rows.append(["median", "", "", statistics.median(ratios)])
    report("extract_overhead", "Extraction overhead: mta extract vs the bare teacher forward",
           ["pair", "bare forward tok/s", "mta extract tok/s", "ratio (target >= 0.90)"], rows,
           {"teacher": "SmolLM2-135M-Instruct (GGUF, de-quantised, fp32)", "records": len(samples),
            "tokens": sum(len(s.input_ids) for s in samples), "batch_size": 8, "max_length": 256,
            "shard_size": 32, "stored": "layers 15,22,30 bf16"},
           {"median_ratio": statistics.median(ratios)})


if __name__ == "__main__":
    main()
