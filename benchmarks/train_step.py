"""Benchmark 3 — offline vs online training step.

Step time of `--loss sft`, `--loss srkl`, `--loss srkl --mta` and `--loss fdd` (8-layer student, batch 8), offline
(batches from the cache) and online (teacher forward and spaCy in the step, as the research code
does), and of `srkl --mta --compile-loss` offline (its compilation falls in the warm-up round). All nine are timed in one process, interleaved round by round on the same batches, so each
ratio is taken pair by pair on a noisy machine. A step is forward, backward and optimizer step; online
adds spaCy, the teacher forward and collation; offline batches come from the cache loader, whose
reading and decoding run ahead in a background thread during training (benchmark 4 times it). Peak memory is measured in separate processes running
the real `train()` for a few steps. The offline/online ratio is then explained from its parts, each
timed alone on a typical batch: student step, teacher forward, teacher head matmul, spaCy, cache read.

    .venv/bin/python -m benchmarks.train_step [--records 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import WORK, dolly_subset, peak_rss_mib, report, teacher_folder
from mta_cli.cache.reader import CacheReader
from mta_cli.encode import encode_record
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.host_memory import keep_freed_memory
from mta_cli.losses import default_key_layers
from mta_cli.models import load_causal_lm, load_tokenizer
from mta_cli.records import load_records
from mta_cli.segment import Segmenter
from mta_cli.student import prune_layers
from mta_cli.teacher import output_head, teacher_forward
from mta_cli.training.batches import CacheBatches, collate
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.data import live_samples

CONFIGS = [("sft", "sft", False), ("srkl", "srkl", False), ("srkl --mta", "srkl", True), ("fdd", "fdd", False)]
COMPILED = "srkl --mta --compile-loss"  # offline only: an A/B of the compiled chunk loss against "srkl --mta"
LAYERS = [15, 22, 30]
ONLINE_MEMORY = ("sft", "srkl --mta")  # online peaks only for these: each is a process of ~25 s


def memory_child(mode: str, loss: str, mta: bool, cache: str, data: str, teacher: str) -> None:
    """Two steps of the real `train()` in this process; prints its peak RSS (MiB) as JSON."""
    from mta_cli.training.trainer import TrainConfig, train

    out = WORK / f"memory-{mode}-{loss}-{int(mta)}"
    shutil.rmtree(out, ignore_errors=True)
    source = {"cache": cache} if mode == "offline" else {"teacher": teacher, "data": data}
    train(TrainConfig(out=str(out), init_from_teacher=True, keep_layers=8, objective=ObjectiveConfig(loss=loss, mta=mta),
                      max_steps=2, batch_size=8, checkpoint_every=0, max_length=256, max_prompt_length=128, **source))
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def peak_memory(mode: str, loss: str, mta: bool, cache: str, data: str, teacher: str) -> float:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--memory-child", mode, loss, str(int(mta)), cache, data,
           teacher]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


class Trainee:
    """One configuration: its own student copy, objective and optimizer, stepping on given batches."""

    def __init__(self, base_student, loss: str, mta: bool, head, n_teacher: int, norm, compile_loss: bool = False):
        self.student = copy.deepcopy(base_student).train()
        key_layers = default_key_layers(8, n_teacher) if mta or loss == "fdd" else []
        self.objective = Objective(ObjectiveConfig(loss=loss, mta=mta, key_layers=key_layers,
                                                   compile_loss=compile_loss), head, n_teacher, 576, 576, norm)
        self.optimizer = torch.optim.AdamW(list(self.student.parameters()) + list(self.objective.parameters()), 1e-5,
                                           fused=True)  # as `mta train` in one process

    def step(self, batch) -> None:
        self.objective(self.student, batch)["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        mode, loss, mta, cache, data, teacher = sys.argv[2:8]
        memory_child(mode, loss, mta == "1", cache, data, teacher)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()  # as `mta train` on CPU
    teacher_dir, data = str(teacher_folder()), str(dolly_subset("train", args.records))
    cache = WORK / f"train-{args.records}.zarr"
    extract(ExtractConfig(teacher=teacher_dir, data=data, out=str(cache), max_length=256, max_prompt_length=128))
    memory = {(name, mode): peak_memory(mode, loss, mta, str(cache), data, teacher_dir)
              for name, loss, mta in CONFIGS for mode in ("offline", "online")
              if mode == "offline" or name in ONLINE_MEMORY}

    reader = CacheReader(str(cache))
    pad = reader.meta["tokenizer"]["pad_token_id"]
    offline_batches = list(CacheBatches(reader, 8, LAYERS, seed=0, pad_id=pad).iterate(0))[:args.rounds + 1]
    rounds = [b.sample_indices for b in offline_batches]  # the first round warms up
    teacher = load_causal_lm(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    encoded = [encode_record(tokenizer, r, 256, 128) for r in load_records(data).records]
    assert len(encoded) == len(reader) and all(encoded), "every record must be a cache sample (same indices)"
    segmenter = Segmenter()
    base = prune_layers(copy.deepcopy(teacher), 8)
    trainees = {name: Trainee(base, loss, mta, reader.head, 30, reader.final_norm) for name, loss, mta in CONFIGS}
    trainees[COMPILED] = Trainee(base, "srkl", True, reader.head, 30, reader.final_norm, compile_loss=True)

    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n, _, _ in CONFIGS for m in ("offline", "online")}
    times[(COMPILED, "offline")] = []
    warm_up = {}  # seconds of the first offline step: the compiled one includes its compilation
    for r, indices in enumerate(rounds):
        started = time.perf_counter()
        trainees[COMPILED].step(offline_batches[r])
        if r:
            times[(COMPILED, "offline")].append(time.perf_counter() - started)
        else:
            warm_up[COMPILED] = time.perf_counter() - started
        for name, _, _ in CONFIGS:
            started = time.perf_counter()
            trainees[name].step(offline_batches[r])
            offline = time.perf_counter() - started
            if not r:
                warm_up[name] = offline
            started = time.perf_counter()
            samples = live_samples(teacher, [encoded[i] for i in indices], indices, segmenter, LAYERS, pad,
                                   torch.device("cpu"))
            trainees[name].step(collate(samples, pad))
            online = time.perf_counter() - started
            if r:
                times[(name, "offline")].append(offline)
                times[(name, "online")].append(online)

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    rows = [[name, statistics.median(times[(name, "offline")]), statistics.median(times[(name, "online")]),
             ratio((name, "offline"), (name, "online")), ratio((name, "offline"), ("sft", "offline")),
             round(memory[(name, "offline")]), round(memory.get((name, "online"), 0)) or "-"] for name, _, _ in CONFIGS]
    rows.append([COMPILED, statistics.median(times[(COMPILED, "offline")]), "-", "-",
                 ratio((COMPILED, "offline"), ("sft", "offline")), "-", "-"])
    compiled_gain = ratio((COMPILED, "offline"), ("srkl --mta", "offline"))
    compile_seconds = warm_up[COMPILED] - warm_up["srkl --mta"]
    saved_per_step = statistics.median(times[("srkl --mta", "offline")]) - statistics.median(times[(COMPILED, "offline")])
    pays_after = compile_seconds / saved_per_step if saved_per_step > 0 else None  # None: it never pays back
    mta_cost = ratio(("srkl --mta", "offline"), ("srkl", "offline")) - 1
    over_sft = ratio(("srkl --mta", "offline"), ("sft", "offline"))
    typical = sorted(rounds[1:], key=lambda b: sum(reader[i].n_tokens for i in b))[len(rounds[1:]) // 2]
    pieces = parts(reader, teacher, [reader[i] for i in typical], pad)
    report("train_step", "Training step: offline (cache) vs online (live teacher + spaCy), 8-layer student",
           ["loss", "offline s/step", "online s/step", "offline/online", "offline / offline sft", "offline peak MiB",
            "online peak MiB"], rows,
           {"teacher": "SmolLM2-135M-Instruct (30 layers)", "student": "depth-pruned copy, 8 layers",
            "batch_size": 8, "max_length": 256, "rounds": args.rounds, "records": args.records,
            "tokens_per_step": statistics.mean(sum(reader[i].n_tokens for i in b) for b in rounds[1:])},
           {"mta_overhead_over_srkl": mta_cost, "srkl_mta_over_sft": over_sft, "compiled_over_eager": compiled_gain,
            "compile_seconds": compile_seconds, "compile_pays_after_steps": pays_after,
            "parts_seconds": pieces,
            "step_seconds": {f"{k[0]} / {k[1]}": v for k, v in times.items()}})
    print(f"\nMTA adds {100 * mta_cost:.1f}% to the offline srkl step (target <= 15%); offline srkl --mta = "
          f"{over_sft:.2f}x offline sft (target <= 1.25); FDD's peak memory offline = "
          f"{memory[('fdd', 'offline')] / memory[('srkl', 'offline')]:.2f}x srkl's (target <= 1.3); --compile-loss "
          f"step = {compiled_gain:.2f}x the eager srkl --mta step; compiling took {compile_seconds:.0f} s, "
          + (f"paid back after {pays_after:.0f} steps" if pays_after else "never paid back: no faster"))
    print("parts of one step (s): " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in pieces.items()))


def parts(reader: CacheReader, teacher, samples, pad: int) -> dict:
    """Seconds of each piece of one step, timed alone on one batch (cache reading: see benchmark 4)."""
    batch = collate(samples, pad)
    started = time.perf_counter()
    teacher_forward(teacher, batch.input_ids, batch.attention_mask, LAYERS)
    forward_s = time.perf_counter() - started
    head = output_head(teacher)
    started = time.perf_counter()
    with torch.no_grad():
        head(batch.teacher_states[30][batch.labels != -100])
    head_s = time.perf_counter() - started
    segmenter = Segmenter()
    started = time.perf_counter()
    list(segmenter(s.text for s in samples))
    parse_s = time.perf_counter() - started
    return {"tokens": batch.n_tokens, "teacher_forward_s": forward_s, "teacher_head_matmul_s": head_s,
            "spacy_s": parse_s}


if __name__ == "__main__":
    main()
