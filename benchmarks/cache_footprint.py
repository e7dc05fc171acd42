"""Benchmark 2 — cache footprint.

Bytes per token on disk (compressed, head excluded) of the default cache (layers 15, 22, 30 in
bf16) and of its fp32, fp16, int8, mixed (last layer bf16, other key layers int8) and top-k 64 variants, measured by extracting the same records;
beside two computed references: dense teacher logits in bf16 (vocab x 2 bytes) and every layer's
states in bf16 (31 x 576 x 2 bytes, uncompressed).

    .venv/bin/python -m benchmarks.cache_footprint [--records 32]
"""

from __future__ import annotations

import argparse
import shutil

from benchmarks.common import WORK, dolly_subset, report, teacher_folder
from mta_cli.cache.inspect import info
from mta_cli.extraction import ExtractConfig, extract

VARIANTS = [("bf16 (default)", {"dtype": "bf16"}), ("fp32", {"dtype": "fp32"}), ("fp16", {"dtype": "fp16"}),
            ("int8", {"dtype": "int8"}), ("bf16 last layer + int8 key layers", {"dtype": "bf16", "key_dtype": "int8"}),
            ("bf16 + top-k 64", {"dtype": "bf16", "top_k": 64})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=32)
    args = parser.parse_args()
    teacher, data = teacher_folder(), dolly_subset("train", args.records)
    rows, figures = [], {}
    for name, options in VARIANTS:
        out = WORK / f"footprint-{options['dtype']}-{options.get('key_dtype', '')}-{options.get('top_k', 0)}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), max_length=256,
                              max_prompt_length=128, **options))
        figures[name] = info(str(out))
        f = figures[name]
        rows.append([name, round(f["bytes_per_token"]), f["compression_ratio"], round(f["head_bytes"] / 2**20, 1)])
    vocab, d, layers = f["vocab_size"], f["hidden_size"], f["teacher_layers"]
    default = figures["bf16 (default)"]["bytes_per_token"]
    rows.append(["dense logits, bf16 (computed)", vocab * 2, "", ""])
    rows.append([f"all {layers + 1} layers, bf16 (computed, raw)", (layers + 1) * d * 2, "", ""])
    for row in rows:
        row.append(row[1] / default)
    report("cache_footprint", "Cache footprint: bytes per token on disk",
           ["cache", "bytes/token", "compression ratio", "head MiB (once)", "x default"], rows,
           {"teacher": "SmolLM2-135M-Instruct", "records": args.records, "tokens": figures["fp32"]["tokens"],
            "layers": "15,22,30 (last = 30)", "max_length": 256, "codec": "Blosc zstd 3 + byte shuffle + CRC32C"},
           {"caches": figures})


if __name__ == "__main__":
    main()
