"""`mta report` and `mta cache show --html`, from tiny runs, a tiny evaluation and the tiny cache: every figure
is drawn with the values of its inputs, written as PNG and embedded in one self-contained page."""

from __future__ import annotations

import base64
import json
import re
from html import unescape
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from mta_cli.cache.reader import CacheReader
from mta_cli.cli import app
from mta_cli.labels import model_labels, short_names
from mta_cli.report import evaluation_table, figures
from mta_cli.report.inputs import read_inputs
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests import tiny


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_fp32_cache) -> list[Path]:
    """Two short runs from the tiny cache: sft (no MTA terms) and srkl + MTA."""
    base = tmp_path_factory.mktemp("runs")
    made = []
    for name, objective in (("sft", ObjectiveConfig(loss="sft")), ("srkl-mta", ObjectiveConfig(loss="srkl", mta=True))):
        train(TrainConfig(out=str(base / name), cache=tiny_fp32_cache, init_from_teacher=True, keep_layers=2,
                          objective=objective, batch_size=2, max_steps=4, checkpoint_every=0, device="cpu"))
        made.append(base / name)
    return made


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, tiny_teacher_dir, tiny_fp32_cache, runs) -> Path:
    """`mta eval --json --cache` of the teacher and the srkl + MTA student on two data files, two seeds."""
    base = tmp_path_factory.mktemp("eval")
    files = []
    for name, records in (("a.jsonl", tiny.RECORDS[:3]), ("b.jsonl", tiny.RECORDS[3:5])):
        tiny.write_jsonl(base / name, records)
        files += ["--data", base / name]
    out = base / "eval.json"
    result = cli("eval", "--model", f"teacher={tiny_teacher_dir}", "--model", runs[1], *files, "--seeds", "10,20",
                 "--max-new-tokens", 6, "--device", "cpu", "--cache", tiny_fp32_cache, "--cache-samples", 4,
                 "--json", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def paired(tmp_path_factory, evaluation) -> Path:
    """The evaluation with the paired comparison of `mta eval --baseline teacher` written in by hand."""
    figures_ = json.loads(evaluation.read_text())
    teacher, student = figures_["models"]
    teacher["paired"] = None
    student["paired"] = {
        "baseline": "teacher", "unit": "prompt", "bootstrap_samples": 1000, "bootstrap_seed": 0,
        "files": {f["file"]: {"rougeL_delta": -3.5 - i, "rougeL_ci95": [-6.0 - i, -1.0 - i], "nll_delta": 0.4 + i,
                              "nll_ci95": [-0.1 + i, 0.9 + i], "n_prompts": f["n_records"]}
                  for i, f in enumerate(student["files"])},
        "average": {"rougeL_delta": -4.0, "rougeL_ci95": [-5.5, -2.5], "nll_delta": 0.9, "nll_ci95": [0.2, 1.6]},
    }
    out = tmp_path_factory.mktemp("paired") / "paired.json"
    out.write_text(json.dumps(figures_))
    return out


def metric(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_figure_is_written_and_embedded_in_one_offline_page(tmp_path, runs, evaluation, paired,
                                                                  tiny_fp32_cache):
    page, png = tmp_path / "report.html", tmp_path / "png"
    result = cli("report", *runs, evaluation, paired, tiny_fp32_cache, "--out", page, "--png", png)
    assert result.exit_code == 0, result.output
    expected = {"training-curves.png"} | {f"{e}-{kind}.png" for e in ("eval.json", "paired.json")
                                          for kind in ("scores", "trajectory")} | {"paired.json-paired.png"}
    assert {p.name for p in png.iterdir()} == expected
    assert result.stdout.split() == [str(png / name) for name in sorted(expected, key=png_order)] + [str(page)]
    html = page.read_text()
    embedded = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html)
    assert sorted(embedded) == sorted(base64.b64encode((png / name).read_bytes()).decode() for name in expected)
    for name in expected:
        image = imread(BytesIO((png / name).read_bytes()), format="png")
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0  # drawn, not blank
    assert not re.search(r"<script|<link|(src|href)=\"(https?:)?//", html)  # nothing fetched: readable offline
    assert sample_body(html).count('class="w"') == len(CacheReader(tiny_fp32_cache)[0].words)  # the cache sample


def sample_body(html: str) -> str:
    """The marked-up text of a cache sample in a page."""
    body = html[html.index('<div class="sample">'):]
    return body[:body.index("</div>")]


def png_order(name: str) -> tuple:
    """The page order: training, then each evaluation's scores, paired differences, trajectory."""
    kinds = ["scores", "paired", "trajectory"]
    if name == "training-curves.png":
        return (0,)
    stem, kind = name.removesuffix(".png").rsplit("-", 1)
    return (1, ["eval.json", "paired.json"].index(stem), kinds.index(kind))


def test_training_curves_plot_every_logged_metric_of_every_run(runs):
    chart = figures.training_curves(read_inputs(runs).runs)
    panels = {ax.get_title().removesuffix(" (log scale)"): ax for ax in chart.figure.axes if ax.get_visible()}
    assert set(panels) == {"total loss", "CE", "KD divergence", "DSA", "Hid", "learning rate", "tokens / s"}
    for title, key in (("total loss", "loss"), ("CE", "ce"), ("KD divergence", "kd"), ("DSA", "dsa"), ("Hid", "hid"),
                       ("learning rate", "lr"), ("tokens / s", "tokens_per_second")):
        drawn = {line.get_label(): list(line.get_ydata()) for line in panels[title].get_lines()}
        for run in runs:
            if key in json.loads((run / "metrics.jsonl").read_text().splitlines()[0]):
                assert drawn[run.name] == pytest.approx(metric(run, key), rel=1e-12), (title, run.name)
            else:  # sft logs no KD, DSA or Hid
                assert run.name not in drawn
    legend = [text.get_text() for text in chart.figure.legends[0].get_texts()]
    assert legend == ["sft", "srkl-mta"]


def test_score_bars_are_the_evaluations_rouge_means_stds_and_nlls(evaluation, tmp_path):
    """The tiny models score ROUGE-L 0: distinct values are written in, so that every bar is told apart."""
    figures_ = json.loads(evaluation.read_text())
    rng = np.random.default_rng(0)
    for model in figures_["models"]:
        for row in [*model["files"], model["average"]]:
            row["rougeL_mean"], row["rougeL_std"] = rng.uniform(5, 40), rng.uniform(0.1, 3)
    (tmp_path / "eval.json").write_text(json.dumps(figures_))
    evaluation_ = read_inputs([tmp_path / "eval.json"]).evaluations[0]
    rouge, nll = figures.score_bars(evaluation_).figure.axes
    models = evaluation_.models
    groups = [[m["files"][0] for m in models], [m["files"][1] for m in models], [m["average"] for m in models]]
    for ax, key in ((rouge, "rougeL_mean"), (nll, "nll")):
        bars = [container for container in ax.containers if hasattr(container, "patches")]
        assert [[bar.get_height() for bar in c] for c in bars] == [[row[key] for row in g] for g in groups]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["teacher", "srkl-mta"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a.jsonl", "b.jsonl", "average"]
    half_spans = [float(seg[1][1] - seg[0][1]) / 2 for c in rouge.collections for seg in c.get_segments()]
    assert half_spans == pytest.approx([row["rougeL_std"] for g in groups for row in g], rel=1e-9)
    assert not nll.collections  # NLL is teacher-forced: no spread over seeds


def test_paired_intervals_are_drawn_where_the_evaluation_has_them(evaluation, paired):
    assert figures.paired_differences(read_inputs([evaluation]).evaluations[0]) is None
    evaluation_ = read_inputs([paired]).evaluations[0]
    chart = figures.paired_differences(evaluation_)
    comparison = evaluation_.models[1]["paired"]
    rows = [*comparison["files"].values(), comparison["average"]]
    for ax, key in zip(chart.figure.axes, ("rougeL", "nll")):
        points = [float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_marker() == "o"]
        ends = [float(x) for c in ax.collections for seg in c.get_segments() for x in seg[:, 0]]
        assert points == pytest.approx([row[f"{key}_delta"] for row in rows])
        assert ends == pytest.approx([x for row in rows for x in row[f"{key}_ci95"]])  # (low, high) per row
    ticks = chart.figure.axes[0].get_yticklabels()
    top_down = [t.get_text() for t in sorted(ticks, key=lambda t: -t.get_position()[1])]
    assert top_down == ["srkl-mta · a.jsonl", "srkl-mta · b.jsonl", "srkl-mta · average"]
    headers, table = evaluation_table(evaluation_)
    assert headers[-2:] == ["ΔROUGE-L [95% CI]", "ΔNLL [95% CI]"]
    assert table[0][-2:] == ["baseline", "baseline"] and table[1][-2:] == ["-4.00 [-5.50, -2.50]", "+0.90 [+0.20, +1.60]"]


def test_an_evaluation_without_nll_is_reported_with_rouge_only(paired, tmp_path):
    """An `mta eval --no-nll` file (NLL figures null, paired ROUGE-L only): the table, the score bars and the
    paired plot leave NLL out instead of failing."""
    figures_ = json.loads(paired.read_text())
    for model in figures_["models"]:
        for row in [*model["files"], model["average"]]:
            row["nll"] = row["ppl"] = None
            row.pop("nll_per_record", None)
        if model["paired"]:
            for row in [*model["paired"]["files"].values(), model["paired"]["average"]]:
                del row["nll_delta"], row["nll_ci95"]
    (tmp_path / "eval.json").write_text(json.dumps(figures_))
    evaluation_ = read_inputs([tmp_path / "eval.json"]).evaluations[0]
    assert not evaluation_.has_nll and read_inputs([paired]).evaluations[0].has_nll
    headers, table = evaluation_table(evaluation_)
    assert "NLL" not in headers and headers[-1] == "ΔROUGE-L [95% CI]"
    assert table[0][-1] == "baseline" and table[1][-1] == "-4.00 [-5.50, -2.50]"
    scores = figures.score_bars(evaluation_)
    assert [ax.get_title() for ax in scores.figure.axes] == ["ROUGE-L (higher is better)"]
    assert "NLL" not in scores.caption
    chart = figures.paired_differences(evaluation_)
    assert [ax.get_title() for ax in chart.figure.axes] == ["ROUGE-L difference (x100)"]
    assert chart.caption.endswith("Higher ROUGE-L is better.")


def test_trajectory_heatmaps_hold_dsa_and_cka_per_key_layer_pair(evaluation):
    evaluation_ = read_inputs([evaluation]).evaluations[0]
    chart = figures.trajectory_heatmaps(evaluation_)
    for ax, key in zip(chart.figure.axes, ("dsa", "cka")):
        values = ax.get_images()[0].get_array()
        for i, model in enumerate(evaluation_.models):
            columns = [t.get_text().split("\n") for t in ax.get_xticklabels()]
            for row in model["trajectory"]:
                j = columns.index([f"teacher {row['teacher_layer']}", row["granularity"]])
                assert values[i, j] == pytest.approx(row[key], rel=1e-12)
    assert [t.get_text() for t in chart.figure.axes[0].get_yticklabels()] == ["teacher", "srkl-mta"]


def hand_importance_weights(states: np.ndarray) -> np.ndarray:
    """method.md §2 in float64: H / std over the hidden dim (N - 1), softmax of H H^T / sqrt(d) without the
    diagonal, mean over rows of the attention each token receives."""
    h = states / states.std(axis=1, ddof=1, keepdims=True)
    scores = h @ h.T / np.sqrt(h.shape[1])
    np.fill_diagonal(scores, -np.inf)
    attention = np.exp(scores - scores.max(axis=1, keepdims=True))
    attention /= attention.sum(axis=1, keepdims=True)
    return attention.mean(axis=0)


def test_cache_show_html_marks_spans_and_shades_tokens_by_weight(tmp_path, tiny_fp32_cache):
    page = tmp_path / "sample.html"
    result = cli("cache", "show", tiny_fp32_cache, "--sample", 2, "--layer", 3, "--html", page)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(page)
    sample = CacheReader(tiny_fp32_cache).sample(2, [3])
    body = sample_body(page.read_text())
    assert unescape(re.sub(r"<[^>]+>", "", body)) == sample.text  # the whole text, nothing added or lost
    assert body.count('class="w"') == len(sample.words)
    assert body.count('class="np"') + body.count('class="vp"') == len(sample.phrases)
    shown = {int(i): float(w) for i, w in re.findall(r'title="token (\d+): w = ([0-9.]+)"', body)}
    weights = hand_importance_weights(sample.states[3].double().numpy())  # over every token, the EOS included
    visible = [i for i, (start, end) in enumerate(sample.offsets) if end > start]  # the EOS has no text
    assert sorted(shown) == visible and len(visible) >= sample.n_tokens - 1
    assert [shown[i] for i in visible] == pytest.approx(weights[visible], abs=5e-5)  # printed to 4 places
    heaviest = int(weights.argmax())
    assert re.search(rf'background:rgba\(255,150,0,1\.000\)" title="token {heaviest}:', body)


def test_cache_show_html_names_the_layers_a_cache_holds(tmp_path, tiny_fp32_cache):
    result = cli("cache", "show", tiny_fp32_cache, "--html", tmp_path / "x.html", "--layer", 1)
    assert result.exit_code == 1
    assert "teacher layer(s) [1] are not in the cache" in result.stderr and "it holds layers [2, 3, 4]" in result.stderr


def test_report_refuses_what_it_cannot_read(tmp_path, runs):
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    result = cli("report", runs[0], stray, "--out", tmp_path / "r.html")
    assert result.exit_code == 1 and not (tmp_path / "r.html").exists()
    assert result.stderr.strip() == (f"error: {stray} is neither a training run (a folder with metrics.jsonl), an "
                                     "evaluation (the --json file of mta eval) nor a cache (a folder with zarr.json)")
    result = cli("report", runs[0])
    assert result.exit_code == 1 and "nothing to write: give --out report.html, --png DIR, or both" in result.stderr


def test_short_names_and_model_labels():
    assert short_names(["runs/a/student", "runs/b/student", "models/x/teacher.gguf", "org/model"]) == [
        "a/student", "b/student", "teacher.gguf", "model"]
    assert model_labels(["t=models/teacher.gguf", "runs/student", "HuggingFaceTB/SmolLM2-135M"]) == [
        ("t", "models/teacher.gguf"), ("student", "runs/student"), ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M")]
    with pytest.raises(ValueError, match="the name 'x' is used twice"):
        model_labels(["x=a", "x=b"])
