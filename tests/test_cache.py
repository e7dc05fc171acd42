"""The extraction cache on disk: resume after an interruption, configuration checks, `mta cache verify`
against truncated / altered / inconsistent / missing / incomplete shards, `mta cache info` and `show`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import mta_cli
from mta_cli import __version__
from mta_cli.cache import inspect as cache_inspect
from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError, CacheWriter
from mta_cli.extraction import ExtractConfig, extract
from tests.test_extract import LINES, MAX_LENGTH, MAX_PROMPT
from tests.tiny import write_jsonl

N_SAMPLES, SHARD_SIZE = 8, 3  # shards of 3, 3 and 2 samples


def config(teacher, data, out, **options) -> ExtractConfig:
    settings = dict(skip_invalid=True, shard_size=SHARD_SIZE, batch_size=2, max_length=MAX_LENGTH,
                    max_prompt_length=MAX_PROMPT, device="cpu") | options
    return ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), **settings)


def cli(*args):
    from mta_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "records.jsonl", LINES)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_teacher_dir, data_file) -> Path:
    """A complete bf16 cache with the default layers, written without interruption."""
    out = tmp_path_factory.mktemp("good") / "cache.zarr"
    summary = extract(config(tiny_teacher_dir, data_file, out))
    assert summary.shards == 3 and summary.shards_reused == 0 and summary.samples == N_SAMPLES
    return out


def copy_of(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "copy.zarr"))


def shard_arrays(root: zarr.Group, name: str) -> dict[str, np.ndarray]:
    """Every array of one shard (states included) by path."""
    group = root[name]
    arrays = {n: a[...] for n, a in group.arrays()}
    arrays |= {f"states/{n}": a[...] for n, a in group["states"].arrays()}
    return arrays


def assert_identical_caches(a: Path, b: Path) -> None:
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    ma, mb = ra.attrs["mta"], rb.attrs["mta"]
    assert ma["config"] == mb["config"]
    assert ma["complete"] and mb["complete"]
    for key in ("n_samples", "n_shards", "n_tokens", "teacher", "tokenizer", "format_version"):
        assert ma[key] == mb[key], key
    assert sorted(ra["shards"].group_keys()) == sorted(rb["shards"].group_keys()) == ["00000", "00001", "00002"]
    for k in range(3):
        name = f"shards/{k:05d}"
        assert dict(ra[name].attrs) == dict(rb[name].attrs)
        xa, xb = shard_arrays(ra, name), shard_arrays(rb, name)
        assert sorted(xa) == sorted(xb) and "states/4" in xa and "input_ids" in xa
        for n in xa:
            assert xa[n].dtype == xb[n].dtype and np.array_equal(xa[n], xb[n]), f"{name}/{n}"
    assert np.array_equal(ra["head/weight"][...], rb["head/weight"][...])


# --- 6. resume --------------------------------------------------------------------------------------------


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (as Ctrl-C would) at a chosen event."""

    def __init__(self, at: str):
        self.at, self.batches, self.events = at, 0, []

    def __call__(self, event: str, info: dict) -> None:
        if event == "status":
            return
        self.events.append((event, dict(info)))
        if event == "batch":
            self.batches += 1
        # batch_size 2 over shards of 3: batches 1-2 are shard 0, batch 3 is the first of shard 1
        if (self.at == "batch" and event == "batch" and self.batches == 3) or \
                (self.at == "shard" and event == "shard" and info["index"] == 0):
            raise KeyboardInterrupt


