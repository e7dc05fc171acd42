"""`mta train --data FILE --loss sft` without a cache and without a teacher forward: the papers' SFT baseline
and their teacher fine-tuning step, on tiny models (CPU, no download).

Proven here: the logged loss is the cross-entropy of the response tokens computed independently (float64,
by hand-found response positions) for both student sources (`--student`, and `--teacher T
--init-from-teacher`, where the teacher only initialises); no teacher forward and no spaCy run; resume is
bit-exact (a GPT-2 student with dropout, with a negative control); --max-length / --max-prompt-length are
honoured; the refused combinations say what to pass; training lowers the reference NLL.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mta_cli.evaluation import reference_nll
from mta_cli.models import load_causal_lm, load_tokenizer
from mta_cli.records import load_records
from mta_cli.student import prune_layers
from mta_cli.training import data as data_module
from mta_cli.training import source as source_module
from mta_cli.training.data import DataBatches
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.source import Source, source_kind
from mta_cli.training.trainer import TrainConfig, train
from tests import reference, tiny
from tests.test_train import assert_same_tensors, metrics, resume_scenario, run_cli

RECORDS = tiny.RECORDS


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft-data") / "train.jsonl"
    tiny.write_jsonl(path, RECORDS)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, bl_tok) -> Path:
    """A GPT-2 student (dropout 0.1) with the byte-level tokenizer."""
    return tiny.save_tiny_model(tmp_path_factory.mktemp("gpt2"), bl_tok, tiny.tiny_gpt2(bl_tok))


def sft(out, data, **options) -> TrainConfig:
    settings = {"batch_size": 2, "seed": 0, "device": "cpu", "checkpoint_every": 0} | options
    return TrainConfig(out=str(out), data=str(data), objective=ObjectiveConfig(loss="sft"), **settings)


def no_teacher_runs(monkeypatch) -> None:
    """Make any teacher forward, live-teacher load or spaCy parse fail the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("SFT on --data must not run a teacher or spaCy")

    monkeypatch.setattr(data_module, "teacher_forward", forbidden)
    monkeypatch.setattr(source_module, "Segmenter", forbidden)
    monkeypatch.setattr(source_module, "load_causal_lm", forbidden)


@pytest.mark.parametrize("student_source", ["student", "init_from_teacher"])
def test_sft_loss_is_the_independent_cross_entropy(student_source, tmp_path, data_file, tiny_teacher_dir, bl_tok,
                                                   monkeypatch):
    """One batch holding every record (so its order does not matter): step 1's logged loss, computed before the
    first update, is the CE of the untouched student on all response tokens; no teacher or spaCy runs."""
    no_teacher_runs(monkeypatch)
    teacher = load_causal_lm(str(tiny_teacher_dir))
    if student_source == "student":
        options, initial = {"student": str(tiny_teacher_dir)}, teacher
    else:
        options = {"teacher": str(tiny_teacher_dir), "init_from_teacher": True, "keep_layers": 2}
        initial = prune_layers(copy.deepcopy(teacher), 2)
    run = tmp_path / "run"
    summary = train(sft(run, data_file, batch_size=len(RECORDS), max_steps=1, **options))
    row = metrics(run)[0]
    assert set(row) >= {"loss", "ce"} and not set(row) & {"kd", "dsa", "hid"}
    expected = reference.response_nll(initial.eval(), bl_tok, load_records(str(data_file)).records)
    assert expected > 3.0  # a random model: far from 0, the comparison is not between two tiny numbers
    assert row["ce"] == pytest.approx(expected, rel=1e-5)
    assert row["loss"] == row["ce"]
    assert summary.key_layers == []
    saved = AutoModelForCausalLM.from_pretrained(run)
    assert saved.config.num_hidden_layers == (4 if student_source == "student" else 2)
    assert not torch.equal(saved.lm_head.weight, initial.lm_head.weight)  # it trained


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, data_file, gpt2_dir) -> dict:
    """A GPT-2 student with dropout, 4 batches per epoch, 6 steps: interrupted at step 3, resumed from step 2."""
    def make(out, **options):
        return sft(out, data_file, student=str(gpt2_dir), max_steps=6, checkpoint_every=2, lr=1e-3, **options)
    return resume_scenario(tmp_path_factory.mktemp("sft-runs"), make, stop=3, check_negative=True)


