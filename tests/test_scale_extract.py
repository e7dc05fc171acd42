"""`mta extract` under torchrun (2 CPU ranks, gloo): the cache equals a one-process cache array by array, a
2-rank run killed mid-way resumes under 1 rank to the same cache, and a failure on one rank stops every rank
with that rank's message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mta_cli.cache import inspect as cache_inspect
from mta_cli.extraction import ExtractConfig, extract
from tests import launch, tiny

OPTIONS = {"shard_size": 2, "batch_size": 1, "max_length": 64, "max_prompt_length": 32, "device": "cpu"}


def arguments(teacher, data, out) -> list:
    flags = [x for key, value in OPTIONS.items() for x in ("--" + key.replace("_", "-"), value)]
    return ["extract", "--teacher", teacher, "--data", data, "--out", out, *flags]


def assert_same_cache(a: Path, b: Path) -> None:
    """Same metadata that decides the content, same shards with the same attributes, every array equal."""
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    ma, mb = ra.attrs["mta"], rb.attrs["mta"]
    assert ma["complete"] and mb["complete"]
    for key in ("config", "n_samples", "n_shards", "n_tokens", "teacher", "tokenizer", "data"):
        assert ma[key] == mb[key], key
    arrays = {name: node for name, node in ra.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert len(arrays) == len([n for n, x in rb.members(max_depth=None) if isinstance(x, zarr.Array)])
    assert "shards/00011/states/4" in arrays and "head/weight" in arrays
    for name, array in arrays.items():
        other = rb[name]
        assert array.dtype == other.dtype and np.array_equal(array[...], other[...]), name
    for k in range(ma["n_shards"]):
        assert dict(ra[f"shards/{k:05d}"].attrs) == dict(rb[f"shards/{k:05d}"].attrs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "records.jsonl"
    tiny.write_jsonl(path, tiny.RECORDS * 3)  # 24 samples, 12 shards of 2
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir, data) -> Path:
    """The cache of one process (this one, one thread, like each rank)."""
    out = tmp_path_factory.mktemp("one-rank") / "cache.zarr"
    extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data), out=str(out), **OPTIONS))
    return out


def test_two_ranks_write_the_cache_one_rank_writes(tmp_path, tiny_teacher_dir, data, reference):
    out = tmp_path / "cache.zarr"
    result = launch.torchrun(*arguments(tiny_teacher_dir, data, out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # rank 0 alone prints the summary, for the whole job
    assert (summary["ranks"], summary["samples"], summary["shards"], summary["shards_reused"]) == (2, 24, 12, 0)
    assert summary["tokens"] == zarr.open_group(str(reference), mode="r").attrs["mta"]["n_tokens"]
    assert summary["tokens_per_second"] > 0 and summary["bytes_written"] > 0
    assert "error" not in result.stderr
    assert_same_cache(out, reference)
    assert cache_inspect.verify(str(out)) == []
    assert not (tmp_path / "cache.zarr.lock").exists()  # rank 0 held the job's lock and released it


def test_a_two_rank_run_killed_mid_way_resumes_under_one_rank(tmp_path, tiny_teacher_dir, data, reference):
    out = tmp_path / "cache.zarr"
    job = launch.start(*arguments(tiny_teacher_dir, data, out))
    deadline = time.monotonic() + launch.TIMEOUT
    while not any(json.loads(p.read_text()).get("attributes", {}).get("complete")
                  for p in out.glob("shards/*/zarr.json") if p.stat().st_size):
        assert job.poll() is None and time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.05)
    launch.kill(job)
    root = zarr.open_group(str(out), mode="r")
    done = [k for k in range(12) if f"shards/{k:05d}" in root and root[f"shards/{k:05d}"].attrs.get("complete")]
    assert root.attrs["mta"]["complete"] is False and 1 <= len(done) < 12

    summary = extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data), out=str(out), **OPTIONS))
    assert summary.ranks == 1 and summary.shards_reused >= len(done)
    assert_same_cache(out, reference)


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path, tiny_teacher_dir, data):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(  # rank 1 cannot write its shards
        "import errno, os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from mta_cli.cache import store\n"
        "    def refuse(self, index, arrays, attrs):\n"
        "        raise OSError(errno.EACCES, 'Permission denied', f'shards/{index:05d}')\n"
        "    store.CacheWriter.write_shard = refuse\n")
    out = tmp_path / "cache.zarr"
    started = time.monotonic()
    result = launch.torchrun(*arguments(tiny_teacher_dir, data, out), env={"PYTHONPATH": f"{inject}:{launch.REPO}"})
    assert result.returncode != 0 and time.monotonic() - started < launch.TIMEOUT
    assert ("error: [rank 1] shards/00001: Permission denied; choose a location you can write to, or fix its "
            "permissions") in result.stderr
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["mta"]["complete"] is False and "shards/00001" not in root
