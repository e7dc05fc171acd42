"""The report's figures, drawn with matplotlib's object API on its Agg canvas (no pyplot, no display), each
returned as a `Chart`: the figure (its axes hold the plotted values), its title and caption, and its PNG:

- `training_curves`: every loss component, the learning rate and tokens/s against step, runs overlaid;
- `score_bars`: ROUGE-L (± std over seeds) and NLL per model and data file of an evaluation;
- `paired_differences`: the paired differences against a baseline with their 95% intervals, when the
  evaluation has them (`models[i]["paired"]` of `mta eval --baseline`);
- `trajectory_heatmaps`: DSA and CKA per key-layer pair and model, when the evaluation ran with --cache.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO

import numpy as np
from matplotlib.figure import Figure

from mta_cli.labels import short_names
from mta_cli.report.inputs import Evaluation, Run

DPI = 110
PANELS = (("loss", "total loss"), ("ce", "CE"), ("kd", "KD divergence"), ("dsa", "DSA"), ("hid", "Hid"),
          ("lr", "learning rate"), ("tokens_per_second", "tokens / s"))
LINEAR_PANELS = ("lr", "tokens_per_second")  # shapes read best on a linear axis
LOG_SPAN = 20        # a positive loss curve spanning more than this factor is drawn on a log axis
SMOOTH_FROM = 30     # from this many steps, a run is drawn raw (faint) and smoothed (bold)
FILE_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
AVERAGE_COLOR = "#333333"
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf")


@dataclass
class Chart:
    """One figure of the report: `slug` names its PNG file, `title` and `caption` go above and below it."""

    slug: str
    title: str
    caption: str
    figure: Figure

    @cached_property
    def png(self) -> bytes:
        buffer = BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


def slug(text: str) -> str:
    """A file-name-safe form of a name: `runs/srkl+mta` -> `runs-srkl-mta`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.") or "x"


def _ema(values: list[float], span: int) -> np.ndarray:
    """Exponential moving average (alpha = 2 / (span + 1)), started at the first value."""
    alpha, smoothed, out = 2 / (span + 1), values[0], []
    for value in values:
        smoothed = alpha * value + (1 - alpha) * smoothed
        out.append(smoothed)
    return np.asarray(out)


