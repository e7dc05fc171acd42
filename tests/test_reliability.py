"""A cache that never lies: missing chunks and shards, damaged metadata, absurd declared sizes, repair, the
extraction lock, and outputs checked before any model is loaded (the reliability findings, one test each).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mta_cli.cache import inspect as cache_inspect
from mta_cli.cache.lock import CacheLock
from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.extraction import extract
from tests.test_cache import assert_identical_caches, cli, config, copy_of, data_file, good  # noqa: F401 - fixtures

TRAIN = ["train", "--init-from-teacher", "--keep-layers", "2", "--loss", "srkl", "--max-steps", "2",
         "--batch-size", "2", "--checkpoint-every", "0", "--device", "cpu"]


def train_on(cache: Path, out: Path, *extra):
    return cli(*TRAIN, "--cache", cache, "--out", out, *extra)


def chunk_file(cache: Path, array: str) -> Path:
    files = [p for p in (cache / array / "c").rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


# --- 1. a missing chunk is a fault, never zeros ----------------------------------------------------------


@pytest.mark.parametrize("array, fault", [
    ("head/weight", "head: weight: 0 of 1 chunk object(s) present"),
    ("shards/00001/states/3", "shards/00001: states/3: 0 of 1 chunk object(s) present"),
    ("shards/00000/input_ids", "shards/00000: input_ids: 0 of 1 chunk object(s) present"),
])
def test_a_missing_chunk_fails_verify_the_reader_and_train(array, fault, tmp_path, good):
    cache = copy_of(good, tmp_path)
    chunk_file(cache, array).unlink()
    assert cache_inspect.verify(str(cache)) == [fault]
    with pytest.raises(CacheError, match="is damaged") as e:
        CacheReader(cache)
    assert fault in str(e.value) and f"mta cache verify --repair {cache}" in str(e.value)
    result = train_on(cache, tmp_path / "run")
    assert result.exit_code == 1 and fault in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_chunk_deleted_while_the_reader_is_open_is_refused_at_read_time(tmp_path, good):
    cache = copy_of(good, tmp_path)
    reader = CacheReader(cache)
    reader.read_shard(2)
    chunk_file(cache, "shards/00002/states/4").unlink()
    with pytest.raises(CacheError, match=r"shards/00002: states/4: 0 of 1 chunk object\(s\) present; the cache is "
                                         r"damaged. To fix it, run `mta cache verify --repair"):
        reader.read_shard(2)
    with pytest.raises(CacheError, match="shards/00002: states/4: 0 of 1"):
        reader[7]


def test_a_corrupt_chunk_in_training_names_the_shard_the_array_and_the_remedy(tmp_path, good):
    cache = copy_of(good, tmp_path)
    chunk = chunk_file(cache, "shards/00001/states/4")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = train_on(cache, tmp_path / "run", "--max-steps", 4)  # one epoch: every shard is read
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: ") and "shards/00001/states/4: unreadable" in line, line
    assert "checksum" in line and "mta cache verify --repair" in line
    assert "Task was destroyed" not in result.stderr and "Traceback" not in result.stderr


# --- 2. shards a complete cache promises must be there ----------------------------------------------------


@pytest.mark.parametrize("remove", [["00001"], ["00000", "00001", "00002"]])
def test_a_complete_cache_with_shards_gone_is_refused_before_training(remove, tmp_path, good):
    cache = copy_of(good, tmp_path)
    for name in remove:
        shutil.rmtree(cache / "shards" / name)
    started = time.perf_counter()
    result = train_on(cache, tmp_path / "run")
    assert result.exit_code == 1 and time.perf_counter() - started < 60
    for name in remove:
        assert f"shards/{name}: missing" in result.stderr
    assert cache_inspect.verify(str(cache)) == [f"shards/{name}: missing" for name in remove]


# --- damaged or absurd metadata ---------------------------------------------------------------------------


def set_root_meta(cache: Path, **changes) -> None:
    edit_json(cache / "zarr.json", lambda d: d["attributes"]["mta"].update(changes))


def test_edited_metadata_is_refused_by_train_eval_verify_and_info(tmp_path, good):
    cases = {
        "state_dtype": (lambda c: edit_json(c / "zarr.json", lambda d: d["attributes"]["mta"]["config"].update(
            state_dtype="fp32")), "states/4: manifest says uint16["),
        "token_ptr shape": (lambda c: edit_json(c / "shards/00000/token_ptr/zarr.json",
                                                lambda d: d.update(shape=[9])),
                            "shards/00000: token_ptr: metadata says int64[9], the manifest int64[4]"),
        "n_shards lowered": (lambda c: set_root_meta(c, n_shards=2), "field 'n_shards' is 2, but 8 samples in shards of "
                                                                      "3 make 3"),
        "head deleted": (lambda c: shutil.rmtree(c / "head"), "head: missing"),
        "states deleted": (lambda c: shutil.rmtree(c / "shards/00002/states"),
                           "shards/00002: states/2: missing (no array metadata)"),
        "format version": (lambda c: set_root_meta(c, format_version=2), "cache format 2 was written by another mta "
                                                                         "version; this mta reads format 3"),
    }
    for name, (damage, message) in cases.items():
        cache = copy_of(good, tmp_path / name.replace(" ", "_"))
        damage(cache)
        faults = cache_inspect.verify(str(cache))
        assert any(message in f for f in faults), (name, faults)
        with pytest.raises(CacheError) as e:
            CacheReader(cache)
        assert message in str(e.value), name
        result = train_on(cache, tmp_path / name.replace(" ", "_") / "run")
        assert result.exit_code == 1 and message in result.stderr, (name, result.stderr)
        info = cli("cache", "info", cache)
        assert "Traceback" not in info.stderr, name


@pytest.mark.parametrize("n_shards, field", [(10**9, "n_tokens"), (3 * 10**12, "n_samples")])
def test_an_absurd_shard_count_is_refused_at_once(n_shards, field, tmp_path, good):
    cache = copy_of(good, tmp_path)
    set_root_meta(cache, n_shards=n_shards, n_samples=n_shards * 3)
    started = time.perf_counter()
    for command in (["cache", "info", cache], ["cache", "verify", cache]):
        result = cli(*command)
        assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert time.perf_counter() - started < 20
    assert f"field '{field}'" in cli("cache", "verify", cache).stderr


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["teacher"].update(hidden_size=10**9), "teacher.hidden_size"),
    (lambda m: m["teacher"].update(vocab_size=-5), "teacher.vocab_size"),
    (lambda m: m["config"].update(layers=[2, 3, 4, 99]), "config.layers"),
    (lambda m: m["config"].update(max_length="64"), "config.max_length"),
    (lambda m: m.pop("n_tokens"), "n_tokens"),
])
def test_absurd_declared_sizes_are_refused_before_anything_is_read(edit, field, tmp_path, good):
    cache = copy_of(good, tmp_path)
    edit_json(cache / "zarr.json", lambda d: edit(d["attributes"]["mta"]))
    with pytest.raises(CacheError, match=f"field '{field}'"):
        CacheReader(cache)


def test_an_array_with_an_absurd_declared_shape_is_refused(tmp_path, good):
    cache = copy_of(good, tmp_path)
    edit_json(cache / "shards/00000/states/2/zarr.json", lambda d: d.update(shape=[10**12, 48]))
    with pytest.raises(CacheError, match=r"states/2: metadata says uint16\[1000000000000, 48\]"):
        CacheReader(cache)


@pytest.mark.parametrize("content", ["", '{"zarr_format": 3, "node_type": "gro'])
def test_an_empty_or_cut_root_metadata_file_is_one_line_naming_it(content, tmp_path, good):
    cache = copy_of(good, tmp_path)
    (cache / "zarr.json").write_text(content)
    for command in (["cache", "verify", cache], ["cache", "info", cache]):
        result = cli(*command)
        assert result.exit_code == 1 and f"{cache}/zarr.json is damaged" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = train_on(cache, tmp_path / "run")
    assert result.exit_code == 1 and f"{cache}/zarr.json is damaged" in result.stderr


def test_a_damaged_shard_metadata_file_is_a_fault_of_that_shard(tmp_path, good):
    cache = copy_of(good, tmp_path)
    (cache / "shards/00001/zarr.json").write_text('{"zarr_format": 3, ')
    faults = cache_inspect.verify(str(cache))
    assert len(faults) == 1 and faults[0].startswith("shards/00001: metadata unreadable")


# --- repair -----------------------------------------------------------------------------------------------


def test_repair_then_the_same_extraction_restores_the_original_cache(tmp_path, tiny_teacher_dir, data_file, good):
    cache = tmp_path / "cache.zarr"
    extract(config(tiny_teacher_dir, data_file, cache))
    chunk_file(cache, "shards/00000/offsets").unlink()                     # missing chunk
    flipped = chunk_file(cache, "shards/00002/states/4")                    # silent corruption: checksum
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x04
    flipped.write_bytes(bytes(data))
    head = chunk_file(cache, "head/weight")
    head.write_bytes(head.read_bytes()[:100])                               # truncated head
    before = cache_inspect.verify(str(cache))
    assert len(before) == 3

    result = cli("cache", "verify", cache, "--repair")
    assert result.exit_code == 1
    assert "repaired: 2 shard(s) and the head marked for rewriting; now run:" in result.stdout
    command = result.stdout.split("now run:")[1].split()
    assert command[:2] == ["mta", "extract"] and command[command.index("--out") + 1] == str(cache)
    root = zarr.open_group(str(cache), mode="r")
    assert root.attrs["mta"]["complete"] is False and root["shards/00001"].attrs["complete"] is True
    assert root["shards/00000"].attrs["complete"] is False and root["head"].attrs["complete"] is False

    summary = extract(config(tiny_teacher_dir, data_file, cache))
    assert summary.shards_reused == 1
    assert cache_inspect.verify(str(cache)) == []
    assert_identical_caches(cache, good)
    assert cli("cache", "verify", cache, "--repair").stdout.startswith(f"ok: {cache} verified")


# --- the lock: one extraction per cache -------------------------------------------------------------------


def test_a_second_extraction_into_a_locked_cache_stops_with_the_holder(tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "cache.zarr"
    with CacheLock(out):
        with pytest.raises(CacheError, match=rf"{out} is being written by another extraction \(pid \d+ on .+, since "):
            extract(config(tiny_teacher_dir, data_file, out))
    assert not out.exists()
    extract(config(tiny_teacher_dir, data_file, out))  # released: the next extraction runs
    assert cache_inspect.verify(str(out)) == [] and not (tmp_path / "cache.zarr.lock").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "cache.zarr"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mta_cli.cache.lock import CacheLock\n"
                               f"with CacheLock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CacheError, match=f"pid {holder.pid} on "):
        extract(config(tiny_teacher_dir, data_file, out))
    holder.kill()
    holder.wait()
    extract(config(tiny_teacher_dir, data_file, out))
    assert cache_inspect.verify(str(out)) == []


# --- outputs checked first, and refused when they hold something else -------------------------------------


class Events:
    def __init__(self):
        self.messages = []

    def __call__(self, event, info):
        if event == "status":
            self.messages.append(info["message"])


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file; give a folder"),
    (lambda p: (p.parent / "file").write_text("x"), "is a file, so no folder can be made under it"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("keep me")), "holds other files (notes.txt) and no mta cache"),
])
def test_a_bad_out_is_refused_before_the_teacher_loads(make, message, tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "out"
    make(out)
    if "under it" in message:
        out = tmp_path / "file" / "cache.zarr"
    events = Events()
    with pytest.raises(CacheError, match=re.escape(message)):
        extract(config(tiny_teacher_dir, data_file, out), progress=events)
    assert events.messages == []  # nothing was loaded
    if (tmp_path / "out").is_dir():
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_force_replaces_a_folder_that_is_not_a_cache(tmp_path, tiny_teacher_dir, data_file, good):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    result = cli("extract", "--teacher", tiny_teacher_dir, "--data", data_file, "--out", out, "--skip-invalid",
                 "--max-length", 64, "--max-prompt-length", 32, "--shard-size", 3, "--batch-size", 2, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and cache_inspect.verify(str(out)) == []


def test_prune_refuses_to_overwrite_a_model_unless_forced(tmp_path, tiny_teacher_dir):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = cli("prune", "--teacher", tiny_teacher_dir, "--keep-layers", 2, "--out", out)
    assert result.exit_code == 1 and "already holds files" in result.stderr and "--force" in result.stderr
    assert (out / "config.json").read_text() == "{}"
    result = cli("prune", "--teacher", tiny_teacher_dir, "--keep-layers", 2, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_an_os_error_is_one_line_and_debug_shows_the_traceback(tmp_path, good, monkeypatch):
    import mta_cli.cache.inspect as inspect_module

    def read_only(url):
        raise OSError(errno.EROFS, "Read-only file system", str(url))

    monkeypatch.setattr(inspect_module, "check", read_only)
    result = cli("cache", "verify", good)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {good}: Read-only file system; the file system is read-only: choose " \
                                    "another location"
    result = cli("--debug", "cache", "verify", good)
    assert result.exit_code == 1 and "Traceback" in result.stderr and "read_only" in result.stderr


def test_info_of_a_damaged_cache_counts_only_sound_shards(tmp_path, good):
    cache = copy_of(good, tmp_path)
    chunk_file(cache, "shards/00001/words").unlink()
    info = json.loads(cli("cache", "info", cache, "--json").stdout)
    assert info["shards"] == "2/3" and info["samples"] == 5 and info["faults"] == 1
    kept = np.diff(zarr.open_array(str(cache / "shards/00000/token_ptr"), mode="r")[...]).sum() + \
        np.diff(zarr.open_array(str(cache / "shards/00002/token_ptr"), mode="r")[...]).sum()
    assert info["tokens"] == kept


def test_extract_config_is_stored_and_reruns_keep_the_extraction_timing(tmp_path, tiny_teacher_dir, data_file, good):
    cache = copy_of(good, tmp_path)
    before = zarr.open_group(str(cache), mode="r").attrs["mta"]
    assert before["extraction"]["tokens_per_second"] > 0
    assert before["extract_config"]["shard_size"] == 3 and before["teacher"]["path"] == str(tiny_teacher_dir)
    extract(config(tiny_teacher_dir, data_file, cache))
    assert zarr.open_group(str(cache), mode="r").attrs["mta"]["extraction"] == before["extraction"]


def test_no_partial_file_survives_a_resumed_extraction(tmp_path, tiny_teacher_dir, data_file, good):
    cache = copy_of(good, tmp_path)
    stale = cache / "shards/00001/zarr.json.0123456789abcdef.partial"
    stale.write_text("{")
    extract(config(tiny_teacher_dir, data_file, cache))
    assert not list(cache.rglob("*.partial"))


# --- eval checks its outputs first, and skips invalid records when asked --------------------------------------


def test_eval_refuses_an_unwritable_json_before_generating(tmp_path, tiny_teacher_dir, data_file):
    started = time.perf_counter()
    result = cli("eval", "--model", tiny_teacher_dir, "--data", data_file, "--json", tmp_path / "missing" / "e.json",
                 "--skip-invalid")
    assert result.exit_code == 1 and time.perf_counter() - started < 10
    assert "--json" in result.stderr and "does not exist; create it first" in result.stderr
    assert result.stdout == ""  # no table: nothing was generated


def test_eval_skip_invalid_scores_the_valid_records(tmp_path, tiny_teacher_dir, data_file):
    refused = cli("eval", "--model", tiny_teacher_dir, "--data", data_file, "--greedy", "--max-new-tokens", 4)
    assert refused.exit_code == 1 and "records.jsonl:6: field 'output': missing" in refused.stderr
    assert "--skip-invalid" in refused.stderr
    out = tmp_path / "e.json"
    result = cli("eval", "--model", tiny_teacher_dir, "--data", data_file, "--greedy", "--max-new-tokens", 4,
                 "--skip-invalid", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["models"][0]["files"][0]["n_records"] == 8
