"""`mta report`: the command-line layer over `mta_cli.report.write_report`."""

from __future__ import annotations

from pathlib import Path

import typer

from mta_cli.cli_support import out, reported_errors


def report_command(
    inputs: list[str] = typer.Argument(..., metavar="RUN_OR_EVAL", help="training run folders (metrics.jsonl), "
                                       "`mta eval --json` files and caches, in any mix"),
    html: Path | None = typer.Option(None, "--out", help="write the report as one self-contained HTML page"),
    png: Path | None = typer.Option(None, "--png", help="write every figure as a PNG file into this folder"),
    sample: int = typer.Option(0, "--sample", min=0, help="for a cache: the sample shown"),
    layer: int | None = typer.Option(None, "--layer", help="for a cache: the teacher layer whose importance "
                                     "weights shade the tokens [default: the lowest cached layer]"),
    title: str = typer.Option("mta report", "--title", help="the page's title"),
) -> None:
    """Draw training runs, evaluations and cache samples: one HTML page (figures embedded, readable offline)
    and/or PNG files.

    Runs: every loss component, the learning rate and tokens/s against step, runs overlaid. Evaluations:
    ROUGE-L per model and file (± std over seeds), NLL, the paired differences against a baseline with their
    95% intervals where the evaluation has them, and DSA / CKA per key-layer pair (eval --cache). Caches: one
    sample's phrases and words, its tokens shaded by importance weight. The files written go to stdout.

    Example:

        mta report runs/srkl runs/srkl-mta eval.json --out report.html --png figures/
    """
    from mta_cli.report import write_report

    with reported_errors((IndexError,)):
        written = write_report(inputs, html=html, png_dir=png, sample=sample, layer=layer, title=title)
    for path in written:
        out.print(str(path), markup=False, highlight=False, soft_wrap=True)
