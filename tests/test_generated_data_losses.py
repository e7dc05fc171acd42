"""DistiLLM-2's loss against a hand computation, and DistiLLM's adaptive share of student-generated data
(the rule, the mixer's weights, a run that follows it and resumes it exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from mta_cli.losses.distillm2 import beta_at, distillm2_loss, sequence_weights, skew_reverse_kl_detached
from mta_cli.losses.kd import LogitHead
from mta_cli.training.mixing import StudentDataSchedule
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests.test_mixing import two_caches  # noqa: F401 - fixtures


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * np.log(p / q)).sum(-1)


def test_skew_reverse_kl_with_the_student_mixture_detached():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(4, 7, generator=g,
                                                                                              dtype=torch.float64)
    value = skew_reverse_kl_detached(torch.log_softmax(s, -1), torch.log_softmax(t, -1), 0.1)
    p_s, p_t = softmax(s.detach().numpy()), softmax(t.numpy())
    np.testing.assert_allclose(value.detach().numpy(), kl(p_s, 0.9 * p_t + 0.1 * p_s), rtol=1e-12)
    value.sum().backward()
    # by hand: d/ds KL(p_S ‖ m) with m held fixed = d/ds Σ p_S (log p_S - log m)
    s2 = s.detach().clone().requires_grad_()
    p = torch.softmax(s2, -1)
    m = 0.9 * torch.softmax(t, -1) + 0.1 * p.detach()
    (p * (torch.log(p) - torch.log(m))).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-12, atol=1e-14)


def test_sequence_weights_average_each_sequence_then_the_sequences():
    targets = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    np.testing.assert_allclose(sequence_weights(targets).numpy(), [1 / 6, 1 / 6, 1 / 6, 1 / 2])


@pytest.mark.parametrize("progress, gradual, expected", [(0.0, True, 1.0), (0.25, True, 1.25), (0.5, True, 1.5),
                                                         (0.9, True, 1.5), (0.7, False, 1.0)])
def test_beta(progress, gradual, expected):
    assert beta_at(progress, 1.0, gradual) == expected


@pytest.mark.parametrize("student_generated", [False, True])
def test_distillm2_loss_equals_the_hand_computation(student_generated):
    g = torch.Generator().manual_seed(1)
    head_s = LogitHead(torch.randn(9, 5, generator=g, dtype=torch.float64))
    head_t = LogitHead(torch.randn(9, 6, generator=g, dtype=torch.float64))
    targets = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)        # sequences of 3 and 1 tokens
    h_s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 4, 2, 7])
    out = distillm2_loss(h_s, head_s, h_t, head_t, labels, sequence_weights(targets), student_generated, beta=1.2,
                         chunk_size=3)
    p_s = softmax((h_s.detach() @ head_s.weight.T).numpy())
    p_t = softmax((h_t @ head_t.weight.T).numpy())
    if student_generated:
        per_token, factor = kl(p_s, 0.9 * p_t + 0.1 * p_s), 1.2
    else:
        per_token, factor = kl(p_t, 0.1 * p_t + 0.9 * p_s), 2 - 1.2
    expected = (per_token[:3].mean() + per_token[3]) / 2
    assert out["kd"].item() == pytest.approx(expected, rel=1e-12)
    assert out["loss"].item() == pytest.approx(factor * expected, rel=1e-12)
    ce = -np.log(p_s[np.arange(4), labels.numpy()]).mean()
    assert out["ce"].item() == pytest.approx(ce, rel=1e-12)


# --- the adaptive share of student-generated data ----------------------------------------------------------------


def test_the_share_rises_as_distillm_raises_it():
    schedule = StudentDataSchedule()
    assert not schedule.observe(2.0) and schedule.share == 0.0          # the first dev loss is the reference
    assert not schedule.observe(2.05) and schedule.share == 0.0         # grew by less than eps
    assert schedule.observe(2.1) and schedule.share == pytest.approx(0.1)  # grew by eps: rise, new reference
    assert not schedule.observe(2.15) and schedule.observe(2.3) and schedule.share == pytest.approx(0.2)
    schedule.share = 0.95
    assert schedule.observe(9.0) and schedule.share == 1.0
    weights = StudentDataSchedule(share=0.3).weights([1.0, 1.0, 2.0], ["dataset", "student", "student"])
    np.testing.assert_allclose(weights, [0.7, 0.1, 0.2])
    with pytest.raises(ValueError, match="needs a cache of student-generated responses"):
        StudentDataSchedule().weights([1.0], ["dataset"])


def mark_student_generated(cache) -> None:
    root = zarr.open_group(str(cache), mode="r+")
    meta = root.attrs["mta"]
    meta["data"]["generated_by"] = [{"model": "student", "weights_sha256": "f" * 64}]
    root.attrs["mta"] = meta


@pytest.fixture
def dataset_and_student_caches(tmp_path, two_caches):
    import shutil

    student = shutil.copytree(two_caches[1], tmp_path / "student.zarr")
    mark_student_generated(student)
    return str(two_caches[0]), str(student)


def test_distillm2_trains_from_teacher_and_student_generated_caches(tmp_path, dataset_and_student_caches):
    data, student = dataset_and_student_caches
    summary = train(TrainConfig(out=str(tmp_path / "run"), cache=[data, student], init_from_teacher=True,
                                keep_layers=2, batch_size=2, max_steps=4, device="cpu",
                                objective=ObjectiveConfig(loss="distillm2", distillm2_gradual=True)))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary.steps == 4 and all(np.isfinite(x["loss"]) and x["kd"] >= 0 for x in lines)


def adaptive(out, data, student, dev, **options):
    settings = dict(out=str(out), cache=[data, student], init_from_teacher=True, keep_layers=2, batch_size=2,
                    max_steps=6, checkpoint_every=2, device="cpu", student_data="adaptive", dev_cache=dev,
                    eval_every=2, objective=ObjectiveConfig(loss="skl", kd_alpha=1.0)) | options
    return TrainConfig(**settings)


def test_an_adaptive_run_follows_the_schedule_and_resumes_it(tmp_path, dataset_and_student_caches):
    data, student = dataset_and_student_caches
    # eps 0: any dev loss not below the reference raises the share, so the run's share depends on its dev losses
    full = train(adaptive(tmp_path / "full", data, student, data, student_data_eps=0.0))
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [("dev_loss" in x) for x in lines] == [False, True, False, True, False, True]
    shares = [x["student_share"] for x in lines]
    assert shares[0] == 0.0 and all(b >= a for a, b in zip(shares, shares[1:]))

    def stop(event, info):
        if event == "step" and info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(adaptive(tmp_path / "cut", data, student, data, student_data_eps=0.0), progress=stop)
    train(adaptive(tmp_path / "cut", data, student, data, student_data_eps=0.0, resume=True))
    resumed = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["loss"], x["student_share"], x.get("dev_loss")) for x in resumed] == \
        [(x["loss"], x["student_share"], x.get("dev_loss")) for x in lines]
    assert full.steps == 6


def test_adaptive_needs_its_dev_cache_and_a_student_generated_cache(tmp_path, two_caches):
    with pytest.raises(ValueError, match="--student-data adaptive needs --cache"):
        TrainConfig(out="run", cache="c.zarr", student_data="adaptive")
    with pytest.raises(ValueError, match="needs a cache of student-generated responses"):
        train(adaptive(tmp_path / "run", str(two_caches[0]), str(two_caches[1]), str(two_caches[0])))
