"""Paired comparisons with bootstrap intervals (`mta eval --baseline`): hand-built cases against hand arithmetic
and an independent numpy bootstrap, reproducibility, the resampling unit, the JSON schema another program
reads, and the CLI's handling of the baseline and of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mta_cli.cli_eval import eval_command
from mta_cli.evaluation import FileResult, evaluate, with_baseline
from mta_cli.paired import Bootstrap, paired_comparison
from mta_cli.records import load_records
from tests import reference, tiny
from tests.test_eval import data_files, model_dirs  # noqa: F401 - fixtures

SEEDS = ("10", "20")
# Hand-built per-prompt figures: file a has 5 prompts, file b 3; ROUGE-L per seed, NLL per prompt.
MODEL = {"a.jsonl": ({"10": [30, 10, 50, 0, 20], "20": [10, 30, 40, 20, 0]}, [2.0, 3.0, 2.5, 4.0, 3.5]),
         "b.jsonl": ({"10": [50, 60, 70], "20": [40, 60, 80]}, [1.0, 1.5, 2.0])}
BASE = {"a.jsonl": ({"10": [20, 10, 30, 10, 0], "20": [10, 10, 20, 0, 10]}, [2.5, 3.0, 3.0, 3.0, 4.0]),
        "b.jsonl": ({"10": [50, 50, 50], "20": [50, 50, 50]}, [1.5, 1.5, 1.5])}
# By hand: per-prompt ROUGE-L differences, averaged over the two seeds
#   a: seed 10 (10, 0, 20, -10, 20), seed 20 (0, 20, 20, 20, -10) -> (5, 10, 20, 5, 5), mean 9
#   b: seed 10 (0, 10, 20), seed 20 (-10, 10, 30) -> (-5, 10, 25), mean 10
# NLL differences: a (-0.5, 0, -0.5, 1, -0.5), mean -0.1; b (-0.5, 0, 0.5), mean 0
HAND = {"a.jsonl": ([5, 10, 20, 5, 5], 9.0, [-0.5, 0.0, -0.5, 1.0, -0.5], -0.1),
        "b.jsonl": ([-5, 10, 25], 10.0, [-0.5, 0.0, 0.5], 0.0)}


def file_results(figures: dict) -> list[FileResult]:
    results = []
    for path, (rouge, nll) in figures.items():
        per_seed = {s: float(np.mean(v)) for s, v in rouge.items()}
        results.append(FileResult(file=path, sha256="-", n_records=len(nll), rougeL_mean=float(np.mean(
            list(per_seed.values()))), rougeL_std=0.0, rougeL_per_seed=per_seed,
            rougeL_per_record={s: [float(x) for x in v] for s, v in rouge.items()}, nll=float(np.mean(nll)),
            ppl=math.exp(np.mean(nll)), nll_per_record=list(nll), wall_s=0.0))
    return results


def numpy_bootstrap(differences: list[np.ndarray], samples: int, seed: int) -> tuple[list, list]:
    """Written here from the documented procedure: per file f, default_rng([seed, f]) draws (B, n) prompt
    indices; replicate means; percentiles 2.5 / 97.5. Returns per-file replicates and their mean over files."""
    replicates = []
    for f, d in enumerate(differences):
        d = np.asarray(d, dtype=float)
        idx = np.random.default_rng([seed, f]).integers(0, len(d), size=(samples, len(d)))
        replicates.append(d[idx].mean(axis=1))
    return replicates, np.mean(replicates, axis=0)


def test_hand_built_case_matches_hand_arithmetic_and_an_independent_bootstrap():
    boot = Bootstrap(bootstrap_samples=2000, bootstrap_seed=7)
    paired = paired_comparison(file_results(MODEL), file_results(BASE), "base", boot)
    assert paired["files"]["a.jsonl"]["rougeL_delta"] == pytest.approx(9.0, abs=1e-12)
    assert paired["files"]["b.jsonl"]["rougeL_delta"] == pytest.approx(10.0, abs=1e-12)
    assert paired["files"]["a.jsonl"]["nll_delta"] == pytest.approx(-0.1, abs=1e-12)
    assert paired["files"]["b.jsonl"]["nll_delta"] == pytest.approx(0.0, abs=1e-12)
    assert paired["average"]["rougeL_delta"] == pytest.approx(9.5, abs=1e-12)
    assert paired["average"]["nll_delta"] == pytest.approx(-0.05, abs=1e-12)
    # the ROUGE-L delta is the difference of the files' ROUGE-L means (mean over seeds of the record means)
    for m, b in zip(file_results(MODEL), file_results(BASE)):
        assert paired["files"][m.file]["rougeL_delta"] == pytest.approx(m.rougeL_mean - b.rougeL_mean, abs=1e-12)
    for name, column in (("rougeL", 0), ("nll", 2)):
        per_file, average = numpy_bootstrap([HAND[f][column] for f in HAND], 2000, 7)
        for f, reps in zip(HAND, per_file):
            assert paired["files"][f][f"{name}_ci95"] == list(np.percentile(reps, [2.5, 97.5]))
        assert paired["average"][f"{name}_ci95"] == list(np.percentile(average, [2.5, 97.5]))
    lo, hi = paired["files"]["a.jsonl"]["rougeL_ci95"]
    assert 5 <= lo < 9 < hi <= 20  # inside the range of the per-prompt differences, around their mean
    assert {f: e["n_prompts"] for f, e in paired["files"].items()} == {"a.jsonl": 5, "b.jsonl": 3}


def test_a_model_against_itself_is_exactly_zero():
    files = file_results(MODEL)
    paired = paired_comparison(files, files, "m", Bootstrap())
    for entry in [*paired["files"].values(), paired["average"]]:
        assert entry["rougeL_delta"] == 0.0 and entry["nll_delta"] == 0.0
        assert entry["rougeL_ci95"] == [0.0, 0.0] and entry["nll_ci95"] == [0.0, 0.0]


def test_the_resampling_unit_is_the_prompt_with_its_seeds_together():
    """Every prompt gains 10 under seed 10 and loses 10 under seed 20: each prompt's difference is 0, so
    resampling prompts gives exactly [0, 0], where resampling (prompt, seed) pairs would not."""
    model = {"f": ({"10": [10.0] * 6, "20": [0.0] * 6}, [1.0] * 6)}
    base = {"f": ({"10": [0.0] * 6, "20": [10.0] * 6}, [1.0] * 6)}
    paired = paired_comparison(file_results(model), file_results(base), "base", Bootstrap())
    assert paired["files"]["f"]["rougeL_ci95"] == [0.0, 0.0]
    pairs = np.array([10.0] * 6 + [-10.0] * 6)  # the (prompt, seed) differences
    idx = np.random.default_rng([0, 0]).integers(0, 12, size=(10_000, 12))
    assert np.percentile(pairs[idx].mean(axis=1), 97.5) > 4  # what pair resampling would have claimed


def random_case(seed: int) -> dict:
    """Two files of 30 and 20 prompts with continuous scores: intervals that any change of the draws moves."""
    rng = np.random.default_rng(seed)
    return {f"{name}.jsonl": ({s: list(rng.uniform(0, 60, n)) for s in SEEDS}, list(rng.uniform(1, 4, n)))
            for name, n in (("a", 30), ("b", 20))}


def test_the_bootstrap_is_reproducible_and_follows_its_seed():
    model, base = file_results(random_case(1)), file_results(random_case(2))
    first = paired_comparison(model, base, "base", Bootstrap(bootstrap_seed=3))
    assert paired_comparison(model, base, "base", Bootstrap(bootstrap_seed=3)) == first
    other = paired_comparison(model, base, "base", Bootstrap(bootstrap_seed=4))
    assert other["files"]["a.jsonl"]["rougeL_ci95"] != first["files"]["a.jsonl"]["rougeL_ci95"]
    assert other["average"]["nll_ci95"] != first["average"]["nll_ci95"]
    assert other["average"]["rougeL_delta"] == first["average"]["rougeL_delta"]  # the estimate has no randomness
    fewer = paired_comparison(model, base, "base", Bootstrap(bootstrap_samples=500, bootstrap_seed=3))
    assert fewer["files"]["a.jsonl"]["rougeL_ci95"] != first["files"]["a.jsonl"]["rougeL_ci95"]
    # files are resampled independently: file a's interval does not depend on file b
    alone = paired_comparison(model[:1], base[:1], "base", Bootstrap(bootstrap_seed=3))
    assert alone["files"]["a.jsonl"] == first["files"]["a.jsonl"]


@pytest.mark.parametrize("options, message", [
    ({"bootstrap_samples": 99}, "--bootstrap-samples must be an integer >= 100 and <= 100000, got 99"),
    ({"bootstrap_samples": 2.5}, "--bootstrap-samples must be an integer"),
    ({"bootstrap_seed": -1}, "--bootstrap-seed must be an integer >= 0"),
])
def test_bootstrap_settings_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        Bootstrap(**options)


def test_mismatched_evaluations_cannot_be_paired():
    model, base = file_results(MODEL), file_results(BASE)
    base[0].rougeL_per_record = {"10": base[0].rougeL_per_record["10"]}
    with pytest.raises(ValueError, match="a.jsonl: the model and the baseline were not sampled with the same seeds"):
        paired_comparison(model, base, "base", Bootstrap())
    base = file_results(BASE)
    base[1].nll_per_record[2] = None
    with pytest.raises(ValueError, match="b.jsonl: a record has no response token left after truncation"):
        paired_comparison(model, base, "base", Bootstrap())


# --- through evaluate and the CLI -----------------------------------------------------------------------------


def eval_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(eval_command)
    return app


def test_a_model_listed_twice_is_exactly_zero_against_itself(model_dirs, data_files):
    """End to end: the same model generates the same text with the same seeds, and scores the same NLL."""
    report = evaluate([model_dirs[0], model_dirs[0]], data_files, seeds=(10, 20), max_new_tokens=8, device="cpu",
                      baseline=model_dirs[0], bootstrap_samples=200)
    assert report.models[0].paired is None
    average = report.models[1].paired["average"]
    assert average == {"rougeL_delta": 0.0, "rougeL_ci95": [0.0, 0.0], "nll_delta": 0.0, "nll_ci95": [0.0, 0.0]}


def test_eval_json_schema_and_per_record_figures(tmp_path, model_dirs, data_files, bl_tok):
    out = tmp_path / "eval.json"
    args = ["--model", model_dirs[0], "--model", model_dirs[1], "--baseline", model_dirs[0], "--data", data_files[0],
            "--data", data_files[1], "--seeds", "10,20", "--max-new-tokens", "16", "--batch-size", "2", "--device",
            "cpu", "--bootstrap-samples", "500", "--bootstrap-seed", "5", "--json", str(out)]
    result = CliRunner().invoke(eval_app(), args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    base, other = figures["models"]
    assert base["paired"] is None
    paired = other["paired"]
    assert set(paired) == {"baseline", "unit", "bootstrap_samples", "bootstrap_seed", "files", "average"}
    assert paired["baseline"] == base["model"] == model_dirs[0]
    assert (paired["unit"], paired["bootstrap_samples"], paired["bootstrap_seed"]) == ("prompt", 500, 5)
    assert list(paired["files"]) == data_files
    for entry in paired["files"].values():
        assert set(entry) == {"rougeL_delta", "rougeL_ci95", "nll_delta", "nll_ci95", "n_prompts"}
        assert isinstance(entry["n_prompts"], int)
        for name in ("rougeL", "nll"):
            assert isinstance(entry[f"{name}_delta"], float)
            lo, hi = entry[f"{name}_ci95"]
            assert isinstance(lo, float) and isinstance(hi, float) and lo <= hi
    assert set(paired["average"]) == {"rougeL_delta", "rougeL_ci95", "nll_delta", "nll_ci95"}
    settings = {k: figures["settings"][k] for k in ("baseline", "bootstrap_samples", "bootstrap_seed")}
    assert settings == {"baseline": model_dirs[0], "bootstrap_samples": 500, "bootstrap_seed": 5}

    # the per-record figures: ROUGE-L as in the generations file, NLL from each record's own forward
    rows = [json.loads(line) for line in (tmp_path / "eval.generations.jsonl").read_text().splitlines()]
    differences = {"rougeL": [], "nll": []}
    for m in figures["models"]:
        for f in m["files"]:
            assert list(f["rougeL_per_record"]) == ["10", "20"]
            for seed, scores in f["rougeL_per_record"].items():
                assert scores == [r["rougeL"] for r in rows if (r["model"], r["file"], r["seed"]) ==
                                  (m["model"], f["file"], int(seed))]
            assert len(f["nll_per_record"]) == f["n_records"]
            assert all(isinstance(x, float) for x in f["nll_per_record"])
    assert any(x > 0 for f in other["files"] for s in f["rougeL_per_record"].values() for x in s)
    model = tiny.tiny_llama(bl_tok, seed=2)  # model_dirs[1]
    first = other["files"][0]
    records = load_records(first["file"], tokenizer=bl_tok).records
    assert first["nll_per_record"] == pytest.approx([reference.response_nll(model, bl_tok, [r]) for r in records], rel=1e-5)

    # the paired figures recomputed from the per-record figures alone, with the documented bootstrap
    for m_file, b_file in zip(other["files"], base["files"]):
        rouge = np.mean([np.subtract(m_file["rougeL_per_record"][s], b_file["rougeL_per_record"][s])
                         for s in ("10", "20")], axis=0)
        differences["rougeL"].append(rouge)
        differences["nll"].append(np.subtract(m_file["nll_per_record"], b_file["nll_per_record"]))
    for name in ("rougeL", "nll"):
        per_file, average = numpy_bootstrap(differences[name], 500, 5)
        for path, d, reps in zip(data_files, differences[name], per_file):
            assert paired["files"][path][f"{name}_delta"] == pytest.approx(d.mean(), abs=1e-12)
            assert paired["files"][path][f"{name}_ci95"] == pytest.approx(list(np.percentile(reps, [2.5, 97.5])),
                                                                          abs=1e-12)
        assert paired["average"][f"{name}_ci95"] == pytest.approx(list(np.percentile(average, [2.5, 97.5])),
                                                                  abs=1e-12)
    for m_file, b_file in zip(other["files"], base["files"]):
        assert paired["files"][m_file["file"]]["rougeL_delta"] == pytest.approx(
            m_file["rougeL_mean"] - b_file["rougeL_mean"], abs=1e-9)

    assert "ΔROUGE-L [95% CI]" in result.stdout and "ΔNLL/prompt [95% CI]" in result.stdout
    assert "baseline" in result.stdout and "500 resamples, seed 5" in result.stdout


def test_a_baseline_is_matched_however_spelled_or_added_first(model_dirs):
    assert with_baseline(model_dirs, model_dirs[1] + "/") == (model_dirs, 1)
    assert with_baseline(model_dirs[1:], model_dirs[0]) == (model_dirs, 0)


def test_cli_baseline_not_among_the_models_is_evaluated_first(tmp_path, model_dirs, data_files):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(eval_app(), ["--model", model_dirs[1], "--baseline", model_dirs[0], "--data",
                                             data_files[1], "--seeds", "10", "--max-new-tokens", "4", "--device",
                                             "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    assert [m["model"] for m in models] == [model_dirs[0], model_dirs[1]]
    assert models[0]["paired"] is None and models[1]["paired"]["baseline"] == model_dirs[0]


@pytest.mark.parametrize("extra, message", [
    (["--bootstrap-samples", "5"], "--bootstrap-samples must be an integer >= 100 and <= 100000, got 5"),
    (["--bootstrap-seed", "-1"], "--bootstrap-seed must be an integer >= 0 and <= 9.22337e+18, got -1"),
    (["--baseline", "{tmp}/missing/model"], "{tmp}/missing/model: no such file or folder; check the path"),
    (["--baseline", "{model}"], "--baseline {model}: nothing to compare with it; pass at least one other --model"),
    (["--baseline", "{model}", "--model", "{model}", "--data", "{data}"],
     "--baseline compares per data file: give each --data file once"),
])
def test_cli_bad_input_is_one_line(extra, message, tmp_path, model_dirs, data_files):
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, model=model_dirs[0], data=data_files[0])

    args = ["--model", model_dirs[0], "--data", data_files[0], "--device", "cpu"] + [fill(a) for a in extra]
    result = CliRunner().invoke(eval_app(), args)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"error: {fill(message)}\n"
