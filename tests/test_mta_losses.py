"""MTA pieces (importance weights, span pooling, DSA, Hid, MTALoss) and the key-layer schedule, by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mta_cli.losses import (
    MTALoss,
    default_key_layers,
    default_teacher_layers,
    dsa_loss,
    hid_loss,
    hid_loss_spans,
    importance_weights,
    pool_spans,
)
from tests import reference

H3 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.0, 2.0], [0.5, 0.5, -1.5]])  # 3 tokens, d = 3


def np_importance_weights(h):
    h_hat = h / h.std(axis=-1, ddof=1, keepdims=True)  # torch.std default: unbiased
    scores = h_hat @ h_hat.T / math.sqrt(h.shape[1])
    np.fill_diagonal(scores, -np.inf)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    return a.mean(axis=0)


# ---- importance weights (§2)


def test_importance_weights_by_hand():
    w = importance_weights(torch.tensor(H3, dtype=torch.float32)[None], torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(w[0].numpy(), np_importance_weights(H3), rtol=1e-5)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_importance_weights_ignore_padding_and_sum_to_one():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4)
    h[0, 3:] = torch.tensor([1e6, -1e6, 0.0, 3.0])  # padding content must not matter
    h[1, 4:] = 0.0  # zero padding rows (std 0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    w = importance_weights(h, mask)
    assert (w[~mask] == 0).all()
    assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-6)
    alone = importance_weights(h[:1, :3], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(w[0, :3], alone[0], atol=1e-6)
    np.testing.assert_allclose(w[1, :4].numpy(), np_importance_weights(h[1, :4].double().numpy()), rtol=1e-5)


def test_importance_weights_edge_cases_and_no_grad():
    h = torch.randn(3, 4, 6, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = importance_weights(h, mask)
    assert not w.requires_grad and w.dtype == torch.float32
    assert torch.equal(w[0], torch.tensor([1.0, 0, 0, 0]))  # a single valid token gets it all
    assert torch.equal(w[1], torch.zeros(4))  # an empty sample gets nothing
    assert w.isfinite().all()


# ---- span pooling (§3)


def test_pool_spans_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]], requires_grad=True)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    ranges = torch.tensor([[0, 2], [2, 4], [1, 1]])  # the last span is empty
    u, omega = pool_spans(h, w, ranges)
    expected_u = torch.tensor(
        [
            [(0.1 * 1.0 + 0.2 * 0.0) / 0.3, (0.1 * 0.0 + 0.2 * 2.0) / 0.3],
            [(0.3 * 3.0 + 0.4 * 1.0) / 0.7, (0.3 * 1.0 + 0.4 * 1.0) / 0.7],
            [0.0, 0.0],
        ]
    )
    assert torch.allclose(u, expected_u, atol=1e-6)
    assert torch.allclose(omega, torch.tensor([0.3, 0.7, 0.0]), atol=1e-6)
    u.sum().backward()
    assert torch.allclose(h.grad, torch.tensor([[1 / 3] * 2, [2 / 3] * 2, [3 / 7] * 2, [4 / 7] * 2]), atol=1e-6)
    assert w.grad is None  # weights are detached


def test_pool_spans_normalises_span_weights_over_covered_tokens():
    u, omega = pool_spans(torch.randn(6, 3), torch.full((6,), 1 / 6), torch.tensor([[0, 1], [3, 6]]))
    assert torch.allclose(omega, torch.tensor([0.25, 0.75]))
    assert u.shape == (2, 3)


# ---- DSA (§4)


def test_dsa_loss_by_hand():
    # Teacher: e1, e2, e1 + e2; student: e1, e1, e2.
    # D_T: d01 = 1, d02 = d12 = 1 - 1/sqrt(2); D_S: d01 = 0, d02 = d12 = 1.
    # Squared differences 1, 1/2, 1/2 with pair weights .5*.3, .5*.2, .3*.2 -> (.15 + .05 + .03) / .31
    u_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u_s = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # other size, other norms
    omega = torch.tensor([0.5, 0.3, 0.2])
    assert dsa_loss(u_s, u_t, omega).item() == pytest.approx(0.23 / 0.31, abs=1e-6)


def test_dsa_loss_is_zero_for_equal_geometry_across_sizes():
    torch.manual_seed(0)
    u_t = torch.randn(5, 4, dtype=torch.float64)
    omega = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    assert dsa_loss(u_t, u_t, omega).item() == pytest.approx(0.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))  # 6 x 4, orthonormal columns
    u_s = 3.0 * u_t @ q.T  # dT = 4 -> dS = 6, rotated and scaled
    assert dsa_loss(u_s, u_t, omega).item() == pytest.approx(0.0, abs=1e-12)
    assert dsa_loss(torch.randn(5, 6, dtype=torch.float64), u_t, omega).item() > 0


def test_dsa_loss_needs_two_weighted_spans():
    assert dsa_loss(torch.randn(1, 3), torch.randn(1, 2), torch.ones(1)).item() == 0.0
    assert dsa_loss(torch.randn(0, 3), torch.randn(0, 2), torch.ones(0)).item() == 0.0
    # A zero-weight span is ignored.
    assert dsa_loss(torch.randn(2, 3), torch.randn(2, 2), torch.tensor([1.0, 0.0])).item() == 0.0


# ---- Hid (§5)


def test_hid_loss_by_hand():
    projector = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        projector.weight.copy_(torch.eye(2))
    h_s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    h_t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    w_t = torch.tensor([0.2, 0.3, 0.5])
    covered = torch.tensor([True, True, False])
    # 0.2 * (1 - 1) + 0.3 * (1 - 1/sqrt(2)); token 2 is not covered
    loss = hid_loss(h_s, h_t, projector, w_t, covered)
    assert loss.item() == pytest.approx(0.3 * (1 - 1 / math.sqrt(2)), abs=1e-6)
    loss.backward()
    assert projector.weight.grad is not None and h_s.grad is not None


def test_hid_loss_is_zero_when_the_projector_maps_exactly():
    torch.manual_seed(0)
    projector = nn.Linear(5, 3, bias=False)
    h_s = torch.randn(4, 5)
    h_t = 2.0 * projector(h_s).detach()
    w_t = torch.softmax(torch.randn(4), 0)
    assert hid_loss(h_s, h_t, projector, w_t, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(0, abs=1e-6)
    assert hid_loss_spans(h_s, h_t, projector, w_t).item() == pytest.approx(0, abs=1e-6)


def test_hid_loss_spans_by_hand():
    projector = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        projector.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    u_s = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]])  # projected: e1, e2
    u_t = torch.tensor([[0.0, 1.0], [0.0, -2.0]])  # cos 0 and -1
    omega = torch.tensor([0.25, 0.75])
    assert hid_loss_spans(u_s, u_t, projector, omega).item() == pytest.approx(0.25 * 1 + 0.75 * 2, abs=1e-6)


# ---- MTALoss


KEY_LAYERS = [(1, 2, "word"), (2, 4, "phrase")]
SPANS = [
    {"word": torch.tensor([[0, 1], [1, 2], [2, 3], [4, 5]]), "phrase": torch.tensor([[0, 2], [2, 5]])},
    {"word": torch.tensor([[0, 1], [1, 3]]), "phrase": torch.tensor([[0, 3]])},  # one phrase: no DSA
]
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)


def states(layers, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(2, 6, dim, generator=g, requires_grad=True) for layer in layers}


def test_mta_loss_end_to_end_values_and_gradients():
    torch.manual_seed(0)
    mta = MTALoss(KEY_LAYERS, student_dim=8, teacher_dim=12, lambda_dsa=2.0, lambda_hid=0.2)
    student, teacher = states([1, 2], 8, 0), states([2, 4], 12, 1)
    out = mta(student, teacher, MASK, SPANS)
    assert set(out) == {"dsa", "hid", "mta"}
    assert all(v.dim() == 0 and v.isfinite() for v in out.values())
    assert out["dsa"] > 0 and out["hid"] > 0
    assert out["mta"].item() == pytest.approx(2.0 * out["dsa"].item() + 0.2 * out["hid"].item())
    out["mta"].backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student.values())
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in mta.projectors)
    assert all(t.grad is None for t in teacher.values())
    assert len(mta.projectors) == 2 and mta.projectors[0].weight.shape == (12, 8)


@pytest.mark.parametrize("pooling", ["student", "teacher"])
def test_mta_loss_dsa_is_zero_when_student_states_equal_teacher_states(pooling):
    teacher = states([2, 4], 8, 1)
    student = {1: teacher[2].detach().clone().requires_grad_(), 2: teacher[4].detach().clone().requires_grad_()}
    out = MTALoss(KEY_LAYERS, 8, 8, student_pooling=pooling)(student, teacher, MASK, SPANS)
    assert out["dsa"].item() == pytest.approx(0.0, abs=1e-10)


def test_mta_loss_dsa_is_zero_for_rotated_student_states_with_teacher_pooling():
    teacher = states([2, 4], 4, 1)
    q, _ = torch.linalg.qr(torch.randn(6, 4))
    student = {1: teacher[2].detach() @ q.T, 2: 5 * teacher[4].detach() @ q.T}
    out = MTALoss(KEY_LAYERS, 6, 4, student_pooling="teacher")(student, teacher, MASK, SPANS)
    assert out["dsa"].item() == pytest.approx(0.0, abs=1e-6)


def test_mta_loss_ablation_switches():
    student, teacher = states([1, 2], 8, 0), states([2, 4], 12, 1)
    no_hid = MTALoss(KEY_LAYERS, 8, 12, use_hid=False)
    assert len(no_hid.projectors) == 0  # no unused parameters
    out = no_hid(student, teacher, MASK, SPANS)
    assert out["hid"].item() == 0 and out["mta"].item() == pytest.approx(2.0 * out["dsa"].item())
    out = MTALoss(KEY_LAYERS, 8, 12, use_dsa=False)(student, teacher, MASK, SPANS)
    assert out["dsa"].item() == 0 and out["mta"].item() == pytest.approx(0.2 * out["hid"].item())


def test_mta_loss_rejects_bad_options():
    with pytest.raises(ValueError, match="granularity"):
        MTALoss([(1, 2, "sentence")], 8, 8)
    with pytest.raises(ValueError, match="student_pooling"):
        MTALoss(KEY_LAYERS, 8, 8, student_pooling="mean")


# ---- key layers (§6)


def test_default_key_layers_paper_examples():
    assert default_key_layers(12, 48) == [(6, 24, "word"), (9, 36, "phrase"), (12, 48, "phrase")]
    assert default_key_layers(8, 30) == [(4, 15, "word"), (6, 22, "phrase"), (8, 30, "phrase")]
    assert default_key_layers(12, 48, m=2, stride=2) == [(10, 40, "word"), (12, 48, "phrase")]
    assert default_key_layers(3, 6) == [(1, 2, "word"), (2, 4, "phrase"), (3, 6, "phrase")]  # stride 1


def test_default_key_layers_validates():
    with pytest.raises(ValueError, match="< 1"):
        default_key_layers(4, 8, m=5)
    with pytest.raises(ValueError, match="teacher layer 0"):
        default_key_layers(12, 1)
    with pytest.raises(ValueError, match="stride"):
        default_key_layers(12, 48, stride=0)
    with pytest.raises(ValueError, match="m "):
        default_key_layers(12, 48, m=0)


def test_default_teacher_layers():
    assert default_teacher_layers(30) == [15, 22, 30]
    assert default_teacher_layers(12) == [6, 9, 12]
    assert default_teacher_layers(2) == [1, 2]
    assert default_teacher_layers(1) == [1]
    with pytest.raises(ValueError):
        default_teacher_layers(0)


@pytest.mark.parametrize("pooling", ["student", "teacher"])
def test_mta_loss_values_equal_the_float64_reference(pooling):
    """The batch of test_mta_loss_end_to_end_values_and_gradients: DSA, Hid and their λ-weighted sum equal
    tests/reference.py's independent computation (float32 here, hence rel 1e-5), not only each other."""
    torch.manual_seed(0)
    mta = MTALoss(KEY_LAYERS, student_dim=8, teacher_dim=12, lambda_dsa=2.0, lambda_hid=0.2, student_pooling=pooling)
    student, teacher = states([1, 2], 8, 0), states([2, 4], 12, 1)
    out = mta(student, teacher, MASK, SPANS)
    as_numpy = lambda s: {k: v.detach().double().numpy() for k, v in s.items()}  # noqa: E731
    expected = reference.mta(as_numpy(student), as_numpy(teacher), MASK.sum(1).tolist(),
                             [{k: v.tolist() for k, v in s.items()} for s in SPANS], KEY_LAYERS,
                             [p.weight.detach().double().numpy() for p in mta.projectors], pooling=pooling)
    for key in ("dsa", "hid", "mta"):
        assert out[key].item() == pytest.approx(expected[key], rel=1e-5), key