def test_sft_resume_is_bit_exact(sft_runs):
    r = sft_runs
    full, cut = r["base"] / "full", r["base"] / "cut"
    assert r["after_cut"]["checkpoints"] == ["step-000002"] and not r["after_cut"]["final_saved"]
    assert r["resumed"].resumed_from == str(cut / "checkpoints" / "step-000002")
    assert r["full"].steps == r["resumed"].steps == 6
    assert [m["epoch"] for m in metrics(full)] == [0, 0, 0, 0, 1, 1]  # the resumed run crosses an epoch
    assert_same_tensors(load_file(full / "model.safetensors"), load_file(cut / "model.safetensors"), "final student")
    for name in ("model", "optimizer", "rng"):
        assert_same_tensors(load_file(full / "checkpoints" / "step-000006" / f"{name}.safetensors"),
                            load_file(cut / "checkpoints" / "step-000006" / f"{name}.safetensors"), name)
    timing = {"step_seconds", "tokens_per_second"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(full))
    # the negative control: dropout makes a resume without the RNG state differ, so the check above can fail
    assert r["student"].config.resid_pdrop > 0
    other = load_file(r["base"] / "cut-no-rng" / "model.safetensors")
    assert any(not torch.equal(v, other[k]) for k, v in load_file(full / "model.safetensors").items())


def test_max_length_and_max_prompt_length_are_honoured(data_file, bl_tok, tmp_path):
    """Every sample fits --max-length, keeps at most --max-prompt-length prompt tokens (the byte-level tokenizer
    adds no BOS), and at least one record was cut by each limit; the run trains on them."""
    batches = DataBatches(bl_tok, str(data_file), 3, seed=0, max_length=14, max_prompt_length=5)
    assert len(batches.samples) == len(RECORDS) and batches.dropped == 0
    full = [len(bl_tok(r.text)["input_ids"]) + 1 for r in load_records(str(data_file)).records]  # + EOS
    prompts = [len(bl_tok(r["prompt"])["input_ids"]) for r in RECORDS]
    assert max(full) > 14 and max(prompts) > 5
    assert all(len(s.input_ids) <= 14 and s.n_prompt_tokens <= 5 for s in batches.samples)
    widths = [b.input_ids.shape[1] for b in batches.iterate(0)]
    assert len(widths) == 3 and max(widths) <= 14
    summary = train(sft(tmp_path / "run", data_file, student=str(tiny.save_tiny_model(
        tmp_path / "student", bl_tok, tiny.tiny_llama(bl_tok, n_layers=2, hidden=32))), max_length=14,
        max_prompt_length=5, max_steps=2))
    assert summary.steps == 2 and all(row["tokens"] <= 2 * 14 for row in metrics(tmp_path / "run"))


def test_records_without_a_response_token_are_dropped_and_said(data_file, sp_tok, tmp_path):
    """With a BOS tokenizer, --max-length 2 --max-prompt-length 1 leaves BOS + one prompt token: no response."""
    student = tiny.save_tiny_model(tmp_path / "student", sp_tok, tiny.tiny_llama(sp_tok, n_layers=2, hidden=32))
    config = sft(tmp_path / "run", data_file, student=str(student), max_length=2, max_prompt_length=1)
    source = Source(config, torch.device("cpu"))
    batches = source.batches(load_tokenizer(str(student)), [], own_tokenizer=False)
    assert batches.dropped == len(RECORDS) and batches.samples == []
    assert source.notes == [f"{data_file}: {len(RECORDS)} record(s) dropped, no response token left within "
                            "--max-length 2 / --max-prompt-length 1"]
    with pytest.raises(ValueError, match="the data gives no batch"):
        train(sft(tmp_path / "run", data_file, student=str(student), max_length=2, max_prompt_length=1))


def test_sft_lowers_the_reference_nll(tmp_path, data_file, bl_tok):
    """A random-init tiny Llama trained by SFT on the tiny records (50 steps): their reference NLL, near
    log(vocabulary) = 6.0 before, falls by more than a third (measured: 6.0 -> 2.6)."""
    student = tiny.save_tiny_model(tmp_path / "student", bl_tok, tiny.tiny_llama(bl_tok, n_layers=2, hidden=32))
    records = load_records(str(data_file)).records
    before = reference_nll(load_causal_lm(str(student)), bl_tok, records).nll
    train(sft(tmp_path / "run", data_file, student=str(student), batch_size=4, epochs=25, lr=5e-3, warmup_ratio=0.0))
    after = reference_nll(load_causal_lm(str(tmp_path / "run")), bl_tok, records).nll
    assert before > 5.0 and after < before * 2 / 3