@pytest.mark.parametrize("at", ["batch", "shard"])
def test_interrupted_extraction_resumes_to_an_identical_cache(at, tmp_path, tiny_teacher_dir, data_file, good):
    out = tmp_path / "cache.zarr"
    interrupt = Interrupt(at)
    with pytest.raises(KeyboardInterrupt):
        extract(config(tiny_teacher_dir, data_file, out), progress=interrupt)
    assert interrupt.events[0] == ("start", {"samples": 8, "tokens": interrupt.events[0][1]["tokens"],
                                             "reused_shards": 0})

    # the first shard was committed, nothing after it; the cache is refused until the extraction finishes
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["mta"]["complete"] is False
    assert root["shards/00000"].attrs["complete"] is True and "shards/00001" not in root
    with pytest.raises(CacheError, match=r"extraction did not finish; re-run the same `mta extract` command"):
        CacheReader(out)
    partial = CacheReader(out, allow_incomplete=True)
    assert partial.shard_indices == [0] and len(partial) == 3
    faults = cache_inspect.verify(str(out))
    assert "cache not marked complete: extraction did not finish (re-run it to resume)" in faults
    assert "shards/00001: missing" in faults and "shards/00002: missing" in faults
    result = cli("cache", "verify", out)
    assert result.exit_code == 1 and "fault: shards/00001: missing" in result.stderr

    if at == "batch":  # a crash in the middle of writing shard 1 leaves a group not marked complete
        group = zarr.open_group(str(out), mode="a").create_group("shards/00001")
        group.create_array("input_ids", shape=(2,), dtype=np.int32)[...] = np.array([7, 7], np.int32)
        assert "shards/00001: not marked complete" in cache_inspect.verify(str(out))

    events = []
    summary = extract(config(tiny_teacher_dir, data_file, out),
                      progress=lambda e, i: events.append((e, i)) if e != "status" else None)
    assert summary.shards_reused == 1 and summary.shards == 3 and summary.samples == N_SAMPLES
    assert events[0][0] == "start" and events[0][1]["reused_shards"] == 1 and events[0][1]["samples"] == 5
    assert [i["index"] for e, i in events if e == "shard"] == [1, 2]
    assert_identical_caches(out, good)
    assert cache_inspect.verify(str(out)) == []
    assert len(CacheReader(out)) == N_SAMPLES


def test_a_complete_cache_rerun_reuses_every_shard(tmp_path, tiny_teacher_dir, data_file, good):
    cache = copy_of(good, tmp_path)
    summary = extract(config(tiny_teacher_dir, data_file, cache))
    assert summary.shards_reused == 3 and summary.bytes_written == 0
    assert_identical_caches(cache, good)


def test_a_different_configuration_is_refused(tmp_path, tiny_teacher_dir, data_file, good):
    cache = copy_of(good, tmp_path)
    before = zarr.open_group(str(cache), mode="r").attrs["mta"]
    with pytest.raises(CacheError, match="different configuration") as e:
        extract(config(tiny_teacher_dir, data_file, cache, layers=[1], dtype="fp16"))
    message = str(e.value)
    assert 'layers: cache has [2, 3, 4], this run has [1, 4]' in message
    assert 'state_dtype: cache has "bf16", this run has "fp16"' in message
    assert "max_length" not in message  # only the keys that differ are listed

    result = cli("extract", "--teacher", tiny_teacher_dir, "--data", data_file, "--out", cache, "--skip-invalid",
                 "--max-length", MAX_LENGTH, "--max-prompt-length", MAX_PROMPT, "--shard-size", SHARD_SIZE,
                 "--batch-size", 2, "--top-k", 3)
    assert result.exit_code == 1
    assert "top_k: cache has 0, this run has 3" in result.stderr and "Use a new --out" in result.stderr

    # the refused runs left the cache as it was
    assert zarr.open_group(str(cache), mode="r").attrs["mta"] == before
    assert cache_inspect.verify(str(cache)) == []
    assert_identical_caches(cache, good)


