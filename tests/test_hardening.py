"""Hardening: arbitrary input never crashes intake or segmentation, a full disk leaves a resumable cache and
says how much space is needed, and extraction and training killed (SIGKILL) at random points several
times in a row finish with the same cache and the same weights as uninterrupted runs.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mta_cli.cache import inspect as cache_inspect
from mta_cli.cache.store import CacheError
from mta_cli.encode import encode_record
from mta_cli.extraction import extract
from mta_cli.records import DataError, Record, load_records
from mta_cli.segment import Segmenter, spans_to_token_ranges
from tests import tiny
from tests.test_cache import assert_identical_caches, cli, config, data_file, good  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

# --- intake: a record or a clean file:line error, never a traceback -----------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
# surrogates, right-to-left, zero-width and combining marks, emoji, control characters
hard_text = st.text(alphabet=st.characters(codec=None, categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Cs")),
                    max_size=40) | st.sampled_from(["\u202eevil\u202c", "a\u200bb\u200d", "e\u0301\u0302", "\ud800",
                                                    "\udfff x", "🎉" * 5, "\x00\x1b[31m"])


def assert_clean(path: Path) -> None:
    """load_records returns records, or raises a DataError that names the file (and the line when one is at fault)."""
    try:
        dataset = load_records(path, tokenizer=tiny.byte_level_tokenizer())
    except DataError as e:
        assert str(e).startswith(str(path)), str(e)
        return
    for record in dataset.records:
        record.text.encode("utf-8")  # every accepted string is text


@HYPOTHESIS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "data.jsonl"
    path.write_bytes(data)
    assert_clean(path)


@HYPOTHESIS
@given(st.lists(json_values, min_size=1, max_size=4))
def test_arbitrary_json_values(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("json") / "data.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    assert_clean(path)


@HYPOTHESIS
@given(st.sampled_from(["prompt", "alpaca", "chat"]), hard_text, hard_text)
def test_arbitrary_unicode_in_every_format(tmp_path_factory, fmt, prompt, output):
    record = {"prompt": {"prompt": prompt, "output": output},
              "alpaca": {"instruction": prompt, "input": output, "output": output},
              "chat": {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}}[fmt]
    path = tmp_path_factory.mktemp("unicode") / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")  # json.dumps escapes lone surrogates as \udXXX
    assert_clean(path)


def test_a_lone_surrogate_names_the_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok", "output": "fine"}\n{"prompt": "a\\ud800b", "output": "x"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'prompt': holds a lone surrogate '\\ud800' at character 1"):
        load_records(path)


def test_a_one_megabyte_field_is_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200_000, "output": "é" * 1_000_000}) + "\n")
    dataset = load_records(path)
    assert len(dataset.records[0].prompt) == 1_000_000 and len(dataset.records[0].responses[0]) == 1_000_000


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter()


def is_text(value: str) -> bool:
    """What intake lets through: no lone surrogate."""
    return not any("\ud800" <= c <= "\udfff" for c in value)


@HYPOTHESIS
@given(hard_text.filter(is_text), hard_text.filter(is_text))
def test_spans_never_leave_their_text(segmenter, bl_tok, sp_tok, prompt, response):
    record = Record(prompt=prompt, responses=(response or "x",), line=1)
    for tok in (bl_tok, sp_tok):
        encoded = encode_record(tok, record, max_length=64, max_prompt_length=32)
        if encoded is None:
            continue
        text = encoded.text
        seg = segmenter.segment(text, encoded.prompt_chars)
        for spans in (seg.words, seg.phrases):
            assert np.all((spans[:, 0] >= 0) & (spans[:, 0] < spans[:, 1]) & (spans[:, 1] <= len(text)))
            ranges = spans_to_token_ranges(text, encoded.offsets, spans)
            assert np.all((ranges[:, 0] >= 0) & (ranges[:, 0] <= ranges[:, 1]) & (ranges[:, 1] <= len(encoded.offsets)))


# --- a full disk --------------------------------------------------------------------------------------------


class FullDisk:
    """Wraps the local store's writes: the disk is full from the Nth chunk written under `prefix` on."""

    def __init__(self, monkeypatch, prefix: str, after: int):
        from zarr.storage import LocalStore

        self.original, self.prefix, self.after, self.count = LocalStore.set, prefix, after, 0
        outer = self

        async def set_(store, key, value):
            if key.startswith(outer.prefix) and "/c/" in key:
                outer.count += 1
                if outer.count > outer.after:
                    raise OSError(errno.ENOSPC, "No space left on device", str(Path(str(store.root)) / key))
            return await outer.original(store, key, value)

        monkeypatch.setattr(LocalStore, "set", set_)


