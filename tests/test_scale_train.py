"""`mta train` under torchrun (2 CPU ranks, gloo): DDP and FSDP2 follow the loss curve of one process on the
same global batches (fp32: within 1e-5 relative per step) and end with the same weights; their checkpoints
resume in one plain process. Uneven shares of a global batch, and an empty one (a batch of one sample over
two ranks), are covered by the `sft` run at --batch-size 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mta_cli.extraction import ExtractConfig, extract
from mta_cli.training.batches import rank_share
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests import launch, tiny

RUNS = {  # name: (loss, --mta, global batch size)
    "sft": ("sft", False, 3),             # windows of 4 samples: batches of 3 and 1 (the 1 leaves rank 1 empty)
    "srkl-mta": ("srkl", True, 8),        # 2 x 4 against 1 x 8
}
STEPS = 4
COMPONENTS = ("loss", "ce", "kd", "dsa", "hid")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher_dir) -> Path:
    """fp32 states of 24 samples in shards of 2."""
    base = tmp_path_factory.mktemp("scale-train")
    data = base / "records.jsonl"
    tiny.write_jsonl(data, tiny.RECORDS * 3)
    out = base / "cache.zarr"
    extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data), out=str(out), dtype="fp32", shard_size=2,
                          batch_size=4, max_length=64, max_prompt_length=32, device="cpu"))
    return out


def options(name: str) -> dict:
    loss, mta, batch_size = RUNS[name]
    return {"init_from_teacher": True, "keep_layers": 2, "batch_size": batch_size, "max_steps": STEPS,
            "checkpoint_every": 2, "device": "cpu", "objective": ObjectiveConfig(loss=loss, mta=mta)}


def arguments(name: str, cache: Path, out: Path) -> list:
    loss, mta, batch_size = RUNS[name]
    return ["train", "--cache", cache, "--out", out, "--init-from-teacher", "--keep-layers", 2, "--loss", loss,
            *(["--mta"] if mta else []), "--batch-size", batch_size, "--max-steps", STEPS, "--checkpoint-every", 2,
            "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache) -> dict[str, Path]:
    """Each run in this one process (one thread, like each rank)."""
    runs = {}
    for name in RUNS:
        runs[name] = tmp_path_factory.mktemp(f"single-{name}") / "run"
        train(TrainConfig(out=str(runs[name]), cache=str(cache), **options(name)))
    return runs


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(run: Path, reference: Path, steps=range(1, STEPS + 1)) -> None:
    got, want = metrics(run), [m for m in metrics(reference) if m["step"] in steps]
    assert [m["step"] for m in got] == list(steps)
    for a, b in zip(got, want):
        assert (a["tokens"], a["lr"]) == (b["tokens"], b["lr"])  # the same global batches and schedule
        for key in COMPONENTS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)


def assert_same_weights(run: Path, reference: Path) -> None:
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_rank_shares_cover_a_global_batch_once():
    assert [rank_share([7, 8, 9, 10, 11, 12, 13, 14], r, 2) for r in (0, 1)] == [([7, 8, 9, 10], 1.0),
                                                                                ([11, 12, 13, 14], 1.0)]
    assert [rank_share([7, 8, 9], r, 2) for r in (0, 1)] == [([7], 1.0), ([8, 9], 1.0)]
    assert [rank_share([7], r, 2) for r in (0, 1)] == [([7], 0.0), ([7], 1.0)]  # rank 0 steps on a stand-in


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, cache) -> dict[str, tuple[Path, dict]]:
    """Each run under `torchrun --nproc-per-node 2` (DDP) through the command line: run folder and summary."""
    runs = {}
    for name in RUNS:
        out = tmp_path_factory.mktemp(f"ddp-{name}") / "run"
        result = launch.torchrun(*arguments(name, cache, out))
        assert result.returncode == 0, result.stderr
        runs[name] = (out, json.loads(result.stdout))  # rank 0 alone prints the summary
    return runs


@pytest.mark.parametrize("name", RUNS)
def test_ddp_follows_the_one_process_loss_curve(name, ddp, single):
    out, summary = ddp[name]
    assert summary["ranks"] == 2 and summary["steps"] == STEPS
    assert_same_curve(out, single[name])
    assert_same_weights(out, single[name])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_ddp_checkpoint_resumes_in_one_process(tmp_path, ddp, single, cache):
    out = tmp_path / "run"
    shutil.copytree(ddp["srkl-mta"][0] / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    shutil.copy(ddp["srkl-mta"][0] / "training_config.json", out)
    train(TrainConfig(out=str(out), cache=str(cache), resume=True, **options("srkl-mta")))
    assert_same_curve(out, single["srkl-mta"], steps=range(3, STEPS + 1))
    assert_same_weights(out, single["srkl-mta"])


def test_fsdp_follows_the_curve_and_its_checkpoint_resumes_in_one_process(tmp_path, cache, single):
    out = tmp_path / "fsdp"
    result = launch.torchrun(*arguments("srkl-mta", cache, out), "--fsdp")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ranks"] == 2
    assert_same_curve(out, single["srkl-mta"])
    assert_same_weights(out, single["srkl-mta"])
    record = json.loads((out / "training_config.json").read_text())
    assert record["fsdp"] is True and record["batch_size"] == 8

    plain = tmp_path / "plain"  # its step-2 checkpoint (gathered from the shards) in a plain process
    shutil.copytree(out / "checkpoints" / "step-000002", plain / "checkpoints" / "step-000002")
    shutil.copy(out / "training_config.json", plain)
    train(TrainConfig(out=str(plain), cache=str(cache), resume=True, **options("srkl-mta")))
    assert_same_curve(plain, single["srkl-mta"], steps=range(3, STEPS + 1))
    assert_same_weights(plain, single["srkl-mta"])


def test_fsdp_and_the_online_baseline_need_the_right_launch(monkeypatch, tmp_path, cache, tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"--fsdp shards the student over the processes of a torchrun job"):
        train(TrainConfig(out=str(tmp_path / "a"), cache=str(cache), fsdp=True, **options("sft")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"training on --data \(the online baseline, or sft without a teacher\) runs in one process"):
        train(TrainConfig(out=str(tmp_path / "b"), teacher=str(tiny_teacher_dir), data=str(cache), student=None,
                          init_from_teacher=True, keep_layers=2, device="cpu"))
