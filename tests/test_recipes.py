"""Recipes (`--config recipe.toml`): options from TOML tables, command-line flags over them, unknown keys and bad
values refused with the file and key named, and the effective configuration saved with what each command made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mta_cli.cache.store import open_root
from mta_cli.cli import app
from tests import tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    tiny.write_jsonl(path, tiny.RECORDS)
    return path


def test_a_pipeline_recipe_drives_extract_train_and_eval(tmp_path, tiny_teacher_dir, data_file):
    recipe = tmp_path / "pipeline.toml"
    recipe.write_text(f"""
[extract]
teacher = "{tiny_teacher_dir}"
data = "{data_file}"
layers = [2, 4]
dtype = "fp32"
max-length = 64
max_prompt_length = 32   # underscores work too
shard-size = 3
device = "cpu"

[train]
init-from-teacher = true
keep-layers = 2
loss = "sft"
lr = 3e-4
batch-size = 2
max-steps = 2
device = "cpu"

[eval]
model = ["{tiny_teacher_dir}"]
data = ["{data_file}"]
seeds = [10, 20]
max-new-tokens = 4
max-records = 2
device = "cpu"
""")
    cache = tmp_path / "cache.zarr"
    result = cli("extract", "--config", recipe, "--out", cache)
    assert result.exit_code == 0, result.output
    stored = open_root(str(cache), mode="r").attrs["mta"]["extract_config"]
    assert (stored["layers"], stored["dtype"], stored["max_length"], stored["max_prompt_length"], stored["shard_size"]) \
        == ([2, 4], "fp32", 64, 32, 3)

    run = tmp_path / "run"
    result = cli("train", "--config", recipe, "--cache", cache, "--out", run, "--lr", "1e-3")  # a flag overrides
    assert result.exit_code == 0, result.output
    record = json.loads((run / "training_config.json").read_text())
    assert record["objective"]["loss"] == "sft" and record["init_from_teacher"] is True
    assert (record["keep_layers"], record["batch_size"], record["max_steps"], record["lr"]) == (2, 2, 2, 1e-3)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    figures = tmp_path / "eval.json"
    result = cli("eval", "--config", recipe, "--model", f"student={run}", "--json", figures)
    assert result.exit_code == 0, result.output
    saved = json.loads(figures.read_text())
    assert [m["name"] for m in saved["models"]] == ["student"]  # the flag replaced the recipe's list
    assert saved["settings"]["seeds"] == [10, 20]
    config = saved["config"]
    assert config["model"] == [f"student={run}"] and config["data"] == [str(data_file)]
    assert (config["seeds"], config["max-new-tokens"], config["max-records"], config["json"]) == (
        "10,20", 4, 2, str(figures))
    assert config["greedy"] is False and "config" not in config


def test_later_recipes_override_earlier_ones(tmp_path, tiny_fp32_cache):
    base, variant = tmp_path / "base.toml", tmp_path / "variant.toml"
    base.write_text('[train]\nloss = "fkl"\nmax-steps = 1\nlr = 2e-4\ninit-from-teacher = true\nkeep-layers = 2\n'
                    'device = "cpu"\n')
    variant.write_text('[train]\nloss = "srkl"\nmta = true\nno-hid = true\n')
    run = tmp_path / "run"
    result = cli("train", "--config", base, "--config", variant, "--cache", tiny_fp32_cache, "--out", run)
    assert result.exit_code == 0, result.output
    record = json.loads((run / "training_config.json").read_text())
    assert record["objective"]["loss"] == "srkl" and record["objective"]["mta"] is True
    assert record["objective"]["use_hid"] is False and record["lr"] == 2e-4


@pytest.mark.parametrize("text,message", [
    ('[train]\nlearning-rate = 1e-4\n', "[train] unknown key 'learning-rate': not an option of `mta train`"),
    ('[train]\nlrr = 1e-4\n', "[train] unknown key 'lrr': not an option of `mta train` (did you mean 'lr'?)"),
    ('[train]\nbatch-size = "eight"\n', "[train] batch-size: Invalid value for '--batch-size'"),  # typer's words
    ('[train]\nbatch-size = 0\n', "[train] batch-size: Invalid value for '--batch-size'"),
    ('[trian]\nlr = 1e-4\n', "unknown key 'trian': a recipe holds the tables [extract], [train], [eval]"),
    ('lr = 1e-4\n', "unknown key 'lr': a recipe holds the tables [extract], [train], [eval]"),
    ('[eval]\nseeds = [10]\n', "no [train] table, so nothing in it applies to `mta train`"),
    ('[train\n', "not valid TOML"),
])
def test_a_bad_recipe_is_one_line_naming_the_file(text, message, tmp_path, tiny_fp32_cache):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    out = tmp_path / "never"
    result = cli("train", "--config", recipe, "--cache", tiny_fp32_cache, "--out", out)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and str(recipe) in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_missing_recipe_is_one_line(tmp_path):
    result = cli("eval", "--config", tmp_path / "nope.toml")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: --config {tmp_path / 'nope.toml'}: No such file or directory"


@pytest.mark.parametrize("recipe", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_the_example_recipes_hold_only_known_options(recipe):
    import tomllib

    tables = tomllib.loads(recipe.read_text())
    assert tables and set(tables) <= {"extract", "train", "eval"}
    for command in tables:
        result = cli(command, "--config", recipe, "--help")
        assert result.exit_code == 0, f"{recipe.name} [{command}]: {result.output}"