def test_out_is_refused_when_it_is_not_a_cache(tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "other"
    zarr.open_group(str(out), mode="w").create_array("x", shape=(1,), dtype=np.int8)
    with pytest.raises(CacheError, match="exists and is not an mta cache"):
        extract(config(tiny_teacher_dir, data_file, out))


# --- 7. verify --------------------------------------------------------------------------------------------


def test_verify_passes_on_a_good_cache(good):
    assert cache_inspect.verify(str(good)) == []
    result = cli("cache", "verify", good)
    assert result.exit_code == 0 and f"ok: {good} verified" in result.stdout and result.stderr == ""


def largest_chunk(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != "zarr.json"]
    return max(files, key=lambda p: p.stat().st_size)


def truncate_states_chunk(cache: Path) -> list[str]:
    chunk = largest_chunk(cache / "shards/00000/states")
    layer = chunk.relative_to(cache / "shards/00000/states").parts[0]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    return [f"shards/00000: states/{layer}: unreadable ("]


def flip_payload_byte(cache: Path) -> list[str]:
    """A change inside the compressed payload that still decodes: only the chunk checksum sees it."""
    chunk = largest_chunk(cache / "shards/00001/states")
    layer = chunk.relative_to(cache / "shards/00001/states").parts[0]
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x01
    chunk.write_bytes(bytes(data))
    return [f"shards/00001: states/{layer}: unreadable (ValueError: Stored and computed checksum do not match"]


def flip_header_byte(cache: Path) -> list[str]:
    chunk = largest_chunk(cache / "shards/00001/input_ids")
    data = bytearray(chunk.read_bytes())
    data[4] ^= 0xFF  # the blosc header's uncompressed size: the chunk no longer decodes
    chunk.write_bytes(bytes(data))
    return ["shards/00001: input_ids: unreadable ("]


def nan_in_states(cache: Path) -> list[str]:
    array = zarr.open_array(str(cache / "shards/00001/states/3"), mode="r+")
    array[2, 5] = 0x7FC0  # bf16 NaN
    return ["shards/00001: states/3: contains NaN or inf"]


def inf_in_states(cache: Path) -> list[str]:
    array = zarr.open_array(str(cache / "shards/00002/states/4"), mode="r+")
    array[0, 0] = 0xFF80  # bf16 -inf
    return ["shards/00002: states/4: contains NaN or inf"]


def token_ptr_past_the_end(cache: Path) -> list[str]:
    array = zarr.open_array(str(cache / "shards/00000/token_ptr"), mode="r+")
    end = int(array[3])
    array[3] = end + 1
    return [f"shards/00000: input_ids: {end} rows, token_ptr says {end + 1}",
            f"shards/00000: offsets: {end} rows, token_ptr says {end + 1}",
            f"shards/00000: token_ptr ends at {end + 1}, shard attrs say {end} tokens"]


def token_ptr_decreasing(cache: Path) -> list[str]:
    array = zarr.open_array(str(cache / "shards/00001/token_ptr"), mode="r+")
    array[1] = int(array[2]) + 1
    return ["shards/00001: token_ptr: not a valid row pointer for 3 samples"]


def missing_shard(cache: Path) -> list[str]:
    shutil.rmtree(cache / "shards/00002")
    return ["shards/00002: missing"]


def incomplete_shard(cache: Path) -> list[str]:
    group = zarr.open_group(str(cache / "shards/00001"), mode="r+")
    group.attrs["complete"] = False
    return ["shards/00001: not marked complete"]


def missing_layer(cache: Path) -> list[str]:
    shutil.rmtree(cache / "shards/00000/states/2")
    return ["shards/00000: states/2: missing"]


@pytest.mark.parametrize("corrupt", [truncate_states_chunk, flip_payload_byte, flip_header_byte, nan_in_states, inf_in_states,
                                     token_ptr_past_the_end, token_ptr_decreasing, missing_shard, incomplete_shard,
                                     missing_layer])
def test_verify_catches(corrupt, tmp_path, good):
    cache = copy_of(good, tmp_path)
    expected = corrupt(cache)
    faults = cache_inspect.verify(str(cache))
    for prefix in expected:
        assert any(f.startswith(prefix) for f in faults), (prefix, faults)
    assert len(faults) == len(expected), faults  # nothing else is blamed
    result = cli("cache", "verify", cache)
    assert result.exit_code == 1 and "verified" not in result.stdout
    assert [line.removeprefix("fault: ") for line in result.stderr.splitlines()] == faults


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory, tiny_teacher_dir) -> dict:
    """fp32 and int8 caches of two records (for the NaN checks of those encodings)."""
    base = tmp_path_factory.mktemp("small")
    data = write_jsonl(base / "two.jsonl", [LINES[0], LINES[1]])
    caches = {}
    for dtype in ("fp32", "int8"):
        caches[dtype] = base / f"{dtype}.zarr"
        extract(config(tiny_teacher_dir, data, caches[dtype], dtype=dtype, skip_invalid=False))
        assert cache_inspect.verify(str(caches[dtype])) == []
    return caches


