"""The quality study's final table (examples/quality_study.sh): ROUGE-L mean ± spread over sampling
seeds per model, NLL, and the trajectory alignment of each student, from `mta eval --json`.

    .venv/bin/python -m benchmarks.quality_table study-cpu/eval.json --scale cpu --settings "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import report


def label(path: str) -> str:
    name = Path(path).name
    return "teacher" if name.endswith(".gguf") else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_json")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--settings", default="")
    args = parser.parse_args()
    figures = json.loads(Path(args.eval_json).read_text())
    rows = []
    for model in figures["models"]:
        avg, trajectory = model["average"], model.get("trajectory") or []
        per_seed = avg["rougeL_per_seed"]
        rows.append([model.get("name") or label(model["model"]), avg["rougeL_mean"], avg["rougeL_std"],
                     max(per_seed.values()) - min(per_seed.values()), avg["nll"],
                     " / ".join(f"{r['dsa']:.3f}" for r in trajectory),
                     " / ".join(f"{r['cka']:.2f}" for r in trajectory)])
    settings = dict(item.split("=", 1) for item in args.settings.split()) | {"scale": args.scale}
    report(f"quality_{args.scale}", "Quality: ROUGE-L on held-out Dolly dev (x100, mean ± std over sampling seeds)",
           ["model", "ROUGE-L", "std", "max-min over seeds", "NLL", "DSA per key layer", "CKA per key layer"],
           rows, settings, {"eval": figures})


if __name__ == "__main__":
    main()
