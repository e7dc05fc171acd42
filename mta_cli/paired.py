"""Paired comparison of a model with a baseline evaluated on the same prompts and sampling seeds: the mean
difference in ROUGE-L and in per-prompt reference NLL, each with a 95% percentile bootstrap interval.

The resampling unit is the prompt. A replicate draws a file's n prompts with replacement and keeps every
sampling seed of a drawn prompt together: a prompt's ROUGE-L difference is the mean over seeds of the
(prompt, seed) pairs' differences (model and baseline sampled with the same seed). Generations of one prompt
under different seeds are correlated (same prompt, same references, same model habits), so resampling
(prompt, seed) pairs as if independent would narrow the interval; resampling prompts is the conservative
choice. A prompt's NLL is its mean token NLL (`reference_nll`'s per-record figure), so every prompt weighs the
same; the NLL difference is therefore not the difference of the token-level NLL of the table.

Exact procedure, so that anyone can recompute it from the per-record figures of `mta eval --json`:
for the f-th data file (0-based, in --data order) with n prompts,
`draws = numpy.random.default_rng([seed, f]).integers(0, n, size=(B, n))`; replicate b's difference is the
mean of the per-prompt differences at `draws[b]`, for ROUGE-L and NLL alike (one draw serves both); the
interval is `numpy.percentile(replicates, [2.5, 97.5])` (linear interpolation). Over files: replicate b
averages the files' replicate-b means (each file resampled by its own generator, independently), and the
point estimate averages the files' mean differences.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mta_cli.options import check_number

if TYPE_CHECKING:
    from mta_cli.evaluation import FileResult


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are drawn: B replicates from a seeded generator (see the module docstring)."""

    bootstrap_samples: int = 10_000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        check_number(self, "bootstrap_samples", 100, 100_000, integer=True)
        check_number(self, "bootstrap_seed", 0, 2**63 - 1, integer=True)

    def draws(self, n: int, file_index: int) -> np.ndarray:
        """Prompt indices of every replicate of file `file_index`: int64 [B, n]."""
        rng = np.random.default_rng([self.bootstrap_seed, file_index])
        return rng.integers(0, n, size=(self.bootstrap_samples, n))


def interval(replicates: np.ndarray) -> list[float]:
    """The 95% percentile interval [lo, hi] of bootstrap replicates [B]."""
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return [float(lo), float(hi)]


def prompt_differences(model: FileResult, baseline: FileResult) -> dict[str, np.ndarray]:
    """Per-prompt differences model - baseline on one file: {"rougeL": averaged over seeds [n], "nll": [n]}
    ("nll" only when both were evaluated with the NLL pass).

    ValueError when the two were not evaluated on the same prompts and seeds, or a prompt has no NLL."""
    if model.file != baseline.file or model.n_records != baseline.n_records:
        raise ValueError(f"{model.file}: the model and the baseline were not evaluated on the same records")
    if model.rougeL_per_record.keys() != baseline.rougeL_per_record.keys():
        raise ValueError(f"{model.file}: the model and the baseline were not sampled with the same seeds")
    rouge = np.mean([np.subtract(model.rougeL_per_record[s], baseline.rougeL_per_record[s])
                     for s in baseline.rougeL_per_record], axis=0)
    if model.nll_per_record is None or baseline.nll_per_record is None:
        return {"rougeL": rouge}
    if None in model.nll_per_record or None in baseline.nll_per_record:
        raise ValueError(f"{model.file}: a record has no response token left after truncation, so it has no NLL "
                         "to pair; raise max_length or lower max_prompt_length")
    return {"rougeL": rouge, "nll": np.subtract(model.nll_per_record, baseline.nll_per_record)}


def paired_comparison(model_files: list[FileResult], baseline_files: list[FileResult], baseline: str,
                      bootstrap: Bootstrap) -> dict:
    """The `paired` entry of `mta eval --json` for one model against `baseline` (see the module docstring).

    {"baseline", "unit": "prompt", "bootstrap_samples", "bootstrap_seed",
     "files": {path: {"rougeL_delta", "rougeL_ci95": [lo, hi], "nll_delta", "nll_ci95", "n_prompts"}},
     "average": {"rougeL_delta", "rougeL_ci95", "nll_delta", "nll_ci95"}}
    (the nll figures only when every file has them)."""
    files, deltas, replicates = {}, defaultdict(list), defaultdict(list)
    for index, (m, b) in enumerate(zip(model_files, baseline_files, strict=True)):
        draws = bootstrap.draws(m.n_records, index)
        entry = {}
        for name, differences in prompt_differences(m, b).items():
            deltas[name].append(float(differences.mean()))
            replicates[name].append(differences[draws].mean(axis=1))
            entry |= {f"{name}_delta": deltas[name][-1], f"{name}_ci95": interval(replicates[name][-1])}
        files[m.file] = entry | {"n_prompts": m.n_records}
    average = {}
    for name in [n for n in ("rougeL", "nll") if len(deltas[n]) == len(model_files)]:
        average |= {f"{name}_delta": float(np.mean(deltas[name])),
                    f"{name}_ci95": interval(np.mean(replicates[name], axis=0))}
    return {"baseline": baseline, "unit": "prompt", "bootstrap_samples": bootstrap.bootstrap_samples,
            "bootstrap_seed": bootstrap.bootstrap_seed, "files": files, "average": average}