@pytest.mark.parametrize("dtype, array, expected", [
    ("fp32", "states/2", "shards/00000: states/2: contains NaN or inf"),
    ("int8", "states/4.scale", "shards/00000: states/4.scale: contains NaN or inf"),
])
def test_verify_catches_nan_in_other_encodings(dtype, array, expected, tmp_path, small_caches):
    cache = copy_of(small_caches[dtype], tmp_path)
    target = zarr.open_array(str(cache / "shards/00000" / array), mode="r+")
    index = (1, 3) if target.ndim == 2 else (1,)
    target[index] = np.nan
    assert cache_inspect.verify(str(cache)) == [expected]


def test_verify_on_a_path_that_is_not_a_cache(tmp_path):
    faults = cache_inspect.verify(str(tmp_path / "nothing.zarr"))
    assert len(faults) == 1 and faults[0].startswith(f"no mta cache at {tmp_path / 'nothing.zarr'}")
    assert cli("cache", "verify", tmp_path / "nothing.zarr").exit_code == 1


# --- 8. info, show, --version, --help ---------------------------------------------------------------------


def shard_bytes_on_disk(cache: Path) -> int:
    """Bytes of every array under shards/: its chunk files and its own zarr.json (groups' zarr.json not counted)."""
    files = [p for p in (cache / "shards").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files
               if p.name != "zarr.json" or json.loads(p.read_text())["node_type"] == "array")


def shard_raw_bytes(cache: Path) -> int:
    """Bytes of every shard array once decoded."""
    root = zarr.open_group(str(cache), mode="r")
    return sum(a.nbytes for k in range(3) for a in shard_arrays(root, f"shards/{k:05d}").values())


