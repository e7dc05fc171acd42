"""Training that refuses what it cannot do right: a resume with another configuration, a teacher that is not
the cache's, options out of range, a run that diverges or has no optimizer step; the default key layers
fit every student depth; mistyped model paths fail at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.losses import pair_teacher_layers
from mta_cli.models import ModelLoadError
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.run_folder import run_config as record_of
from mta_cli.training.source import same_teacher
from mta_cli.training.trainer import TrainConfig, TrainingDiverged, train
from tests import tiny
from tests.test_cache import cli, config, data_file, good  # noqa: F401 - fixtures


def run_config(out, cache, **options) -> TrainConfig:
    objective = options.pop("objective", ObjectiveConfig(loss="srkl"))
    settings = dict(init_from_teacher=True, keep_layers=2, batch_size=2, max_steps=2, checkpoint_every=0,
                    device="cpu") | options
    return TrainConfig(out=str(out), cache=str(cache), objective=objective, **settings)


def train_args(cache, out, *extra) -> list:
    return ["train", "--cache", cache, "--out", out, "--init-from-teacher", "--keep-layers", 2, "--batch-size", 2,
            "--max-steps", 2, "--device", "cpu", *extra]


# --- 3. --resume continues only the same configuration ----------------------------------------------------


def test_resume_with_another_configuration_is_refused_and_the_record_kept(tmp_path, good):
    out = tmp_path / "run"
    assert cli(*train_args(good, out, "--checkpoint-every", 1)).exit_code == 0
    record = (out / "training_config.json").read_text()
    other_cache = shutil.copytree(good, tmp_path / "other.zarr")
    for cache, extra, difference in [
            (good, ["--lr", "1e-3"], "lr: run has 0.0001, this command has 0.001"),
            (good, ["--loss", "fkl"], 'objective.loss: run has "srkl", this command has "fkl"'),
            (good, ["--batch-size", 4], "batch_size: run has 2, this command has 4"),
            (other_cache, [], f'cache: run has "{good}", this command has "{other_cache}"'),
            (good, ["--cache", other_cache], f'cache: run has "{good}", this command has ["{good}", "{other_cache}"]')]:
        args = train_args(cache, out, "--resume", "--checkpoint-every", 1, *extra)
        result = cli(*args)
        assert result.exit_code == 1 and "trained with a different configuration" in result.stderr, extra
        assert difference in result.stderr, (extra, result.stderr)
        assert (out / "training_config.json").read_text() == record
    # extending the run is what --resume is for
    result = cli(*train_args(good, out, "--resume", "--checkpoint-every", 1, "--max-steps", 3, "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 3
    assert json.loads((out / "training_config.json").read_text())["max_steps"] == 3


def test_a_record_without_newer_options_resumes_and_compile_loss_may_change(tmp_path, good):
    """A run recorded before an option existed holds that option's default; --compile-loss only changes speed."""
    out = tmp_path / "run"
    assert cli(*train_args(good, out, "--checkpoint-every", 1)).exit_code == 0
    path = out / "training_config.json"
    record = json.loads(path.read_text())
    del record["report_to"], record["objective"]["compile_loss"], record["objective"]["akl_mu"]
    path.write_text(json.dumps(record))
    result = cli(*train_args(good, out, "--resume", "--checkpoint-every", 1, "--max-steps", 3, "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 3
    path.write_text(json.dumps(record))  # an older record again, now against a non-default value
    result = cli(*train_args(good, out, "--resume", "--checkpoint-every", 1, "--max-steps", 3, "--akl-mu", 0.7))
    assert result.exit_code == 1 and "objective.akl_mu: run has 0.5, this command has 0.7" in result.stderr


def test_a_failed_first_attempt_does_not_block_the_same_command(tmp_path, good, monkeypatch):
    out = tmp_path / "run"
    import mta_cli.training.trainer as trainer

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "model.safetensors"))

    monkeypatch.setattr(trainer, "save_student", broken)
    result = cli(*train_args(good, out, "--checkpoint-every", 0))  # fails before anything resumable is written
    assert result.exit_code == 1 and "No space left on device; free some space" in result.stderr
    assert (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    result = cli(*train_args(good, out, "--checkpoint-every", 0, "--json"))
    assert result.exit_code == 0, result.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_folder_of_other_files_is_not_a_run_folder(tmp_path, good):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "paper.txt").write_text("x")
    result = cli(*train_args(good, out))
    assert result.exit_code == 1 and "holds files that are not an mta run (paper.txt)" in result.stderr


