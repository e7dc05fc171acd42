"""`mta eval`: the command-line layer over `mta_cli.evaluation.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mta_cli.cli_support import err, out, reported_errors
from mta_cli.evaluation import DEFAULT_SEEDS, EvalError, evaluate, render_table, render_trajectory
from mta_cli.outputs import check_file
from mta_cli.recipes import config_option, effective_options


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--seeds must be comma-separated integers such as 10,20,30, got {text!r}") from None


def eval_command(
    ctx: typer.Context,
    model: list[str] = typer.Option(..., "--model", help="model to evaluate: HF folder, hub name or .gguf file, "
                                    "shown by its folder or file name, or NAME=PATH to name it; repeat for several"),
    data: list[str] = typer.Option(..., "--data", help="JSONL data file with references; repeat for several"),
    seeds: str = typer.Option(",".join(map(str, DEFAULT_SEEDS)), "--seeds",
                              help="comma-separated sampling seeds; ROUGE-L is mean ± std over them"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy decoding, one pass (seeds ignored)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="longest response generated"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="prompts per generation / NLL batch"),
    max_records: int | None = typer.Option(None, "--max-records", min=1, help="evaluate only the first N records "
                                                                             "of each file"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16"),
    json_out: Path | None = typer.Option(None, "--json", help="write every figure as JSON to this file"),
    generations: Path | None = typer.Option(None, "--generations", help="write every generation as JSONL to this "
                                            "file (with --json, by default <stem>.generations.jsonl next to it)"),
    nll: bool = typer.Option(True, "--nll/--no-nll", help="score the first reference's NLL / perplexity; "
                             "--no-nll skips that forward pass when only ROUGE-L is wanted"),
    cache: str | None = typer.Option(None, "--cache", help="extraction cache of the teacher: adds DSA and linear "
                                     "CKA per key-layer pair between each model and the cached teacher states"),
    cache_samples: int = typer.Option(64, "--cache-samples", min=1, help="cached samples used by --cache"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip invalid records instead of failing"),
    baseline: str | None = typer.Option(None, "--baseline", help="compare every other model with this one: mean "
                                        "paired difference in ROUGE-L and per-prompt NLL, with a 95% bootstrap "
                                        "interval over prompts (a prompt's seeds kept together); one of the "
                                        "--model values, or evaluated first"),
    bootstrap_samples: int = typer.Option(10_000, "--bootstrap-samples", help="bootstrap resamples of the "
                                          "prompts, 100 to 100,000 (with --baseline)"),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="seed of the bootstrap, >= 0: the same seed "
                                       "gives the same intervals (with --baseline)"),
    recipes: list[Path] = config_option(),
) -> None:
    """Evaluate models on instruction data: ROUGE-L over sampling seeds, and NLL / perplexity.

    Sampling at temperature 1, top-p 1; ROUGE-L F x100 (stemmed), max over references, mean ± std over seeds.

    NLL / perplexity of the first reference given the prompt. The table goes to stdout, progress to stderr;
    --json also records the effective options (command line and recipes) under "config".

    With --baseline B: for every other model, the mean paired difference from B in ROUGE-L and in per-prompt
    NLL (each prompt's mean token NLL), with a 95% percentile bootstrap interval. The bootstrap resamples
    prompts with replacement and keeps all sampling seeds of a prompt together: seeds of one prompt are
    correlated, so this is the conservative unit.

    Examples:

        mta eval --model runs/student --model teacher=teacher.gguf --data dev.jsonl --seeds 10,20 --json eval.json

        mta eval --model runs/srkl --model runs/srkl-mta --baseline runs/srkl --data dev.jsonl --json eval.json
    """
    with reported_errors():
        seed_list = _parse_seeds(seeds)
        if generations is None and json_out is not None:
            generations = json_out.with_name(json_out.stem + ".generations.jsonl")
        check_file(json_out, "--json")
        check_file(generations, "--generations")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as progress:
            report = evaluate(model, data, seeds=seed_list, greedy=greedy, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, max_records=max_records, device=device, dtype=dtype,
                              progress=progress, cache=cache, cache_samples=cache_samples, skip_invalid=skip_invalid,
                              baseline=baseline, bootstrap_samples=bootstrap_samples, bootstrap_seed=bootstrap_seed,
                              nll=nll)
        out.print(render_table(report))
        if cache:
            out.print(render_trajectory(report))
        if json_out:
            figures = report.to_json() | {"config": effective_options(ctx)}
            json_out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
            err.print(f"figures written to {json_out}", markup=False, highlight=False)
        if generations:
            report.write_generations(generations)
            err.print(f"{len(report.generations)} generations written to {generations}", markup=False,
                      highlight=False)