def test_cache_info_json(good):
    result = cli("cache", "info", good, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    meta = zarr.open_group(str(good), mode="r").attrs["mta"]
    assert info["samples"] == N_SAMPLES and info["tokens"] == meta["n_tokens"] > N_SAMPLES
    assert info["complete"] is True and info["shards"] == "3/3" and info["layers"] == [2, 3, 4]
    assert info["state_dtype"] == "bf16" and info["top_k"] == 0 and info["teacher_layers"] == 4
    assert info["hidden_size"] == 48 and info["vocab_size"] == 400
    assert info["teacher_architecture"] == "LlamaForCausalLM"
    # bytes on disk of the shards' arrays (chunks and each array's zarr.json), counted here from the files, per
    # token and per raw byte of the decoded arrays: exact up to float rounding
    stored, raw = shard_bytes_on_disk(good), shard_raw_bytes(good)
    assert info["bytes_per_token"] == pytest.approx(stored / info["tokens"], rel=1e-12)
    assert info["compression_ratio"] == pytest.approx(stored / raw, rel=1e-12)
    # the states' chunks alone: three bf16 layers of 48 values are 288 raw bytes a token, which Blosc zstd with
    # byte shuffle stores at about 0.75 of that (design.md); tolerance ±0.1
    states = sum(p.stat().st_size for p in good.glob("shards/*/states/*/c/**/*") if p.is_file())
    assert 0.65 < states / (info["tokens"] * 3 * 48 * 2) < 0.85
    assert info["bytes_on_disk"] == pytest.approx(
        info["bytes_per_token"] * info["tokens"] + info["head_bytes"], rel=1e-9)
    assert info["head_bytes"] > 0 and info["words_per_sample"] > 1 and info["phrases_per_sample"] > 1
    table = cli("cache", "info", good)
    assert table.exit_code == 0 and "bytes_per_token" in table.stdout and "LlamaForCausalLM" in table.stdout


def test_cache_info_on_a_missing_path(tmp_path):
    result = cli("cache", "info", tmp_path / "nothing.zarr")
    assert result.exit_code == 1 and "no mta cache at" in result.stderr


def test_cache_show(good):
    sample = CacheReader(good)[0]
    result = cli("cache", "show", good, "--sample", 0)
    assert result.exit_code == 0, result.output
    assert sample.text == "### Instruction:\nName three primary colors.\n\n### Response:\n" \
                          "Red, blue and yellow are the primary colors."
    assert sample.text in result.stdout
    result = cli("cache", "show", good, "--sample", 8)
    assert result.exit_code == 1 and "sample 8 out of range; the cache holds 8 samples" in result.stderr


def test_version_from_the_console_script(tmp_path):
    """`mta --version` through the console-script entry point declared by this tree's pyproject.toml, run as
    the generated `mta` launcher runs it, in a fresh interpreter with this tree first on its path (and a
    working directory outside it): the process imports mta_cli from this tree, whatever `mta` is installed."""
    repo = Path(__file__).resolve().parent.parent
    assert Path(mta_cli.__file__).resolve() == repo / "mta_cli" / "__init__.py"
    module, function = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["mta"].split(":")
    launcher = (f"import sys, mta_cli; from {module} import {function}; sys.stderr.write(mta_cli.__file__); "
                f"sys.argv[0] = 'mta'; sys.exit({function}())")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", launcher, "--version"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"mta {__version__}"
    assert Path(result.stderr).resolve() == repo / "mta_cli" / "__init__.py"
    assert cli("--version").stdout.strip() == f"mta {__version__}"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_cache_behind_an_fsspec_url_matches_the_local_one(scheme, tmp_path, tiny_teacher_dir, data_file, good):
    """`--out` takes any fsspec URL: the same extraction through fsspec gives the same arrays, reads and verifies."""
    url = f"memory://{tmp_path.name}/cache.zarr" if scheme == "memory" else f"file://{tmp_path}/cache.zarr"
    extract(config(tiny_teacher_dir, data_file, url))
    assert cache_inspect.verify(url) == []
    remote, local = CacheReader(url), CacheReader(str(good))
    assert len(remote) == len(local) == N_SAMPLES
    for i in (0, N_SAMPLES - 1):
        assert remote[i].text == local[i].text
        assert np.array_equal(remote[i].input_ids, local[i].input_ids)
        for layer in local.layers:
            assert np.array_equal(remote[i].states[layer].numpy(), local[i].states[layer].numpy())


def test_a_crash_inside_a_shards_array_writes_leaves_it_to_be_rewritten(tmp_path, tiny_teacher_dir, data_file, good,
                                                                        monkeypatch):
    """The disk fails after some of shard 1's arrays are written: that shard is not marked complete, so the
    reader does not serve it, verify names it, and the resumed extraction rewrites it (reusing only shard 0)
    into the cache an uninterrupted run makes."""
    out = tmp_path / "cache.zarr"
    write_arrays = CacheWriter.write_arrays

    def fail_midway(self, group, arrays):
        if group.path != "shards/00001":
            return write_arrays(self, group, arrays)
        write_arrays(self, group, dict(list(arrays.items())[:4]))
        raise OSError("no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(CacheWriter, "write_arrays", fail_midway)
        with pytest.raises(OSError, match="no space left on device"):
            extract(config(tiny_teacher_dir, data_file, out))
    root = zarr.open_group(str(out), mode="r")
    assert len(list(root["shards/00001"].array_keys())) == 4  # the crash happened inside the shard's writes
    assert not root["shards/00001"].attrs.get("complete")
    assert CacheReader(out, allow_incomplete=True).shard_indices == [0]
    assert "shards/00001: not marked complete" in cache_inspect.verify(str(out))
    summary = extract(config(tiny_teacher_dir, data_file, out))
    assert summary.shards_reused == 1 and summary.shards == 3
    assert_identical_caches(out, good)