def test_a_full_disk_leaves_a_resumable_cache_and_says_what_it_needs(tmp_path, tiny_teacher_dir, data_file, good,
                                                                    monkeypatch):
    out = tmp_path / "cache.zarr"
    FullDisk(monkeypatch, "shards/00001/", after=4)
    with pytest.raises(CacheError) as caught:
        extract(config(tiny_teacher_dir, data_file, out))
    message = str(caught.value)
    assert message.startswith(f"{out}: the disk is full. The whole cache needs about ")
    assert "bytes/token x " in message and "re-run the same command to resume" in message
    root = zarr.open_group(str(out), mode="r")
    assert root["shards/00000"].attrs["complete"] is True
    assert not root["shards/00001"].attrs.get("complete") and "shards/00002" not in root
    monkeypatch.undo()  # space freed
    summary = extract(config(tiny_teacher_dir, data_file, out))
    assert summary.shards_reused == 1
    assert_identical_caches(out, good)


def test_a_full_disk_during_the_cli_is_one_line(tmp_path, tiny_teacher_dir, data_file, monkeypatch):
    FullDisk(monkeypatch, "shards/", after=0)
    result = cli("extract", "--teacher", tiny_teacher_dir, "--data", data_file, "--out", tmp_path / "c.zarr",
                 "--skip-invalid", "--max-length", 64, "--max-prompt-length", 32)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "the disk is full" in result.stderr


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, good, monkeypatch):
    import mta_cli.training.checkpoint as checkpoint

    saved = []
    original = checkpoint.save_file

    def save_file(tensors, path):
        if "step-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        return original(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    result = cli("train", "--cache", good, "--out", out, "--init-from-teacher", "--keep-layers", 2, "--max-steps", 3,
                 "--batch-size", 2, "--checkpoint-every", 1, "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("No space left on device; free some space, then re-run the same command "
                                          "(it resumes where it stopped)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


# --- kill -9 loops ------------------------------------------------------------------------------------------


