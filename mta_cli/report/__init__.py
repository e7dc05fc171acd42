"""`mta report`: pictures of training runs, evaluations and cache samples, as one self-contained HTML page
and/or PNG files.

    from mta_cli.report import write_report
    written = write_report(["runs/sft", "runs/srkl-mta", "eval.json"], html="report.html", png_dir="figures")
"""

from __future__ import annotations

from pathlib import Path

from mta_cli.outputs import check_file, check_folder
from mta_cli.report import figures
from mta_cli.report.cache_view import sample_view
from mta_cli.report.html import Section, page
from mta_cli.report.inputs import Evaluation, Inputs, Run, read_inputs

RUN_COMPONENTS = ("loss", "ce", "kd", "dsa", "hid")


def build_sections(inputs: Inputs, sample: int = 0, layer: int | None = None) -> tuple[list[Section], list]:
    """The page's sections and every chart in them (for --png), in page order."""
    sections, charts = [], []
    if inputs.runs:
        section = Section("Training")
        section.add_table(*runs_table(inputs.runs))
        chart = figures.training_curves(inputs.runs)
        section.add_chart(chart)
        sections.append(section)
        charts.append(chart)
    for evaluation in inputs.evaluations:
        section = Section(f"Evaluation — {evaluation.name}")
        section.add_table(*evaluation_table(evaluation))
        for draw in (figures.score_bars, figures.paired_differences, figures.trajectory_heatmaps):
            chart = draw(evaluation)
            section.add_chart(chart)
            charts += [chart] if chart else []
        sections.append(section)
    for cache in inputs.caches:
        heading, fragment = sample_view(cache, sample, layer)
        section = Section(heading)
        section.add_html(fragment)
        sections.append(section)
    return sections, charts


def runs_table(runs: list[Run]) -> tuple[list[str], list[list]]:
    """One row per run: what was trained (from training_config.json) and where it ended."""
    headers = ["run", "objective", "lr", "batch", "steps", *(f"final {c}" for c in RUN_COMPONENTS), "median tok/s"]
    rows = []
    for run in runs:
        objective, last = run.config.get("objective") or {}, run.steps[-1]
        what = objective.get("loss", "?") + (" + MTA" if objective.get("mta") else "")
        if objective.get("mta") and not (objective.get("use_dsa", True) and objective.get("use_hid", True)):
            what += " (DSA only)" if objective.get("use_dsa", True) else " (Hid only)"
        speeds = sorted(row["tokens_per_second"] for row in run.steps if "tokens_per_second" in row)
        rows.append([run.name, what, f"{run.config['lr']:g}" if "lr" in run.config else "?",
                     run.config.get("batch_size", "?"), last["step"],
                     *(f"{last[c]:.4f}" if c in last else "—" for c in RUN_COMPONENTS),
                     f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "—"])
    return headers, rows


def evaluation_table(evaluation: Evaluation) -> tuple[list[str], list[list]]:
    """One row per model: ROUGE-L mean (± std over seeds) per file and on average, NLL, ppl, and the paired difference
    against the baseline with its 95% interval where the evaluation has one (no NLL columns for a --no-nll one)."""
    files = figures.file_names(evaluation)
    paired = any(m.get("paired") for m in evaluation.models)
    compared = ("rougeL", "nll") if evaluation.has_nll else ("rougeL",)
    headers = ["model", *(f"ROUGE-L {f}" for f in files)] + (["ROUGE-L average"] if len(files) > 1 else [])
    headers += (["NLL", "ppl"] if evaluation.has_nll else []) + (
        [{"rougeL": "ΔROUGE-L [95% CI]", "nll": "ΔNLL [95% CI]"}[k] for k in compared] if paired else [])
    spread = len(evaluation.figures.get("settings", {}).get("seeds") or []) > 1  # a std over one pass is no spread

    def rouge(row: dict) -> str:
        return f"{row['rougeL_mean']:.2f}" + (f" ± {row['rougeL_std']:.2f}" if spread else "")

    rows = []
    for name, model in zip(figures.model_names(evaluation), evaluation.models):
        cells = [rouge(f) for f in model["files"]]
        average = model["average"]
        if len(files) > 1:
            cells.append(rouge(average))
        if evaluation.has_nll:
            cells += [f"{average['nll']:.3f}", f"{average['ppl']:,.2f}"]
        if paired:
            difference = (model.get("paired") or {}).get("average")
            cells += ([f"{difference[k + '_delta']:+.2f} [{difference[k + '_ci95'][0]:+.2f}, "
                       f"{difference[k + '_ci95'][1]:+.2f}]" for k in compared] if difference
                      else ["baseline"] * len(compared))
        rows.append([name, *cells])
    return headers, rows


def write_report(paths: list[str], html: str | Path | None = None, png_dir: str | Path | None = None,
                 sample: int = 0, layer: int | None = None, title: str = "mta report") -> list[Path]:
    """Draw every figure of the given runs, evaluations and caches; write the page to `html` and/or each
    figure as `<png_dir>/<slug>.png`. Returns the files written."""
    if html is None and png_dir is None:
        raise ValueError("nothing to write: give --out report.html, --png DIR, or both")
    check_file(html, "--out")
    if png_dir is not None:
        check_folder(png_dir, "--png")
    sections, charts = build_sections(read_inputs([str(p) for p in paths]), sample, layer)
    written = []
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for chart in charts:
            target = Path(png_dir) / f"{chart.slug}.png"
            target.write_bytes(chart.png)
            written.append(target)
    if html is not None:
        Path(html).write_text(page(title, [str(p) for p in paths], sections), encoding="utf-8")
        written.append(Path(html))
    return written