# --- 4 / 5. model paths: missing paths at once, a moved teacher found by --teacher and its fingerprint --------


@pytest.mark.parametrize("spec, message", [
    ("./nope_dir/", "./nope_dir/: no such file or folder; check the path"),
    ("runs/srkl-typo", "runs/srkl-typo: no such folder, and no model of that name in the local Hugging Face cache"),
    ("/tmp/absent/model", "/tmp/absent/model: no such file or folder"),
    ("missing.gguf", "missing.gguf: no such GGUF file"),
])
def test_a_mistyped_model_fails_at_once_with_what_to_do(spec, message, tmp_path, good, data_file):
    commands = [["eval", "--model", spec, "--data", data_file, "--max-records", 1],
                ["extract", "--teacher", spec, "--data", data_file, "--out", tmp_path / "c.zarr"],
                ["train", "--cache", good, "--student", spec, "--out", tmp_path / "run"]]
    for command in commands:
        started = time.perf_counter()
        result = cli(*command)
        assert result.exit_code == 1 and message in result.stderr, (command, result.stderr)
        assert time.perf_counter() - started < 10 and "Traceback" not in result.stderr
        assert "MTA_ALLOW_DOWNLOAD=1" in result.stderr or "check the path" in result.stderr


@pytest.fixture(scope="module")
def moved(tmp_path_factory, bl_tok, data_file) -> dict:
    """A cache extracted from a teacher that has since moved, and a different model of the same shape."""
    base = tmp_path_factory.mktemp("moved")
    teacher = tiny.save_tiny_model(base / "teacher", bl_tok, tiny.tiny_llama(bl_tok))
    other = tiny.save_tiny_model(base / "other", bl_tok, tiny.tiny_llama(bl_tok, seed=1))
    cache = base / "cache.zarr"
    extract(ExtractConfig(teacher=str(teacher), data=str(data_file), out=str(cache), skip_invalid=True, shard_size=3,
                          max_length=64, max_prompt_length=32, device="cpu"))
    new_home = base / "models" / "teacher"
    new_home.parent.mkdir()
    teacher.rename(new_home)
    copied = Path(shutil.copytree(cache, base / "elsewhere" / "cache.zarr"))
    return {"cache": copied, "stored": teacher, "teacher": new_home, "other": other}


def test_a_moved_teacher_is_named_and_found_by_teacher(tmp_path, moved):
    result = cli(*train_args(moved["cache"], tmp_path / "a"))
    assert result.exit_code == 1
    assert f"the cache's teacher {moved['stored']} is not there (moved or deleted?); pass --teacher PATH" in result.stderr
    events = []
    summary = train(run_config(tmp_path / "b", moved["cache"], teacher=str(moved["teacher"])),
                    progress=lambda event, info: events.append((event, info)))
    assert summary.steps == 2
    start = next(info for event, info in events if event == "start")
    assert start["notes"] == [f"teacher: {moved['teacher']} in place of the cache's {moved['stored']} "
                              "(weights fingerprint checked)"]


