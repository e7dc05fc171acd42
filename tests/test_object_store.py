"""Caches on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1, reached through
fsspec/s3fs with the usual environment variables (AWS_ENDPOINT_URL, keys, region), exactly as a user's S3 or
MinIO. extract, verify, info, train and eval all work on it, and the lock object keeps a second extraction out
until its holder is gone or silent.
"""

from __future__ import annotations

import json
import logging
import time

import fsspec
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mta_cli.cache.lock import LockedError, ObjectLock
from mta_cli.cli import app
from tests import tiny

BUCKET = "mta-test"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def s3():
    """A local S3 server for this module, and the environment that points fsspec at it."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("s3-data") / "records.jsonl"
    tiny.write_jsonl(path, tiny.RECORDS)
    return path


def extract_args(teacher, data, out) -> list:
    return ["extract", "--teacher", teacher, "--data", data, "--out", out, "--shard-size", 3, "--batch-size", 4,
            "--max-length", 64, "--max-prompt-length", 32, "--device", "cpu"]


def test_extract_verify_info_train_and_eval_on_s3(s3, tmp_path, tiny_teacher_dir, data):
    url = f"s3://{BUCKET}/round-trip/cache.zarr"
    result = cli(*extract_args(tiny_teacher_dir, data, url), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"] == 3

    local = tmp_path / "local.zarr"  # the same extraction on disk: the S3 cache holds the same arrays
    assert cli(*extract_args(tiny_teacher_dir, data, local)).exit_code == 0
    remote, disk = zarr.open_group(url, mode="r"), zarr.open_group(str(local), mode="r")
    for name, array in disk.members(max_depth=None):
        if isinstance(array, zarr.Array):
            assert np.array_equal(remote[name][...], array[...]), name
    assert not fsspec.filesystem("s3").exists(f"{BUCKET}/round-trip/cache.zarr.lock")  # released

    verified = cli("cache", "verify", url)
    assert verified.exit_code == 0 and f"ok: {url} verified" in verified.stdout
    info = json.loads(cli("cache", "info", url, "--json").stdout)
    assert (info["samples"], info["shards"], info["complete"], info["faults"]) == (8, "3/3", True, 0)
    assert info["bytes_on_disk"] > 0

    run = tmp_path / "run"
    trained = cli("train", "--cache", url, "--out", run, "--init-from-teacher", "--keep-layers", 2, "--mta",
                  "--batch-size", 4, "--max-steps", 3, "--device", "cpu", "--json")
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["steps"] == 3
    assert json.loads((run / "training_config.json").read_text())["cache"] == url

    report = tmp_path / "eval.json"
    evaluated = cli("eval", "--model", run, "--data", data, "--cache", url, "--cache-samples", 4, "--greedy",
                    "--max-new-tokens", 4, "--max-records", 2, "--device", "cpu", "--json", report)
    assert evaluated.exit_code == 0, evaluated.output
    assert str(run) in report.read_text() and "cka" in report.read_text().lower()


def test_the_lock_object_keeps_a_second_extraction_out(s3, tiny_teacher_dir, data):
    url = f"s3://{BUCKET}/locked/cache.zarr"
    with ObjectLock(url) as held:
        assert held.locked
        with pytest.raises(LockedError, match=r"is being written by another extraction \(pid \d+ on .*; last heard"):
            ObjectLock(url).__enter__()
        result = cli(*extract_args(tiny_teacher_dir, data, url))
        assert result.exit_code == 1 and "is being written by another extraction" in result.stderr
    fs = fsspec.filesystem("s3")
    assert not fs.exists(f"{BUCKET}/locked/cache.zarr.lock")


def test_a_silent_lock_is_taken_over_and_a_live_one_keeps_beating(s3):
    url = f"s3://{BUCKET}/stale/cache.zarr"
    fs = fsspec.filesystem("s3")
    abandoned = {"host": "gone", "pid": 1, "since": "2020-01-01 00:00:00", "heartbeat": time.time() - 600}
    fs.pipe_file(f"{BUCKET}/stale/cache.zarr.lock", json.dumps(abandoned).encode())
    with ObjectLock(url, heartbeat=0.2) as lock:
        first = json.loads(fs.cat_file(f"{BUCKET}/stale/cache.zarr.lock"))
        assert lock.locked and first["host"] != "gone"
        time.sleep(1.0)
        assert json.loads(fs.cat_file(f"{BUCKET}/stale/cache.zarr.lock"))["heartbeat"] > first["heartbeat"]
