"""Fidelity to the reference code of the methods: AKL's head/tail split, the skew λ, DistiLLM's own recipe,
MTA's weight in the group's formula, and samples that cannot contribute to DSA or Hid left out of the mean.
Every value is checked against a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mta_cli.losses import LogitHead, adaptive_kl, kd_loss_from_logits, skew_forward_kl
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.trainer import TrainConfig
from tests import reference
from tests.test_cache import cli, data_file, good  # noqa: F401 - fixtures
from tests.test_method_values import (D_S, D_T, KEY_LAYERS, STUDENT, TEACHER, TOL, as_torch, mask_of, mta_loss,
                                      projector_arrays, span_tensors)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def logp(p) -> torch.Tensor:
    return torch.tensor(np.log(p), dtype=torch.float64)[None]


# --- 2. AKL: the head is the cumulative teacher mass <= mu, plus the top-1 token --------------------------


def test_akl_splits_head_and_tail_as_the_authors_code():
    p_t, p_s = np.array([.3, .3, .2, .2]), np.array([.4, .2, .2, .2])
    # descending: one .3 token is the head (cumsum .3 <= .5), the other .3 (cumsum .6) and both .2 the tail;
    # gaps: head .1, tail .1 + 0 + 0 -> an even mixture (the old ascending split gave pure FKL here)
    expected = 0.5 * kl(p_t, p_s) + 0.5 * kl(p_s, p_t)
    assert adaptive_kl(logp(p_s), logp(p_t)).item() == pytest.approx(expected, rel=1e-12)


def test_akl_keeps_a_top1_token_above_mu_in_the_head():
    p_t, p_s = np.array([.7, .12, .1, .08]), np.array([.5, .3, .1, .1])
    # mu .5: the top-1 token alone is the head although its mass .7 > .5 (gap .2); tail gaps .18 + 0 + .02
    expected = 0.5 * kl(p_t, p_s) + 0.5 * kl(p_s, p_t)
    assert adaptive_kl(logp(p_s), logp(p_t)).item() == pytest.approx(expected, rel=1e-12)
    # mu .85: cumsum .82 <= .85 takes the second token in too: head gaps .2 + .18, tail 0 + .02
    expected = 0.95 * kl(p_t, p_s) + 0.05 * kl(p_s, p_t)
    assert adaptive_kl(logp(p_s), logp(p_t), mu=0.85).item() == pytest.approx(expected, rel=1e-12)


# --- the skew lambda is a parameter, passed through to the loss ----------------------------------------


def test_the_skew_lambda_reaches_the_loss():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g,
                                                                                       dtype=torch.float64)
    labels = torch.randint(0, 9, (6,), generator=g)
    p_s, p_t = torch.softmax(student, -1).numpy(), torch.softmax(teacher, -1).numpy()
    for lam in (0.1, 0.3):
        mixed = lam * p_t + (1 - lam) * p_s
        expected = np.mean([kl(p_t[i], mixed[i]) for i in range(6)])
        got = kd_loss_from_logits(student, teacher, labels, "skl", 1.0, 1.0, skew_lambda=lam)
        assert got["kd"].item() == pytest.approx(expected, rel=1e-10) and got["loss"].item() == pytest.approx(expected)
        assert skew_forward_kl(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), lam).mean().item() == \
            pytest.approx(expected, rel=1e-10)


# --- 1. DistiLLM's recipe ------------------------------------------------------------------------------


def test_the_distillm_recipe_is_its_scripts_settings_and_explicit_options_win(tmp_path, good):
    config = TrainConfig.from_recipe("distillm", out="run", cache="c.zarr")
    assert (config.objective.loss, config.objective.kd_alpha, config.objective.skew_lambda) == ("skl", 1.0, 0.1)
    assert (config.lr, config.warmup_ratio, config.weight_decay, config.max_grad_norm) == (5e-4, 0.0, 0.01, 1.0)
    assert config.recipe == "distillm"
    with pytest.raises(ValueError, match="--recipe must be one of distillm, got 'minillm'"):
        TrainConfig.from_recipe("minillm", out="run")

    out = tmp_path / "run"
    result = cli("train", "--cache", good, "--out", out, "--init-from-teacher", "--keep-layers", 2, "--max-steps", 1,
                 "--batch-size", 4, "--device", "cpu", "--recipe", "distillm", "--lr", "1e-3", "--skew-lambda", "0.2")
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "training_config.json").read_text())
    assert record["recipe"] == "distillm" and record["lr"] == 1e-3 and record["warmup_ratio"] == 0.0
    assert record["objective"]["loss"] == "skl" and record["objective"]["kd_alpha"] == 1.0
    assert record["objective"]["skew_lambda"] == 0.2
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step["loss"] == pytest.approx(step["kd"], rel=1e-6)  # kd ratio 1: no CE in the loss


# --- 3. MTA's weight: the paper's formula, or the group's ------------------------------------------------


def test_group_weighting_renormalises_hid_weights_over_covered_tokens():
    lengths = [7, 5]
    spans = [{"word": [[0, 2], [4, 6]], "phrase": [[0, 3], [3, 7]]}, {"word": [[1, 3]], "phrase": [[0, 5]]}]
    for normalize in (False, True):
        loss = mta_loss(KEY_LAYERS, normalize_hid=normalize)
        out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(lengths, 7), span_tensors(spans))
        expected = reference.mta(STUDENT, TEACHER, lengths, spans, KEY_LAYERS, projector_arrays(loss),
                                 normalize_hid=normalize)
        np.testing.assert_allclose(out["hid"].item(), expected["hid"], **TOL)
    raw = reference.mta(STUDENT, TEACHER, lengths, spans, KEY_LAYERS, projector_arrays(loss))["hid"]
    assert expected["hid"] > raw * 1.2  # covered weights sum to less than 1: renormalising raises Hid


def test_group_weighting_puts_mta_inside_the_alpha_mix():
    teacher_head = LogitHead(torch.randn(11, D_T, dtype=torch.float64))
    for loss, alpha, scale in (("srkl", 0.5, 0.5), ("srkl", 0.2, 0.2), ("sft", 0.5, 1.0)):
        for weighting, expected_scale in (("paper", 1.0), ("group", scale)):
            config = ObjectiveConfig(loss=loss, kd_alpha=alpha, mta=True, key_layers=KEY_LAYERS, mta_weighting=weighting)
            assert Objective(config, teacher_head, 3, D_S, D_T).mta_scale == expected_scale


# --- 4. samples without two spans are left out of DSA's mean, not counted as 0 ---------------------------


def test_a_sample_with_one_span_does_not_dilute_dsa():
    lengths = [7, 5]
    spans = [{"word": [[0, 1], [1, 2], [2, 4], [5, 6]], "phrase": [[0, 2], [2, 5], [5, 7]]},
             {"word": [[0, 1], [1, 3], [3, 5]], "phrase": [[0, 5]]}]  # one phrase: no pair to compare
    loss = mta_loss(KEY_LAYERS, use_hid=False)
    out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(lengths, 7), span_tensors(spans))
    # by hand: the word layer averages both samples, the phrase layer has only the first
    word = [reference.dsa(*uu, om) for uu, om in _pooled(lengths, spans, 1, 2, "word")]
    phrase = [reference.dsa(*uu, om) for uu, om in _pooled(lengths, spans, 2, 3, "phrase")][:1]
    expected = (np.mean(word) + np.mean(phrase)) / 2
    np.testing.assert_allclose(out["dsa"].item(), expected, **TOL)
    counted_as_zero = (np.mean(word) + np.mean(phrase + [0.0])) / 2
    assert abs(out["dsa"].item() - counted_as_zero) > 1e-3


def test_a_batch_with_no_pair_anywhere_gives_zero():
    lengths = [7, 5]
    spans = [{"word": [[0, 3]], "phrase": [[0, 7]]}, {"word": [[0, 5]], "phrase": [[1, 4]]}]
    out = mta_loss(KEY_LAYERS)(as_torch(STUDENT), as_torch(TEACHER), mask_of(lengths, 7), span_tensors(spans))
    assert out["dsa"].item() == 0.0 and out["hid"].item() > 0  # Hid still has covered tokens


def _pooled(lengths, spans, layer_s, layer_t, granularity):
    """(u_s, u_t), ω per sample with the reference's pooling (student pooled with its own weights)."""
    for b, n in enumerate(lengths):
        h_s, h_t = STUDENT[layer_s][b, :n], TEACHER[layer_t][b, :n]
        u_t, omega = reference.pool(h_t, reference.importance_weights(h_t), spans[b][granularity])
        u_s, _ = reference.pool(h_s, reference.importance_weights(h_s), spans[b][granularity])
        yield (u_s, u_t), omega