def test_another_model_in_the_teachers_place_is_refused(tmp_path, moved):
    with pytest.raises(ModelLoadError, match=r"is not the teacher of the cache .*weights fingerprint"):
        train(run_config(tmp_path / "a", moved["cache"], teacher=str(moved["other"])))
    shutil.copytree(moved["other"], moved["stored"])  # a different model at the stored path itself
    try:
        with pytest.raises(ModelLoadError, match="weights fingerprint"):
            train(run_config(tmp_path / "b", moved["cache"]))
    finally:
        shutil.rmtree(moved["stored"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- 6. the default key layers fit every student depth ----------------------------------------------------


@pytest.fixture(scope="module")
def six_layer_cache(tmp_path_factory, bl_tok, data_file) -> Path:
    base = tmp_path_factory.mktemp("six")
    teacher = tiny.save_tiny_model(base / "teacher", bl_tok, tiny.tiny_llama(bl_tok, n_layers=6))
    cache = base / "cache.zarr"
    extract(ExtractConfig(teacher=str(teacher), data=str(data_file), out=str(cache), skip_invalid=True, shard_size=4,
                          max_length=64, max_prompt_length=32, device="cpu"))
    return cache


@pytest.mark.parametrize("depth", range(1, 7))
def test_default_mta_trains_every_student_depth_of_a_default_cache(depth, tmp_path, six_layer_cache):
    summary = train(run_config(tmp_path / "run", six_layer_cache, keep_layers=depth, max_steps=1,
                               objective=ObjectiveConfig(loss="srkl", mta=True)))
    expected = pair_teacher_layers([3, 4, 6], depth, 6)  # the default extraction stores layers 3, 4 and 6
    assert [tuple(k) for k in summary.key_layers] == expected
    students = [s for s, _, _ in expected]
    assert students == sorted(set(students)) and expected[-1][:2] == (depth, 6)
    assert [g for _, _, g in expected] == ["word"] + ["phrase"] * (len(expected) - 1)
    assert summary.key_layers_from == "the cache's layers [3, 4, 6], at matching depths"
    assert summary.final["dsa"] >= 0 and summary.final["hid"] > 0


# --- 7. numeric options are validated, with their range -------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr must be a finite number >= 0, got -1.0"),
    ("--lr", "nan", "--lr must be a finite number >= 0, got nan"),
    ("--projector-lr", "inf", "--projector-lr must be a finite number >= 0, got inf"),
    ("--lambda-hid", "inf", "--lambda-hid must be a finite number >= 0 and <= 1e+06, got inf"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
    ("--max-grad-norm", "0", "--max-grad-norm must be a finite number > 0, got 0.0"),
    ("--teacher-layers", "2,4", "--teacher-layers choose the key layers of MTA and FDD; add --mta"),
    # ranges the option itself declares (shown in --help) are refused by the command line parser
    ("--kd-alpha", "nan", "Invalid value for '--kd-alpha': Input should be less than or equal to 1"),
    ("--temperature", "-2", "Invalid value for '--temperature': Input should be greater than or equal to 0.001"),
    ("--batch-size", "0", "Invalid value for '--batch-size': Input should be greater than or equal to 1"),
])
def test_bad_numeric_options_are_refused_before_anything_loads(flag, value, message, tmp_path, good):
    result = cli(*train_args(good, tmp_path / "run", flag, value))
    text = " ".join(result.stderr.replace("│", " ").split())  # the parser's message sits in a box
    assert result.exit_code in (1, 2) and message in text, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("grad_accum", 1.5), ("epochs", -1), ("max_steps", 0),
                                          ("warmup_ratio", 2.0), ("max_prompt_length", 600), ("seed", -3)])
def test_the_config_dataclasses_validate_too(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be"):
        TrainConfig(out="run", cache="c.zarr", **{field: value})


@pytest.mark.parametrize("field, value", [("max_length", 1), ("shard_size", 0), ("top_k", -1), ("batch_size", 0),
                                          ("dtype", "fp8"), ("words", "some")])
def test_extract_config_validates(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be"):
        ExtractConfig(teacher="t", data="d.jsonl", out="c.zarr", **{field: value})


# --- divergence and plans without a step ------------------------------------------------------------------


def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_saves_nothing_else(tmp_path, good):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(run_config(out, good, lr=1e6, max_steps=20, checkpoint_every=1))
    message = str(caught.value)
    bad_step = int(message.split(":")[0].removeprefix("step "))
    assert "went non-finite" in message and bad_step >= 2
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{bad_step - 1:06d}" and f"the last good checkpoint is {out}" in message
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, bad_step))
    result = cli(*train_args(good, tmp_path / "cli", "--lr", "1e6", "--max-steps", 20))
    assert result.exit_code == 1 and "went non-finite" in result.stderr and "Traceback" not in result.stderr


def test_a_plan_with_no_optimizer_step_is_refused(tmp_path, good):
    with pytest.raises(ValueError, match=r"--grad-accum 100 needs 100 batches per optimizer step, but 1 epoch\(s\) "
                                         r"give \d batches of up to 2: no optimizer step would run"):
        train(run_config(tmp_path / "run", good, grad_accum=100, max_steps=None))
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_batch_larger_than_two_shards_is_honoured(tmp_path, good):
    from mta_cli.cache.reader import CacheReader
    from mta_cli.training.batches import CacheBatches

    reader = CacheReader(good)  # 8 samples in shards of 3, 3 and 2
    plan = CacheBatches(reader, batch_size=7, layers=[4], seed=0, pad_id=0).epoch_plan(0)
    sizes = [len(b) for _, batches in plan for b in batches]
    assert sizes == [7, 1] or sizes == [1, 7]
    assert [len(b) for _, batches in CacheBatches(reader, 1000, [4], 0, 0).epoch_plan(0) for b in batches] == [8]


