"""`mta generate`: a model's responses to a data file's prompts, as records `mta extract` reads.

What is proven: the same command writes the same file byte for byte, another seed other responses, several
seeds the per-seed files one after the other, and the responses are those of `evaluation.generate` (so of
`mta eval`); the records go through `mta extract` into a cache that verifies, holds prompt + response as
text and names who generated them; an interrupted run (an exception mid-way, then a kill inside a batch
that leaves a torn last line) resumes into the same file as an uninterrupted run; other settings, a file
that was not written by mta generate, and bad input are refused with one line before the model loads;
empty responses are counted and not written; the CLI's --json figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mta_cli
from mta_cli import generation
from mta_cli.cache import inspect as cache_inspect
from mta_cli.cache.reader import CacheReader
from mta_cli.evaluation import generate
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.generation import GenerateConfig, generate_records
from mta_cli.models import load_causal_lm, weights_fingerprint
from tests import tiny
from tests.tiny import write_jsonl

NEW_TOKENS = 8


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, bl_tok) -> str:
    return str(tiny.save_tiny_model(tmp_path_factory.mktemp("student"), bl_tok, tiny.tiny_llama(bl_tok, seed=1)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """tiny.RECORDS with a blank line after the second: source lines 1, 2, 4, ..., 9."""
    rows = tiny.RECORDS[:2] + [""] + tiny.RECORDS[2:]
    return write_jsonl(tmp_path_factory.mktemp("data") / "records.jsonl", rows)


def config(model, data, out, **options) -> GenerateConfig:
    options = {"seeds": [10], "max_new_tokens": NEW_TOKENS, "batch_size": 3, "device": "cpu"} | options
    return GenerateConfig(model=str(model), data=str(data), out=str(out), **options)


def test_the_package_exports_generate():
    assert mta_cli.generate_records is generation.generate_records
    assert mta_cli.GenerateConfig is generation.GenerateConfig


def test_same_seed_same_file_other_seed_other_responses(tmp_path, student_dir, data_file, bl_tok):
    runs = {}
    for name, seeds in (("a", [10]), ("b", [10]), ("c", [20]), ("both", [10, 20])):
        summary = generate_records(config(student_dir, data_file, tmp_path / f"{name}.jsonl", seeds=seeds))
        assert (summary.records, summary.records_written, summary.empty_responses) == (8 * len(seeds),) * 2 + (0,)
        runs[name] = (tmp_path / f"{name}.jsonl").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["both"] == runs["a"] + runs["c"]  # seed-major, each seed as if alone
    a, c = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "c.jsonl")
    assert all(x["output"] != y["output"] for x, y in zip(a, c))

    lines = {i + 1: row for i, row in enumerate(data_file.read_text().splitlines()) if row}
    model = load_causal_lm(student_dir)
    generated_by = {"model": str(Path(student_dir).resolve()), "weights_sha256": weights_fingerprint(model)}
    for record in a:
        assert list(record) == ["prompt", "output", "source_line", "seed", "generated_by"]
        assert record["prompt"] == json.loads(lines[record["source_line"]])["prompt"]
        assert record["seed"] == 10 and record["generated_by"] == generated_by
    assert sorted(r["source_line"] for r in a) == [1, 2, 4, 5, 6, 7, 8, 9]
    # the responses of evaluation.generate (mta eval) for the same seed and batch size
    prompts = [r["prompt"] for r in tiny.RECORDS]
    expected = generate(model, bl_tok, prompts, seed=10, max_new_tokens=NEW_TOKENS, batch_size=3)
    assert {r["prompt"]: r["output"] for r in a} == dict(zip(prompts, expected))


def test_records_round_trip_through_extract(tmp_path, student_dir, tiny_teacher_dir, data_file, tiny_fp32_cache):
    """Student- and teacher-generated records in one file: the cache verifies, its texts are prompt + response,
    its source lines the lines of the generated file, and data.generated_by names both models; the teacher's
    fingerprint is the cache's own."""
    student = tmp_path / "student.jsonl"
    teacher = tmp_path / "teacher.jsonl"
    generate_records(config(student_dir, data_file, student, seeds=[10, 20]))
    generate_records(config(tiny_teacher_dir, data_file, teacher))
    both = write_jsonl(tmp_path / "both.jsonl", [line for path in (student, teacher)
                                                 for line in path.read_text().splitlines()])
    records = read_jsonl(both)
    assert len(records) == 24
    out = tmp_path / "cache.zarr"
    extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(both), out=str(out), dtype="fp32", device="cpu"))
    assert cache_inspect.check(str(out)).faults == []
    reader = CacheReader(out)
    samples = [s for shard in reader.iter_shards() for s in shard]
    assert [s.text for s in samples] == [r["prompt"] + r["output"] for r in records]
    assert [s.text[:s.prompt_chars] for s in samples] == [r["prompt"] for r in records]
    assert [s.source_line for s in samples] == list(range(1, 25))
    teacher_sha = reader.meta["config"]["teacher"]["weights_sha256"]
    assert reader.meta["data"]["generated_by"] == [records[0]["generated_by"], records[-1]["generated_by"]]
    assert records[-1]["generated_by"] == {"model": str(Path(tiny_teacher_dir).resolve()),
                                           "weights_sha256": teacher_sha}
    assert records[0]["generated_by"]["weights_sha256"] != teacher_sha
    assert CacheReader(tiny_fp32_cache).meta["data"]["generated_by"] is None  # ordinary data


