"""Benchmark 6 — scale-out on this machine.

(a) `mta extract` tokens/s in one process and under `torchrun --nproc-per-node 2` on the same data (each run a
fresh cache; tokens/s over the shard loop, all ranks together, and the wall time of the whole command).
(b) Loader headroom when the cache is read from an S3 server (moto's, in its own process on 127.0.0.1, reached
through s3fs like any S3) against local disk: samples/s the loader delivers over samples/s an `srkl --mta`
step consumes (8-layer student, batch 8). Target: >= 10x from S3 too.

    .venv/bin/python -m benchmarks.scale [--records 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO, WORK, dolly_subset, report, teacher_folder
from mta_cli.cache.reader import CacheReader
from mta_cli.training.batches import CacheBatches
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train

LAYERS = [15, 22, 30]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_command(teacher: str, data: str, out: str) -> list[str]:
    return ["-m", "mta_cli", "extract", "--teacher", teacher, "--data", data, "--out", out, "--max-length", "256",
            "--max-prompt-length", "128", "--shard-size", "8", "--batch-size", "8", "--device", "cpu", "--json"]


def timed_extraction(teacher: str, data: str, ranks: int) -> dict:
    """One extraction into a fresh cache: the summary (tokens/s of all ranks) and the command's wall time."""
    out = WORK / f"scale-{ranks}-ranks.zarr"
    shutil.rmtree(out, ignore_errors=True)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                                      "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    command = [sys.executable, *launcher, *extract_command(teacher, data, str(out))]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"extraction with {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout) | {"wall": time.perf_counter() - started, "out": out}


def loader_rate(url: str, prefetch: bool) -> float:
    """Samples/s of one epoch of batches of 8 (read, decode, collate), layers 15/22/30."""
    loader = CacheBatches(CacheReader(url), 8, LAYERS, seed=0, pad_id=0, prefetch=prefetch)
    started = time.perf_counter()
    samples = sum(len(b.sample_indices) for b in loader.iterate(0))
    return samples / (time.perf_counter() - started)


def s3_copy(local, port: int) -> tuple[subprocess.Popen, str]:
    """An S3 server in its own process, holding a copy of the cache at `local`; returns it and the cache's URL."""
    import fsspec

    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for _ in range(100):
        try:
            fs.mkdir("bench")
            break
        except OSError:
            time.sleep(0.1)
    fs.put(str(local), "bench/cache.zarr", recursive=True)
    return server, "s3://bench/cache.zarr"


def step_rate(url: str, steps: int) -> float:
    """Samples/s an offline srkl --mta step consumes (median step after the first)."""
    out = WORK / "scale-step-run"
    shutil.rmtree(out, ignore_errors=True)
    train(TrainConfig(out=str(out), cache=url, init_from_teacher=True, keep_layers=8, batch_size=8,
                      objective=ObjectiveConfig(loss="srkl", mta=True), max_steps=steps, checkpoint_every=0,
                      device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return 8 / statistics.median(r["step_seconds"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    teacher, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    load_before = os.getloadavg()[0]  # other jobs on the machine change what extra ranks can take

    one, two = timed_extraction(teacher, data, 1), timed_extraction(teacher, data, 2)
    server, url = s3_copy(one["out"], free_port())
    try:
        rates = {(where, prefetch): loader_rate(source, prefetch)
                 for where, source in (("local disk", str(one["out"])), ("S3 (local server)", url))
                 for prefetch in (False, True)}
    finally:
        server.terminate()
        server.wait()
    consumed = step_rate(str(one["out"]), args.steps)

    rows = [["extract, 1 process (2 threads)", f"{one['tokens_per_second']:,.0f} tok/s", f"{one['wall']:.1f} s wall",
             1.0],
            ["extract, torchrun 2 ranks (1 thread each)", f"{two['tokens_per_second']:,.0f} tok/s",
             f"{two['wall']:.1f} s wall", two["tokens_per_second"] / one["tokens_per_second"]]]
    for (where, prefetch), rate in rates.items():
        rows.append([f"loader from {where}, {'background prefetch' if prefetch else 'one thread'}",
                     f"{rate:,.1f} samples/s", "", rate / consumed])
    rows.append(["training step, srkl --mta (consumes)", f"{consumed:,.3f} samples/s", "", 1.0])
    report("scale", "Scale-out on this machine: extraction ranks, loader from S3 vs disk",
           ["", "throughput", "time", "ratio (extract: x 1 process; loader: x step, target >= 10)"], rows,
           {"records": args.records, "tokens": one["tokens"], "max_length": 256, "shard_size": 8, "batch_size": 8,
            "layers": "15,22,30 bf16", "student": "8-layer pruned SmolLM2", "gpu": "none on this machine: no GPU "
            "figures", "load average (1 min) before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"},
           {"extract_ratio": two["tokens_per_second"] / one["tokens_per_second"],
            "s3_headroom": rates[("S3 (local server)", False)] / consumed})


if __name__ == "__main__":
    main()