# --- which source a command gets, and the refusals ----------------------------------------------------------


@pytest.mark.parametrize("options, kind", [
    ({"loss": "sft", "student": "S"}, "data"),
    ({"loss": "sft", "teacher": "T", "init_from_teacher": True, "keep_layers": 2}, "data"),
    ({"loss": "sft", "teacher": "T", "student_config": "c.json"}, "data"),
    ({"loss": "srkl", "teacher": "T", "init_from_teacher": True, "keep_layers": 2}, "online"),
    ({"loss": "sft", "mta": True, "teacher": "T", "student": "S"}, "online"),
    ({"loss": "fdd", "teacher": "T", "student": "S"}, "online"),
])
def test_source_kind(options, kind):
    """--loss sft without --mta reads no teacher: --data alone; anything that reads one is the online baseline."""
    objective = ObjectiveConfig(loss=options.pop("loss"), mta=options.pop("mta", False))
    assert source_kind(TrainConfig(out="run", data="d.jsonl", objective=objective, **options)) == kind


@pytest.mark.parametrize("loss, mta, options, message", [
    ("srkl", False, {"student": "S"}, "--loss srkl learns from a teacher, and --data alone has none: pass --teacher T"),
    ("fdd", False, {"student": "S"}, "--loss fdd learns from a teacher"),
    ("sft", True, {"student": "S"}, "--mta learns from a teacher"),
    ("sft", False, {"student": "S", "teacher": "T"}, "--teacher has nothing to do here"),
    ("sft", False, {"init_from_teacher": True, "keep_layers": 2}, "--init-from-teacher with --data needs --teacher T"),
    ("sft", False, {"student_config": "c.json"}, "--student-config with --data needs --teacher T"),
    ("sft", False, {}, "no student: give --student S"),
])
def test_refused_combinations_say_what_to_pass(loss, mta, options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="run", data="d.jsonl", objective=ObjectiveConfig(loss=loss, mta=mta), **options)


def test_no_data_and_no_cache_is_refused():
    with pytest.raises(ValueError, match=r"nothing to train on: give --cache \(offline\), or --data FILE"):
        TrainConfig(out="run", student="S", objective=ObjectiveConfig(loss="sft"))


def test_cli_sft_on_data(tmp_path, data_file, gpt2_dir):
    out = tmp_path / "run"
    result = run_cli("train", "--data", data_file, "--student", gpt2_dir, "--loss", "sft", "--max-steps", 2,
                     "--batch-size", 2, "--out", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and set(summary["final"]) >= {"loss", "ce"} and "kd" not in summary["final"]
    assert json.loads((out / "training_config.json").read_text())["data"] == str(data_file.resolve())
    assert (out / "model.safetensors").exists()


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, data_file, gpt2_dir):
    out = tmp_path / "never"
    result = run_cli("train", "--data", data_file, "--student", gpt2_dir, "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: --loss srkl learns from a teacher") and result.stderr.count("\n") == 1
    assert "--teacher T" in result.stderr and "--cache C" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "p", "output": 3}) + "\n")
    result = run_cli("train", "--data", bad, "--student", gpt2_dir, "--loss", "sft", "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr == f"error: {bad}:2: field 'output': expected a string or a list of strings, got int. " \
                            "Fix the record.\n"
    assert not out.exists()


def test_online_baseline_still_runs_the_teacher(tmp_path, data_file, tiny_teacher_dir):
    """--data --teacher with a KD loss trains against the live teacher: the KD term is logged."""
    run = tmp_path / "online"
    train(TrainConfig(out=str(run), data=str(data_file), teacher=str(tiny_teacher_dir), init_from_teacher=True,
                      keep_layers=2, objective=ObjectiveConfig(loss="fkl"), batch_size=4, max_steps=1,
                      checkpoint_every=0, device="cpu"))
    assert metrics(run)[0]["kd"] > 0