def test_chat_prompts_are_rendered_with_the_models_template(tmp_path, student_dir, bl_tok):
    messages = [[{"role": "user", "content": "Name three primary colors."}, {"role": "assistant", "content": "Red."}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                 {"role": "assistant", "content": "Hi!"}]]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in messages])
    generate_records(config(student_dir, data, tmp_path / "gen.jsonl", max_new_tokens=4))
    prompts = {r["source_line"]: r["prompt"] for r in read_jsonl(tmp_path / "gen.jsonl")}
    assert prompts == {i + 1: bl_tok.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
                       for i, m in enumerate(messages)}
    assert prompts[1].endswith("<|im_start|>assistant\n")


class Interrupt:
    """A progress callback that raises KeyboardInterrupt after `batches` batches were written."""

    def __init__(self, batches: int):
        self.left = batches

    def __call__(self, event: str, info: dict) -> None:
        if event == "batch":
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt


def test_resume_after_an_interruption_and_a_torn_line_gives_the_same_file(tmp_path, student_dir, data_file):
    reference = tmp_path / "reference.jsonl"
    generate_records(config(student_dir, data_file, reference, seeds=[10, 20]))  # batches of 3, 3, 2 per seed
    out = tmp_path / "gen.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_records(config(student_dir, data_file, out, seeds=[10, 20]), progress=Interrupt(4))
    written = out.read_bytes().splitlines(keepends=True)
    assert len(written) == 11 and b"".join(written) == reference.read_bytes()[:len(b"".join(written))]
    # then a kill inside the 4th batch: its last record torn half-way
    out.write_bytes(b"".join(written[:-1]) + written[-1][:len(written[-1]) // 2])
    summary = generate_records(config(student_dir, data_file, out, seeds=[10, 20]))
    assert out.read_bytes() == reference.read_bytes()
    assert (summary.records, summary.records_written, summary.empty_responses) == (16, 6, 0)
    assert summary.tokens_generated == 6 * NEW_TOKENS
    again = generate_records(config(student_dir, data_file, out, seeds=[10, 20]))
    assert (again.records, again.records_written, again.tokens_generated) == (16, 0, 0)
    assert out.read_bytes() == reference.read_bytes()


def test_other_settings_are_refused_and_force_starts_over(tmp_path, student_dir, data_file, bl_tok):
    model = tmp_path / "model"
    shutil.copytree(student_dir, model)
    out = tmp_path / "gen.jsonl"
    generate_records(config(model, data_file, out))
    original = out.read_bytes()
    refusals = [
        (dict(seeds=[10, 30]), "seeds: gen.jsonl.settings.json has [10], this run has [10, 30]"),
        (dict(max_new_tokens=4), "max_new_tokens: gen.jsonl.settings.json has 8, this run has 4"),
        (dict(batch_size=2, top_p=0.9), "batch_size: gen.jsonl.settings.json has 3, this run has 2\n  top_p:"),
        (dict(max_records=2), "max_records: gen.jsonl.settings.json has null, this run has 2"),
    ]
    for options, difference in refusals:
        with pytest.raises(ValueError) as e:
            generate_records(config(model, data_file, out, **options))
        assert str(e.value).startswith(f"{out} was generated with other settings; refusing to mix them.\n  ")
        assert difference in str(e.value) and str(e.value).endswith("pass --force to start over.")
    other_data = write_jsonl(tmp_path / "other.jsonl", tiny.RECORDS[:3])
    with pytest.raises(ValueError, match="data_sha256: gen.jsonl.settings.json has"):
        generate_records(config(model, other_data, out))
    tiny.save_tiny_model(model, bl_tok, tiny.tiny_llama(bl_tok, seed=2))  # other weights at the same path
    with pytest.raises(ValueError, match="weights_sha256: gen.jsonl.settings.json has"):
        generate_records(config(model, data_file, out))
    assert out.read_bytes() == original
    generate_records(config(model, data_file, out, force=True))
    assert out.read_bytes() != original
    assert {r["generated_by"]["weights_sha256"] for r in read_jsonl(out)} == {
        weights_fingerprint(load_causal_lm(str(model)))}

    plain = write_jsonl(tmp_path / "plain.jsonl", tiny.RECORDS[:1])
    with pytest.raises(ValueError, match="plain.jsonl exists and has no plain.jsonl.settings.json beside it"):
        generate_records(config(model, data_file, plain))
    out.write_bytes(original.replace(b'"source_line": 4', b'"source_line": 3', 1))
    with pytest.raises(ValueError, match=r"gen.jsonl:\d: not the record that comes next"):
        generate_records(config(model, data_file, out))
    for damaged in ("{", "[]", '{"settings": 3}'):
        generation.settings_path(out).write_text(damaged)
        with pytest.raises(ValueError, match="gen.jsonl.settings.json is not a settings file of mta generate"):
            generate_records(config(model, data_file, out))


def cli(*args):
    from mta_cli.cli import app

    return CliRunner().invoke(app, ["generate", *map(str, args)])


@pytest.fixture(scope="module")
def unloadable_model(tmp_path_factory, bl_tok) -> Path:
    """A tokenizer and a config without weights: any error that comes before loading the model is not this."""
    path = tmp_path_factory.mktemp("no-weights")
    bl_tok.save_pretrained(path)
    tiny.tiny_llama(bl_tok).config.save_pretrained(path)
    return path


@pytest.mark.parametrize("options, message", [
    (["--seeds", "10,10"], "--seeds must be one or more distinct non-negative integers, got [10, 10]"),
    (["--seeds", "10,x"], "--seeds must be comma-separated integers, got '10,x'"),
    (["--seeds", "-1"], "--seeds must be one or more distinct non-negative integers, got [-1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be a finite number > 0 and <= 1, got 1.5"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--max-records", "0"], "--max-records must be an integer >= 1, got 0"),
    (["--dtype", "int4"], "--dtype must be one of fp32, bf16, fp16, got 'int4'"),
    (["--out", "{tmp}"], "is a folder; give a file name"),
    (["--out", "{tmp}/missing/gen.jsonl"], "the folder {tmp}/missing does not exist; create it first"),
    (["--out", "{data}"], "is the --data file; choose another --out"),
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: file not found"),
    (["--data", "{bad}"], "bad.jsonl:2: field 'output': missing"),
])
def test_bad_input_is_one_line_before_the_model_loads(options, message, tmp_path, unloadable_model):
    data = write_jsonl(tmp_path / "data.jsonl", tiny.RECORDS[:2])
    bad = write_jsonl(tmp_path / "bad.jsonl", [tiny.RECORDS[0], {"prompt": "x"}])
    given = {"--model": unloadable_model, "--data": data, "--out": tmp_path / "gen.jsonl",
             "--device": "cpu"} | dict(zip(options[::2], options[1::2]))
    args = [str(v).format(tmp=tmp_path, data=data, bad=bad) for pair in given.items() for v in pair]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert not (tmp_path / "gen.jsonl").exists()


def test_the_model_is_named_when_it_cannot_load(tmp_path, unloadable_model):
    data = write_jsonl(tmp_path / "data.jsonl", tiny.RECORDS[:2])
    result = cli("--model", unloadable_model, "--data", data, "--out", tmp_path / "gen.jsonl", "--device", "cpu")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert f"cannot load the model of {unloadable_model}" in result.stderr


def test_empty_responses_are_counted_not_written(tmp_path, bl_tok, data_file):
    """A GPT-2 whose every next-token distribution gives EOS probability 1/2: about half the responses are
    empty. Exactly the pairs evaluation.generate answers with "" are missing from the file, and a resumed run
    counts the same."""
    model = tiny.tiny_gpt2(bl_tok)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.nn.functional.one_hot(torch.tensor(0), 32).float())
        model.transformer.wte.weight[:, 0] = 0.0  # logits = wte[:, 0] (tied head): uniform but for EOS
        model.transformer.wte.weight[bl_tok.eos_token_id, 0] = torch.tensor(len(bl_tok) - 1.0).log()
    model_dir = tiny.save_tiny_model(tmp_path / "eos-half", bl_tok, model)
    out = tmp_path / "gen.jsonl"
    summary = generate_records(config(model_dir, data_file, out, seeds=[10, 20]))
    written = {(r["source_line"], r["seed"]) for r in read_jsonl(out)}
    assert all(r["output"].strip() for r in read_jsonl(out))
    loaded = load_causal_lm(str(model_dir))
    lines = [1, 2, 4, 5, 6, 7, 8, 9]
    empty = {(line, seed) for seed in (10, 20) for line, response in zip(lines, generate(
        loaded, bl_tok, [r["prompt"] for r in tiny.RECORDS], seed=seed, max_new_tokens=NEW_TOKENS, batch_size=3))
        if not response.strip()}
    assert 0 < len(empty) < 16 and written == {(line, seed) for line in lines for seed in (10, 20)} - empty
    assert (summary.records, summary.empty_responses) == (16 - len(empty), len(empty))

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_records(config(model_dir, data_file, resumed, seeds=[10, 20]), progress=Interrupt(3))
    again = generate_records(config(model_dir, data_file, resumed, seeds=[10, 20]))
    assert resumed.read_bytes() == out.read_bytes()
    assert (again.records, again.empty_responses) == (summary.records, summary.empty_responses)


def test_cli_json_figures(tmp_path, student_dir, data_file):
    out = tmp_path / "gen.jsonl"
    args = ("--model", student_dir, "--data", data_file, "--out", out, "--seeds", "10,20", "--max-new-tokens",
            NEW_TOKENS, "--batch-size", 3, "--max-records", 5, "--device", "cpu")
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert len(read_jsonl(out)) == 10
    assert {k: figures[k] for k in ("out", "prompts", "seeds", "records", "records_written", "empty_responses",
                                    "skipped_invalid", "tokens_generated")} == {
        "out": str(out), "prompts": 5, "seeds": [10, 20], "records": 10, "records_written": 10,
        "empty_responses": 0, "skipped_invalid": 0, "tokens_generated": 10 * NEW_TOKENS}  # no EOS in 8 tokens here
    assert figures["seconds"] > 0 and figures["tokens_per_second"] > 0
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "records_written" in again.stdout and "mta generate" in again.stdout
    help_text = cli("--help").stdout
    assert "Example" in help_text and "mta generate --model" in help_text
