"""`mta extract --device-map`: a teacher spread by accelerate's big-model loading gives the cache of a teacher on
one device. Without a GPU the split tested is CPU memory + disk offload (--max-memory cpu=... --offload-folder):
the upper layers, the final norm and the head are offloaded, so the head, the norm (logit lens) and the weights'
fingerprint are all read from offloaded weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mta_cli.cli import app
from mta_cli.extraction import ExtractConfig, parse_max_memory
from mta_cli.models import load_causal_lm, weights_fingerprint
from tests import tiny

CPU_BUDGET = "250KB"  # of the tiny teacher's ~490 KB: embeddings and 1-2 blocks in memory, the rest on disk


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_teacher_split_over_memory_and_disk_gives_the_same_cache(tmp_path, tiny_teacher_dir, tiny_fp32_cache):
    placement = {"device_map": "auto", "max_memory": {"cpu": CPU_BUDGET}, "offload_folder": str(tmp_path / "a")}
    split = load_causal_lm(str(tiny_teacher_dir), "fp32", placement=placement)
    assert {"cpu", "disk"} <= set(split.hf_device_map.values()) and split.hf_device_map["lm_head"] == "disk"
    assert weights_fingerprint(split) == weights_fingerprint(load_causal_lm(str(tiny_teacher_dir), "fp32"))

    data = tmp_path / "records.jsonl"  # the records and options of `tiny_fp32_cache`, with the teacher split
    tiny.write_jsonl(data, tiny.RECORDS)
    out = tmp_path / "cache.zarr"
    result = cli("extract", "--teacher", tiny_teacher_dir, "--data", data, "--out", out, "--dtype", "fp32",
                 "--batch-size", 1, "--shard-size", 5, "--max-length", 64, "--max-prompt-length", 32,
                 "--device-map", "auto", "--max-memory", f"cpu={CPU_BUDGET}", "--offload-folder", tmp_path / "b")
    assert result.exit_code == 0, result.output
    ours, reference = zarr.open_group(str(out), mode="r"), zarr.open_group(tiny_fp32_cache, mode="r")
    assert ours.attrs["mta"]["config"] == reference.attrs["mta"]["config"]  # same teacher fingerprint too
    assert ours.attrs["mta"]["teacher"]["head"] == reference.attrs["mta"]["teacher"]["head"]
    arrays = [name for name, node in reference.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert "head/weight" in arrays and "head/norm_weight" in arrays and "shards/00001/states/4" in arrays
    for name in arrays:
        assert np.array_equal(ours[name][...], reference[name][...]), name


@pytest.mark.parametrize("text, parsed", [("cpu=64GiB", {"cpu": "64GiB"}), (" cpu = 300MB ", {"cpu": "300MB"}),
                                          (None, None)])
def test_max_memory_parses(text, parsed):
    assert parse_max_memory(text) == parsed


@pytest.mark.parametrize("options, message", [
    ({"max_memory": "cpu=1GiB"}, r"--max-memory only apply with --device-map"),
    ({"device_map": "everywhere"}, r"--device-map must be one of auto, balanced, balanced_low_0, sequential"),
    ({"device_map": "auto", "device": "cpu"}, r"--device-map places the teacher over the devices itself; drop --device cpu"),
    ({"device_map": "auto", "max_memory": "cpu:1GiB"}, r"each entry is DEVICE=SIZE, e\.g\. 0=20GiB,cpu=64GiB \(got 'cpu:1GiB'\)"),
    ({"device_map": "auto", "max_memory": "cpu=lots"}, r"each entry is DEVICE=SIZE"),
    ({"device_map": "auto", "max_memory": "cpu=0"}, r"each entry is DEVICE=SIZE"),
    ({"device_map": "auto", "max_memory": "7=1GiB"}, r"GPU 7 is not there \(this machine has \d CUDA device\(s\)\)"),
    ({"device_map": "auto", "max_memory": "tpu=1GiB"}, r"'tpu' is no device; use a GPU index, cpu or mps"),
])
def test_bad_placement_options_are_one_line(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ExtractConfig(teacher="t", data="d", out=str(tmp_path / "c"), **options)


def test_a_gguf_teacher_cannot_be_spread_and_the_cli_says_so(tmp_path):
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(tiny.RECORDS[0]) + "\n")
    result = cli("extract", "--teacher", gguf, "--data", data, "--out", tmp_path / "c", "--device-map", "auto")
    assert result.exit_code == 1
    assert "--device-map needs a model folder or hub name" in result.stderr


def test_device_map_and_torchrun_exclude_each_other(monkeypatch, tmp_path):
    from mta_cli.extraction import extract

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"--device-map spreads one teacher over the devices of one process"):
        extract(ExtractConfig(teacher="t", data="d", out=str(tmp_path / "c"), device_map="auto"))