def test_the_train_summary_shows_a_small_final_learning_rate(tmp_path, good):
    result = cli(*train_args(good, tmp_path / "run", "--lr", "2e-4", "--max-steps", 3, "--warmup-ratio", "0"))
    assert result.exit_code == 0, result.stderr
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert 0 < final < 1e-4
    assert f"{final:.3g}" in result.stdout and "final lr │ 0.000" not in result.stdout


# --- options that would be ignored, caches that do not fit together ---------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--dev-cache", "dev.zarr"], "--dev-cache: only used by --student-data adaptive"),
    (["--eval-every", "5"], "--eval-every: only used by --student-data adaptive"),
    (["--student-data-eps", "0.3"], "--student-data-eps: only used by --student-data adaptive"),
    (["--loss", "fdd", "--compile-loss"], "--loss fdd does not use it: drop --compile-loss"),
    (["--loss", "fkl", "--topk", "--compile-loss"], "--topk does not use it: drop --compile-loss"),
])
def test_options_that_would_be_ignored_are_refused(extra, message, tmp_path, good):
    result = cli(*train_args(good, tmp_path / "run", *extra))
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_distillm2_without_student_generated_data_is_refused(tmp_path, good):
    result = cli(*train_args(good, tmp_path / "run", "--loss", "distillm2"))
    assert result.exit_code == 1, result.stderr
    assert "--loss distillm2 contrasts" in result.stderr and "mta generate" in result.stderr


def test_topk_needs_top_k_log_probs_in_every_cache(tmp_path, good, tiny_teacher_dir, data_file):
    topk = tmp_path / "topk.zarr"
    extract(config(tiny_teacher_dir, data_file, topk, top_k=8))
    assert cli(*train_args(topk, tmp_path / "one", "--loss", "fkl", "--topk")).exit_code == 0
    result = cli(*train_args(topk, tmp_path / "two", "--cache", good, "--loss", "fkl", "--topk"))
    assert result.exit_code == 1 and "(or one of its caches) has none" in result.stderr, result.stderr


def test_a_dev_cache_of_another_teacher_is_named_as_the_dev_cache(good, six_layer_cache):
    with pytest.raises(CacheError, match=f"--cache {good} and --dev-cache {six_layer_cache} come from different"):
        same_teacher([CacheReader(str(good)), CacheReader(str(six_layer_cache))], "--dev-cache")


def test_the_dev_cache_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev.zarr").mkdir()
    settings = TrainConfig(out="run", cache="c.zarr", student_data="adaptive", dev_cache="dev.zarr", eval_every=2)
    assert record_of(settings)["dev_cache"] == str(tmp_path / "dev.zarr")


@pytest.mark.parametrize("keep, kept", [(2, ["step-000003", "step-000004"]), (1, ["step-000004"]),
                                        (0, ["step-000001", "step-000002", "step-000003", "step-000004"])])
def test_only_the_newest_checkpoints_are_kept(keep, kept, tmp_path, good):
    train(run_config(tmp_path / "run", good, max_steps=4, checkpoint_every=1, keep_checkpoints=keep))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == kept


# --- --compile-loss: off unless asked (it no longer pays on the CPU measured) -------------------------------


def test_the_loss_is_compiled_only_when_asked(tmp_path, good, monkeypatch):
    """With --compile-loss the chunk loss runs through the compiled function (replaced here by a recording
    eager one, to keep the test fast); by default, and with --no-compile-loss, it does not."""
    from mta_cli.losses import closed_form

    calls = []

    def recording():
        def compute(*args):
            calls.append(len(args[1]))
            return closed_form.sums_and_gradients(*args)
        return compute

    monkeypatch.setattr(closed_form, "compiled_sums_and_gradients", recording)
    assert ObjectiveConfig(loss="srkl").compile_loss is False
    train(run_config(tmp_path / "default", good))
    train(run_config(tmp_path / "off", good, objective=ObjectiveConfig(loss="srkl", compile_loss=False)))
    assert calls == []
    train(run_config(tmp_path / "on", good, objective=ObjectiveConfig(loss="srkl", compile_loss=True)))
    assert calls and all(n > 0 for n in calls)
