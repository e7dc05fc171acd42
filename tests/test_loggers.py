"""`mta train --report-to`: TensorBoard event files hold exactly what metrics.jsonl holds (also across a resume);
wandb is refused with the install command when it is not installed, and logs offline when it is."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mta_cli.cli import app
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train


def config(out: Path, cache: str, **options) -> TrainConfig:
    options = {"init_from_teacher": True, "keep_layers": 2, "batch_size": 2, "seed": 0, "device": "cpu",
               "max_steps": 4, "checkpoint_every": 2} | options
    return TrainConfig(out=str(out), cache=cache, objective=ObjectiveConfig(loss="srkl", mta=True), **options)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files, read back with TensorBoard's own reader."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = reader.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    lines = metrics(run)
    return {key: [(line["step"], line[key]) for line in lines] for key in lines[0] if key != "step"}


def assert_same(logged: dict, wanted: dict) -> None:
    assert sorted(logged) == sorted(wanted)
    for tag, points in wanted.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_tensorboard_events_equal_metrics_jsonl(tiny_fp32_cache, tmp_path):
    run = tmp_path / "run"
    train(config(run, tiny_fp32_cache, report_to=["tensorboard"]))
    logged = scalars(run)
    assert {"loss", "ce", "kd", "dsa", "hid", "lr", "tokens_per_second"} <= set(logged)
    assert_same(logged, expected(run))


def test_a_resumed_run_logs_each_step_once(tiny_fp32_cache, tmp_path):
    """Interrupted after step 3 (checkpoint at 2), resumed: steps 3 and 4 are redone; TensorBoard shows the
    redone values only, as metrics.jsonl does."""
    run = tmp_path / "run"

    def stop_after_3(event, info):
        if event == "step" and info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(run, tiny_fp32_cache, report_to=["tensorboard"]), progress=stop_after_3)
    train(config(run, tiny_fp32_cache, report_to=["tensorboard"], resume=True))
    assert [line["step"] for line in metrics(run)] == [1, 2, 3, 4]
    assert_same(scalars(run), expected(run))


def test_wandb_is_refused_when_it_is_not_installed(tiny_fp32_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as without the package
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", "--cache", tiny_fp32_cache, "--init-from-teacher", "--keep-layers", "2",
                                      "--out", str(out), "--device", "cpu", "--report-to", "wandb"])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: --report-to wandb needs the wandb package, which is not installed: "
                                     "pip install 'mta-cli[wandb]' (or drop --report-to wandb)")
    assert not out.exists()


def test_an_unknown_logger_is_refused(tiny_fp32_cache, tmp_path):
    result = CliRunner().invoke(app, ["train", "--cache", tiny_fp32_cache, "--init-from-teacher", "--keep-layers", "2",
                                      "--out", str(tmp_path / "x"), "--report-to", "mlflow"])
    assert result.exit_code == 1
    assert "error: --report-to must be one of tensorboard, wandb, got 'mlflow'" in result.stderr


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run, read back from its transaction log (`run-*.wandb`): a
    7-byte file header, then LevelDB-log records (crc32 4 B, length 2 B, type 1 B: 1 full, 2 first, 3 middle,
    4 last) in 32 KiB blocks, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    position, pending, rows = 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_logs_every_step_of_metrics_jsonl(tiny_fp32_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(config(run, tiny_fp32_cache, report_to=["wandb"], checkpoint_every=0))
    [run_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]}
              for row in wandb_history(run_file)]
    assert logged == metrics(run)