def mta(*args, env=None) -> subprocess.Popen:
    """The command line of the tree under test in a subprocess, one CPU thread (bitwise reproducible)."""
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "mta_cli", *map(str, args)], cwd=REPO, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, started, delay: float, timeout: float = 120) -> bool:
    """SIGKILL `process` `delay` seconds after `started()` turns true; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not started():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the process never started its work"
        time.sleep(0.02)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "records.jsonl"
    tiny.write_jsonl(path, tiny.RECORDS * 3)
    return path


def test_extraction_killed_again_and_again_finishes_identical(tmp_path, tiny_teacher_dir, long_data):
    args = ["extract", "--teacher", tiny_teacher_dir, "--data", long_data, "--shard-size", 2, "--batch-size", 1,
            "--max-length", 64, "--max-prompt-length", 32, "--device", "cpu"]
    reference = tmp_path / "reference.zarr"
    uninterrupted = mta(*args, "--out", reference)  # runs beside the kill loop (2 cores)
    out = tmp_path / "killed.zarr"
    rng, kills = random.Random(0), 0
    for _ in range(3):
        process = mta(*args, "--out", out)
        kills += kill_when(process, lambda: (out / "zarr.json").exists(), rng.uniform(0.0, 1.5))
    assert kills >= 2
    final = mta(*args, "--out", out)
    assert final.wait() == 0, final.stderr.read()
    assert uninterrupted.wait() == 0
    assert cache_inspect.verify(str(out)) == []
    ra, rb = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    assert ra.attrs["mta"]["config"] == rb.attrs["mta"]["config"] and ra.attrs["mta"]["n_shards"] == 12
    for k in range(12):
        name = f"shards/{k:05d}"
        a, b = ra[name], rb[name]
        arrays = list(a.attrs["arrays"])
        assert arrays == list(b.attrs["arrays"])
        for array in arrays:
            assert np.array_equal(a[array][...], b[array][...]), f"{name}/{array}"
    assert not list(out.rglob("*.partial")) and not (tmp_path / "killed.zarr.lock").exists()


def test_training_killed_again_and_again_finishes_with_identical_weights(tmp_path, good):
    args = ["train", "--cache", good, "--init-from-teacher", "--keep-layers", 2, "--loss", "srkl", "--mta",
            "--batch-size", 2, "--max-steps", 12, "--checkpoint-every", 1, "--device", "cpu"]
    reference = tmp_path / "reference"
    uninterrupted = mta(*args, "--out", reference)
    out = tmp_path / "killed"
    rng, kills = random.Random(1), 0
    for attempt in range(3):
        process = mta(*args, "--out", out, *(["--resume"] if attempt else []))
        kills += kill_when(process, lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size,
                           rng.uniform(0.0, 0.6))
    assert kills >= 2
    final = mta(*args, "--out", out, "--resume")
    assert final.wait() == 0, final.stderr.read()
    assert uninterrupted.wait() == 0
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


# --- devices and the spaCy model: one line, before anything slow -------------------------------------------


@pytest.mark.parametrize("device, message", [("cuda", "this torch build sees no CUDA GPU"),
                                             ("gpu0", "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N")])
def test_a_device_that_is_not_there_is_one_line(device, message, tmp_path, good, data_file, tiny_teacher_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for command in (["train", "--cache", good, "--init-from-teacher", "--keep-layers", 2, "--out", tmp_path / "r"],
                    ["extract", "--teacher", tiny_teacher_dir, "--data", data_file, "--out", tmp_path / "c.zarr"],
                    ["eval", "--model", tiny_teacher_dir, "--data", data_file, "--max-records", 1]):
        result = cli(*command, "--device", device)
        assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_unknown_spacy_model_is_one_line_before_the_teacher_loads(tmp_path, tiny_teacher_dir, data_file):
    result = cli("extract", "--teacher", tiny_teacher_dir, "--data", data_file, "--out", tmp_path / "c.zarr",
                 "--skip-invalid", "--spacy-model", "xx_fake")
    assert result.exit_code == 1 and "no spaCy model could be loaded (tried xx_fake: not installed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "c.zarr").exists()


def test_two_extractions_started_together_leave_one_sound_cache(tmp_path, tiny_teacher_dir, long_data):
    """The lock lets one extraction write; the other stops with the holder's pid (or, if it comes after the first
    finished, reuses every shard). Either way no shard is marked complete without its arrays."""
    args = ["extract", "--teacher", tiny_teacher_dir, "--data", long_data, "--shard-size", 2, "--batch-size", 1,
            "--max-length", 64, "--max-prompt-length", 32, "--device", "cpu", "--out", tmp_path / "cache.zarr"]
    first, second = mta(*args), mta(*args)
    outcomes = [(p.wait(), p.stderr.read()) for p in (first, second)]
    assert sorted(rc for rc, _ in outcomes) in ([0, 0], [0, 1]), outcomes
    for rc, stderr in outcomes:
        if rc:
            assert "is being written by another extraction (pid " in stderr and "Traceback" not in stderr
    assert cache_inspect.verify(str(tmp_path / "cache.zarr")) == []
