"""`mta generate`: the command-line layer over `mta_cli.generation.generate_records`."""

from __future__ import annotations

import time
from dataclasses import asdict

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mta_cli.cli_support import EventProgress, parse_ints, print_figures, reported_errors


def generate_command(
    model: str = typer.Option(..., "--model", help="the model whose responses to write: HF folder, hub name or "
                                                   ".gguf file"),
    data: str = typer.Option(..., "--data", help="JSONL records whose prompts to answer (prompt, Alpaca/Dolly or "
                                                 "chat; chat prompts rendered with the model's template)"),
    out_path: str = typer.Option(..., "--out", help="JSONL file of generated records (prompt format, read by "
                                                    "`mta extract`); its settings go to OUT.settings.json"),
    seeds: str = typer.Option("10", "--seeds", help="comma-separated sampling seeds: one record per prompt and "
                                                    "seed, seed by seed"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest response generated"),
    temperature: float = typer.Option(1.0, "--temperature", help="sampling temperature"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1: pure sampling)"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per generation batch (part of what decides "
                                                           "the responses)"),
    max_records: int | None = typer.Option(None, "--max-records", help="answer only the first N records"),
    format: str = typer.Option("auto", "--format", help="auto, prompt, alpaca or chat"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="model precision: fp32, bf16 or fp16"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip invalid records instead of failing"),
    force: bool = typer.Option(False, "--force", help="start --out over instead of resuming it"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Write a model's responses to the prompts of a data file, as records `mta extract` reads.

    Sampling is seeded per batch and deterministic on CPU. Re-running the same command resumes after the last
    record written; other options are refused (--force starts over). Empty responses are not written, only
    counted. Example:

        mta generate --model runs/student --data train.jsonl --out gen.jsonl --seeds 10,20 --max-new-tokens 128
    """
    from mta_cli.generation import GenerateConfig, generate_records

    with reported_errors():
        config = GenerateConfig(model=model, data=data, out=out_path, seeds=parse_ints(seeds, "--seeds"),
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, max_records=max_records, format=format,
                                skip_invalid=skip_invalid, device=device, dtype=dtype, force=force)
        with GenerateProgress() as on_event:
            summary = generate_records(config, progress=on_event)
    print_figures(asdict(summary), as_json, "mta generate")


class GenerateProgress(EventProgress):
    """generate's progress: (prompt, seed) pairs, records written, tokens/s."""

    def columns(self) -> tuple:
        self.records, self.tokens, self.started = 0, 0, 0.0
        return (TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn())

    def handle(self, event: str, info: dict) -> None:
        if event == "start":
            self.task = self.progress.add_task("generate", total=info["total"], completed=info["done"], info="")
            self.started = time.perf_counter()
            if info["done"]:
                self.note(f"resuming: {info['done']} of {info['total']} (prompt, seed) pairs done")
        elif event == "batch" and self.task is not None:
            self.records += info["records"]
            self.tokens += info["tokens"]
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=info["pairs"], info=f"{self.records} records, {rate:,.0f} tok/s")