def training_curves(runs: list[Run]) -> Chart:
    """One panel per metric that any run logged (losses, lr, tokens/s), every run overlaid in its colour;
    a positive loss curve spanning more than LOG_SPAN is drawn on a log axis."""
    panels = [(key, title) for key, title in PANELS if any(run.series(key)[0] for run in runs)]
    ncols = 2 if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    figure = Figure(figsize=(4.2 * ncols, 2.9 * nrows + 0.5), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    smoothed = False
    for ax, (key, title) in zip(axes, panels):
        values_seen = []
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            if not steps:
                continue
            color = RUN_COLORS[i % len(RUN_COLORS)]
            values_seen += values
            if len(steps) >= SMOOTH_FROM and key != "lr":  # the schedule is exact: nothing to smooth
                smoothed = True
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(values, max(5, len(steps) // 15)), color=color, linewidth=1.8, label=run.name)
            else:
                ax.plot(steps, values, color=color, linewidth=1.6, label=run.name,
                        marker="o" if len(steps) < SMOOTH_FROM else None, markersize=2.5)
        positive = [v for v in values_seen if v > 0]
        if key not in LINEAR_PANELS and len(positive) == len(values_seen) and max(positive) > LOG_SPAN * min(positive):
            ax.set_yscale("log")
            title += " (log scale)"
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncol=min(len(runs), 5), frameon=False)
    names = ", ".join(run.name for run in runs)
    caption = (f"Runs: {names}. One point per optimizer step, from each run's metrics.jsonl."
               + (" Faint: every step; bold: exponential moving average." if smoothed else ""))
    return Chart("training-curves", "Training curves", caption, figure)


def model_names(evaluation: Evaluation) -> list[str]:
    """Each model's short name: the `name` that `mta eval` records, else the short form of its path."""
    fallback = short_names([m["model"] for m in evaluation.models])
    return [m.get("name") or short for m, short in zip(evaluation.models, fallback)]


def file_names(evaluation: Evaluation) -> list[str]:
    return short_names([f["file"] for f in evaluation.models[0]["files"]])


def _grouped_bars(ax, evaluation: Evaluation, key: str, std_key: str | None, ylabel: str) -> None:
    """Models along x, one bar per data file (and their average when there are several), value labels on
    top; error bars from `std_key` where given."""
    names, files = model_names(evaluation), file_names(evaluation)
    groups = files + (["average"] if len(files) > 1 else [])
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for g, group in enumerate(groups):
        rows = [m["average"] if group == "average" else m["files"][g] for m in evaluation.models]
        values = [row[key] for row in rows]
        errors = [row[std_key] for row in rows] if std_key else None
        color = AVERAGE_COLOR if group == "average" else FILE_COLORS[g % len(FILE_COLORS)]
        bars = ax.bar(x + (g - (len(groups) - 1) / 2) * width, values, width, yerr=errors, capsize=3,
                      color=color, label=group, error_kw={"elinewidth": 1, "ecolor": "#222222"})
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    rotate = max(map(len, names)) * len(names) > 40  # long names side by side would overlap
    ax.set_xticks(x, names, rotation=25 if rotate else 0, ha="right" if rotate else "center", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8, frameon=False)


def _decoding(settings: dict) -> str:
    if settings.get("greedy"):
        return "greedy decoding"
    seeds = ",".join(map(str, settings.get("seeds") or []))
    return f"sampling T={settings.get('temperature', 1):g}, top-p={settings.get('top_p', 1):g}, seeds {seeds}"


def score_bars(evaluation: Evaluation) -> Chart:
    """ROUGE-L F x100 (error bars ± std over sampling seeds) and the teacher-forced NLL of the first reference,
    per model and data file: side by side, or one above the other when there are many bars (ROUGE-L alone for
    an evaluation run with --no-nll)."""
    settings = evaluation.figures.get("settings", {})
    seeds = settings.get("seeds") or []
    bars = len(evaluation.models) * (len(evaluation.models[0]["files"]) + (len(evaluation.models[0]["files"]) > 1))
    panel_width = max(4.5, 1.0 + 0.5 * bars)
    panels = 2 if evaluation.has_nll else 1
    stacked = panel_width > 7
    figure = Figure(figsize=(panel_width, 4.2 * panels) if stacked else (panels * panel_width, 4.2),
                    layout="constrained")
    axes = figure.subplots(panels, 1, squeeze=False) if stacked else figure.subplots(1, panels, squeeze=False)
    rouge = axes.flat[0]
    _grouped_bars(rouge, evaluation, "rougeL_mean", "rougeL_std" if len(seeds) > 1 else None, "ROUGE-L F x100")
    rouge.set_title("ROUGE-L (higher is better)", fontsize=10)
    spread = (f"error bars: ± std over {len(seeds)} seeds ({settings.get('std', 'population')})" if len(seeds) > 1
              else "one decoding pass, so no spread over seeds to show")
    caption = f"ROUGE-L F x100 of the generations, {_decoding(settings)}; {spread}."
    if evaluation.has_nll:
        nll = axes.flat[1]
        _grouped_bars(nll, evaluation, "nll", None, "NLL (nats / token)")
        nll.set_title("NLL (lower is better)", fontsize=10)
        ppl = "; ".join(f"{name} {m['average']['ppl']:,.1f}"
                        for name, m in zip(model_names(evaluation), evaluation.models))
        caption += (" NLL: mean negative log-likelihood per response token of the first reference, teacher-forced; "
                    f"perplexity over all files: {ppl}.")
    title = "ROUGE-L and NLL" if evaluation.has_nll else "ROUGE-L"
    return Chart(f"{slug(evaluation.name)}-scores", f"{title} — {evaluation.name}",
                 f"{caption} Data: {', '.join(file_names(evaluation))}.", figure)


def paired_differences(evaluation: Evaluation) -> Chart | None:
    """Forest plot of the paired differences against the baseline (per file and their average), with their
    95% bootstrap intervals; None when the evaluation has no paired comparison."""
    compared = [(name, m["paired"]) for name, m in zip(model_names(evaluation), evaluation.models) if m.get("paired")]
    if not compared:
        return None
    files = evaluation.models[0]["files"]
    labels = dict(zip((f["file"] for f in files), file_names(evaluation)))
    rows = []  # (label, {rougeL_delta, rougeL_ci95, nll_delta, nll_ci95})
    for name, paired in compared:
        for path, figures in paired["files"].items():
            rows.append((f"{name} · {labels.get(path, path)}", figures))
        if len(paired["files"]) > 1:
            rows.append((f"{name} · average", paired["average"]))
    panels = [("rougeL", "ROUGE-L difference (x100)", 1)] + (
        [("nll", "NLL difference (nats / token)", -1)] if evaluation.has_nll else [])
    figure = Figure(figsize=(5 * len(panels), 1.2 + 0.38 * len(rows)), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(len(rows))[::-1]
    for ax, (key, title, better) in zip(axes, panels):
        for yi, (_, figures) in zip(y, rows):
            delta, (low, high) = figures[f"{key}_delta"], figures[f"{key}_ci95"]
            excludes_zero = low > 0 or high < 0
            color = ("#2ca02c" if delta * better > 0 else "#d62728") if excludes_zero else "#7f7f7f"
            ax.errorbar(delta, yi, xerr=[[delta - low], [high - delta]], fmt="o", color=color, capsize=4,
                        markersize=5, linewidth=1.5)
        ax.axvline(0, color="#333333", linewidth=0.8, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [label for label, _ in rows], fontsize=9)
    first = compared[0][1]
    caption = (f"Each model minus the baseline {first['baseline']}, paired by {first.get('unit', 'prompt')}: point = "
               f"difference, bar = 95% interval from {first.get('bootstrap_samples', '?')} bootstrap resamples (seed "
               f"{first.get('bootstrap_seed', '?')}). Green: better than the baseline with the interval excluding 0; "
               "red: worse; grey: the interval includes 0. "
               + ("Higher ROUGE-L and lower NLL are better." if evaluation.has_nll else "Higher ROUGE-L is better."))
    return Chart(f"{slug(evaluation.name)}-paired", f"Paired differences against {first['baseline']} — "
                 f"{evaluation.name}", caption, figure)


def trajectory_heatmaps(evaluation: Evaluation) -> Chart | None:
    """DSA (lower is better) and linear CKA (higher) per model and key-layer pair as two heatmaps, columns by
    teacher layer, each cell naming the student layer; None without trajectory diagnostics."""
    models = [(name, m["trajectory"]) for name, m in zip(model_names(evaluation), evaluation.models)
              if m.get("trajectory")]
    if not models:
        return None
    columns = sorted({(row["teacher_layer"], row["granularity"]) for _, rows in models for row in rows})
    figure = Figure(figsize=(max(8.0, 2.6 + 2.2 * len(columns)), 1.3 + 0.5 * len(models)), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, key, title, cmap in ((axes[0], "dsa", "DSA distance (lower is better)", "Reds"),
                                 (axes[1], "cka", "linear CKA (higher is better)", "Greens")):
        values = np.full((len(models), len(columns)), np.nan)
        notes = [[""] * len(columns) for _ in models]
        for i, (_, rows) in enumerate(models):
            for row in rows:
                j = columns.index((row["teacher_layer"], row["granularity"]))
                values[i, j] = row[key]
                notes[i][j] = f"{row[key]:.3f}\nlayer {row['student_layer']}"
        high = 1.0 if key == "cka" else max(float(np.nanmax(values)), 1e-6)
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=high, aspect="auto")
        for i in range(len(models)):
            for j in range(len(columns)):
                dark = not np.isnan(values[i, j]) and values[i, j] > 0.6 * high
                ax.text(j, i, notes[i][j] or "—", ha="center", va="center", fontsize=7.5,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(columns)), [f"teacher {t}\n{g}" for t, g in columns], fontsize=8)
        ax.set_yticks(range(len(models)), [name for name, _ in models], fontsize=9)
        ax.set_title(title, fontsize=10)
        figure.colorbar(image, ax=ax, shrink=0.8)
    samples = models[0][1][0].get("samples", "?")
    return Chart(f"{slug(evaluation.name)}-trajectory", f"Trajectory alignment with the cached teacher — "
                 f"{evaluation.name}",
                 f"Per key-layer pair (column: teacher layer and granularity; each cell names the model's own layer "
                 "paired with it): "
                 f"DSA distance between span geometries and linear CKA between representations, over {samples} "
                 "cached samples. The teacher against its own cache gives DSA 0 and CKA 1.", figure)
