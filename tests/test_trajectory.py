"""Trajectory diagnostics of `mta eval --cache`: linear CKA, and DSA/CKA of a model against its own cache."""

from __future__ import annotations

import pytest
import torch

from mta_cli.models import load_causal_lm, load_tokenizer
from mta_cli.student import prune_layers
from mta_cli.trajectory import linear_cka, trajectory_diagnostics
from tests.tiny import RECORDS


def test_linear_cka_is_one_for_a_model_with_itself_and_invariant_to_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(200, 12)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, torch.randn(200, 7)) < 0.2  # unrelated representations


def test_linear_cka_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [2.0], [4.0], [0.0]], dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-12)


def test_the_teacher_against_its_own_cache_has_dsa_zero_and_cka_one(tiny_teacher_dir, tiny_fp32_cache):
    teacher = load_causal_lm(str(tiny_teacher_dir))
    rows = trajectory_diagnostics(teacher, load_tokenizer(str(tiny_teacher_dir)), tiny_fp32_cache, batch_size=1)
    assert [(r["student_layer"], r["teacher_layer"], r["granularity"]) for r in rows] == [
        (2, 2, "word"), (3, 3, "phrase"), (4, 4, "phrase")]
    for row in rows:
        assert row["dsa"] < 1e-10 and row["cka"] == pytest.approx(1.0, abs=1e-6)
        assert row["samples"] == len(RECORDS) and row["cka_over"] == "tokens"


def test_a_pruned_student_is_less_aligned_than_the_teacher(tiny_teacher_dir, tiny_fp32_cache):
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    student = prune_layers(load_causal_lm(str(tiny_teacher_dir)), 2)
    rows = trajectory_diagnostics(student, tokenizer, tiny_fp32_cache)
    # cached layers paired with distinct student layers at matching depths, top-down: 4 -> 2, 3 -> 1 (2 is taken);
    # layer 2 finds no student layer left
    assert [(r["student_layer"], r["teacher_layer"]) for r in rows] == [(1, 3), (2, 4)]
    assert all(r["dsa"] > 1e-4 and 0 < r["cka"] < 0.999 for r in rows)
