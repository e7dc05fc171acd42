"""Base KD losses: divergences against explicit numpy formulas, chunked kd_loss against full logits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mta_cli.losses import (
    DIVERGENCES,
    LogitHead,
    adaptive_kl,
    forward_kl,
    kd_loss,
    kd_loss_from_logits,
    reverse_kl,
    topk_forward_kl,
    topk_kd_loss,
)
from mta_cli.losses.closed_form import closed_form_sums, mixture_terms
from mta_cli.losses.divergences import log_probs

# 3 positions x 4 vocab, logits of student and teacher.
S = np.array([[1.0, 0.5, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.5, 0.1]])
T = np.array([[2.0, 0.0, -0.5, 1.0], [1.0, -1.0, 0.0, 2.0], [3.0, -2.0, 0.5, 0.1]])


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * np.log(p / q)).sum(-1)


def np_akl_weights(ps, pt, mu=0.5):
    """g_head / (g_head + g_tail) and g_tail / (g_head + g_tail) per position."""
    w_head, w_tail = [], []
    for s, t in zip(ps, pt):
        order = np.argsort(t)
        tail = np.cumsum(t[order]) <= mu
        gap = np.abs(t[order] - s[order])
        g_head, g_tail = gap[~tail].sum(), gap[tail].sum()
        total = max(g_head + g_tail, 1e-300)  # identical distributions: no gap, AKL = 0
        w_head.append(g_head / total)
        w_tail.append(g_tail / total)
    return np.array(w_head), np.array(w_tail)


def np_akl(ps, pt, mu=0.5):
    w_head, w_tail = np_akl_weights(ps, pt, mu)
    return w_head * np_kl(pt, ps) + w_tail * np_kl(ps, pt)


NUMPY_DIVERGENCES = {
    "fkl": lambda ps, pt: np_kl(pt, ps),
    "rkl": lambda ps, pt: np_kl(ps, pt),
    "skl": lambda ps, pt: np_kl(pt, 0.1 * pt + 0.9 * ps),
    "srkl": lambda ps, pt: np_kl(ps, 0.1 * ps + 0.9 * pt),
    "js": lambda ps, pt: 0.5 * np_kl(pt, (pt + ps) / 2) + 0.5 * np_kl(ps, (pt + ps) / 2),
    "tvd": lambda ps, pt: 0.5 * np.abs(pt - ps).sum(-1),
    "akl": np_akl,
}


def test_registry_names():
    assert set(DIVERGENCES) == set(NUMPY_DIVERGENCES)


@pytest.mark.parametrize("name", sorted(NUMPY_DIVERGENCES))
def test_divergence_matches_numpy(name):
    expected = NUMPY_DIVERGENCES[name](np_softmax(S), np_softmax(T))
    got = DIVERGENCES[name](log_probs(torch.tensor(S, dtype=torch.float32)),
                            log_probs(torch.tensor(T, dtype=torch.float32)))
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_forward_kl_by_hand():
    # p_T = [1/2, 1/2], p_S = [1/4, 3/4]: KL = 1/2 ln 2 + 1/2 ln(2/3)
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    teacher = log_probs(torch.zeros(1, 2))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert forward_kl(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    # Reverse: 1/4 ln(1/2) + 3/4 ln(3/2)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


@pytest.mark.parametrize("name", sorted(NUMPY_DIVERGENCES))
def test_identical_distributions_give_zero(name):
    x = torch.tensor(S, dtype=torch.float32)
    assert torch.allclose(DIVERGENCES[name](log_probs(x), log_probs(x)), torch.zeros(3), atol=1e-6)
    # Logits shifted by a constant are the same distribution.
    assert torch.allclose(DIVERGENCES[name](log_probs(x + 3.0), log_probs(x)), torch.zeros(3), atol=1e-5)


def test_bounds_on_far_apart_distributions():
    torch.manual_seed(0)
    s, t = log_probs(20 * torch.randn(64, 50)), log_probs(20 * torch.randn(64, 50))
    bound = -math.log(0.1)
    for name in ("skl", "srkl"):
        d = DIVERGENCES[name](s, t)
        assert (d >= -1e-6).all() and (d <= bound + 1e-5).all() and d.isfinite().all()
    d = DIVERGENCES["js"](s, t)
    assert (d >= -1e-6).all() and (d <= math.log(2) + 1e-6).all()
    d = DIVERGENCES["tvd"](s, t)
    assert (d >= 0).all() and (d <= 1 + 1e-6).all()
    # Skewing shrinks the divergence: skew KL <= KL.
    assert (DIVERGENCES["skl"](s, t) <= forward_kl(s, t) + 1e-5).all()


def test_akl_is_the_gap_weighted_mix_with_detached_weights():
    s, t = torch.tensor(S[:2], requires_grad=True), torch.tensor(T[:2])  # row 3 of S, T is identical
    w_head, w_tail = (torch.tensor(w) for w in np_akl_weights(np_softmax(S[:2]), np_softmax(T[:2])))
    assert (w_head > 0).all() and (w_tail > 0).all()
    ls, lt = log_probs(s), log_probs(t)
    akl = adaptive_kl(ls, lt)
    mix = w_head * forward_kl(ls, lt) + w_tail * reverse_kl(ls, lt)
    assert torch.allclose(akl, mix, atol=1e-12)
    # The weights are constants: the gradient is the weighted mix of the FKL and RKL gradients.
    grad_akl = torch.autograd.grad(akl.sum(), s, retain_graph=True)[0]
    assert torch.allclose(grad_akl, torch.autograd.grad(mix.sum(), s)[0], atol=1e-12)


def test_logit_head_applies_bias_scale_softcap():
    torch.manual_seed(0)
    w, b, h = torch.randn(5, 3), torch.randn(5), torch.randn(2, 3)
    head = LogitHead(w, b, scale=2.0, softcap=1.5)
    expected = 1.5 * torch.tanh(2.0 * (h @ w.T + b) / 1.5)
    assert torch.allclose(head(h), expected, atol=1e-6)
    assert torch.allclose(LogitHead(w)(h), h @ w.T, atol=1e-6)
    assert head(torch.randn(4, 2, 3)).shape == (4, 2, 5)


def make_problem(n=7, d_s=5, d_t=6, vocab=11, seed=0):
    """fp64 student/teacher hidden states and heads (teacher with bias, scale and softcap)."""
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(n, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    s_head = LogitHead(torch.randn(vocab, d_s, generator=g, dtype=torch.float64, requires_grad=True))
    t_hidden = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    t_head = LogitHead(
        torch.randn(vocab, d_t, generator=g, dtype=torch.float64),
        torch.randn(vocab, generator=g, dtype=torch.float64),
        scale=1.3,
        softcap=4.0,
    )
    labels = torch.randint(0, vocab, (n,), generator=g)
    return s_hidden, s_head, t_hidden, t_head, labels


@pytest.mark.parametrize("temperature,skew_lambda", [(2.0, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("loss", ["sft", *sorted(DIVERGENCES)])
def test_chunked_kd_loss_equals_full_logits_in_value_and_gradient(loss, temperature, skew_lambda):
    """fp64, chunk_size 3 < N = 7 (uneven last chunk): values and gradients agree within 1e-10. The chunked loss
    differentiates the KL family in closed form (`closed_form`), the full-logits one by autograd; at temperature 1
    CE and divergence share one log_softmax."""
    s_hidden, s_head, t_hidden, t_head, labels = make_problem()
    kwargs = dict(loss=loss, alpha=0.7, temperature=temperature, skew_lambda=skew_lambda)
    chunked = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, chunk_size=3, **kwargs)
    grads = torch.autograd.grad(chunked["loss"], [s_hidden, s_head.weight])

    full = kd_loss_from_logits(s_head(s_hidden), t_head(t_hidden), labels, **kwargs)
    full_grads = torch.autograd.grad(full["loss"], [s_hidden, s_head.weight])

    assert chunked.keys() == full.keys() == ({"loss", "ce"} if loss == "sft" else {"loss", "ce", "kd"})
    for key in chunked:
        assert torch.allclose(chunked[key], full[key], atol=1e-10, rtol=0), key
    for g, fg in zip(grads, full_grads):
        assert torch.allclose(g, fg, atol=1e-10, rtol=0)


def test_kd_loss_combines_ce_and_divergence_as_means():
    s_hidden, s_head, t_hidden, t_head, labels = make_problem()
    out = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "fkl", alpha=0.25, temperature=2.0, chunk_size=2)
    s_logits, t_logits = s_head(s_hidden).detach().numpy(), t_head(t_hidden).numpy()
    ps = np_softmax(s_logits)
    ce = -np.log(ps[np.arange(len(labels)), labels.numpy()]).mean()
    kd = np_kl(np_softmax(t_logits / 2.0), np_softmax(s_logits / 2.0)).mean()  # no T^2 factor
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-10)


def test_kd_loss_teacher_gets_no_gradient_and_sft_needs_no_teacher():
    s_hidden, s_head, t_hidden, t_head, labels = make_problem()
    t_head.weight.requires_grad_(True)
    out = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "rkl", alpha=0.5, temperature=1.0, chunk_size=4)
    out["loss"].backward()
    assert t_head.weight.grad is None and s_head.weight.grad is not None and s_hidden.grad is not None
    sft = kd_loss(s_hidden, s_head, None, None, labels, "sft", alpha=0.5, temperature=1.0)
    assert set(sft) == {"loss", "ce"} and torch.equal(sft["loss"], sft["ce"])


def test_kd_loss_keeps_no_chunk_logits_for_backward():
    """Fused chunks: the graph kept for backward holds the gradients of the hidden states [N, d] and
    the head [V, d], nothing of shape [chunk, V] or [N, V]."""
    n, vocab = 64, 1000
    s_hidden = torch.randn(n, 8, requires_grad=True)
    s_head = LogitHead(torch.randn(vocab, 8, requires_grad=True))
    t_hidden, t_head = torch.randn(n, 8), LogitHead(torch.randn(vocab, 8))
    labels = torch.randint(0, vocab, (n,))
    out = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "js", alpha=0.5, temperature=1.0, chunk_size=16)
    node = out["loss"].grad_fn
    assert sorted(t.shape for t in node.saved_tensors if t is not None) == [(n, 8), (vocab, 8)]
    assert {type(f).__name__ for f, _ in node.next_functions if f is not None} == {"AccumulateGrad"}
    out["loss"].backward()
    assert s_hidden.grad.isfinite().all()


def test_kd_loss_rejects_bad_arguments():
    s_hidden, s_head, t_hidden, t_head, labels = make_problem()
    with pytest.raises(ValueError, match="unknown loss"):
        kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "kl", alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "fkl", alpha=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s_hidden, s_head, t_hidden, t_head, labels, "fkl", alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="N = 0"):
        kd_loss(s_hidden[:0], s_head, t_hidden[:0], t_head, labels[:0], "fkl", alpha=0.5, temperature=1.0)


def test_topk_forward_kl_with_all_tokens_is_dense_forward_kl():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T)
    lp_t = torch.log_softmax(t, -1)
    ids = lp_t.argsort(-1, descending=True)  # K = V, in an arbitrary order
    topk = topk_forward_kl(log_probs(s), ids, lp_t.gather(-1, ids), torch.zeros(3, dtype=torch.float64))
    dense = forward_kl(log_probs(s), lp_t)
    assert torch.allclose(topk, dense, atol=1e-12)
    g_topk, g_dense = (torch.autograd.grad(x.sum(), s)[0] for x in (topk, dense))
    assert g_topk.isfinite().all() and torch.allclose(g_topk, g_dense, atol=1e-12)


def test_topk_forward_kl_matches_the_bucket_formula():
    ps, pt = np_softmax(S), np_softmax(T)
    ids = np.argsort(-pt, axis=-1)[:, :2]  # K = 2
    pt_k, ps_k = np.take_along_axis(pt, ids, -1), np.take_along_axis(ps, ids, -1)
    r, r_s = 1 - pt_k.sum(-1), 1 - ps_k.sum(-1)
    expected = (pt_k * np.log(pt_k / ps_k)).sum(-1) + r * np.log(r / r_s)
    got = topk_forward_kl(log_probs(torch.tensor(S)), torch.tensor(ids), torch.tensor(np.log(pt_k)), torch.tensor(r))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_topk_kd_loss_with_all_tokens_equals_kd_loss():
    s_hidden, s_head, t_hidden, t_head, labels = make_problem()
    kwargs = dict(loss="fkl", alpha=0.6, temperature=2.0, chunk_size=3)
    dense = kd_loss(s_hidden, s_head, t_hidden, t_head, labels, **kwargs)
    lp_t = torch.log_softmax(t_head(t_hidden) / 2.0, -1)  # extracted at the training temperature
    ids = torch.arange(lp_t.shape[1]).expand_as(lp_t)
    sparse = topk_kd_loss(s_hidden, s_head, ids, lp_t, torch.zeros(len(labels), dtype=lp_t.dtype), labels, **kwargs)
    for key in dense:
        assert torch.allclose(dense[key], sparse[key], atol=1e-10)
    g_dense = torch.autograd.grad(dense["loss"], s_hidden)[0]
    g_sparse = torch.autograd.grad(sparse["loss"], s_hidden)[0]
    assert torch.allclose(g_dense, g_sparse, atol=1e-10)


def test_topk_kd_loss_rejects_divergences_that_need_the_full_distribution():
    s_hidden, s_head, _, _, labels = make_problem()
    ids, lp, rest = torch.zeros(7, 2, dtype=torch.long), torch.zeros(7, 2), torch.zeros(7)
    with pytest.raises(ValueError, match="use 'fkl'"):
        topk_kd_loss(s_hidden, s_head, ids, lp, rest, labels, "rkl", alpha=0.5, temperature=1.0)


def test_kl_family_gradient_is_finite_for_extreme_logits():
    s = torch.tensor([[0.0, -200.0, 50.0]], requires_grad=True)
    t = torch.tensor([[60.0, 0.0, -300.0]])
    for name in ("fkl", "rkl", "skl", "srkl", "js"):
        (grad,) = torch.autograd.grad(DIVERGENCES[name](log_probs(s), log_probs(t)).sum(), s)
        assert grad.isfinite().all(), name
        sums = closed_form_sums(s, torch.tensor([1]), log_probs(t), mixture_terms(name), 1.0)
        (closed,) = torch.autograd.grad(sums[1], s)
        torch.testing.assert_close(closed, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_closed_form_takes_half_precision_logits_and_returns_their_dtype():
    """bf16 logits are upcast for the sums (as `_sums` does) and the gradient comes back in bf16."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g).to(torch.bfloat16).requires_grad_()
    t_logp, labels = log_probs(torch.randn(6, 40, generator=g)), torch.randint(0, 40, (6,), generator=g)
    sums = closed_form_sums(logits, labels, t_logp, mixture_terms("srkl"), 1.0)
    (grad,) = torch.autograd.grad(sums @ torch.tensor([0.3, 0.7]), logits)
    reference = logits.detach().float().requires_grad_()
    logp = log_probs(reference)
    expected_sums = torch.stack([F.nll_loss(logp, labels, reduction="sum"), DIVERGENCES["srkl"](logp, t_logp).sum()])
    (expected,) = torch.autograd.grad(expected_sums @ torch.tensor([0.3, 0.7]), reference)
    assert sums.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(sums, expected_sums)
    torch.testing.assert_close(grad.float(), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("loss", ["srkl", "tvd"])  # compiled closed form; compiled autograd
def test_the_compiled_chunk_loss_equals_the_eager_one(loss):
    """--compile-loss changes how the per-chunk sums are computed, not what: loss and gradients as eager."""
    from mta_cli.losses import LogitHead, kd_loss

    g = torch.Generator().manual_seed(0)
    head_s, head_t = LogitHead(torch.randn(50, 8, generator=g)), LogitHead(torch.randn(50, 6, generator=g))
    h_t, labels = torch.randn(13, 6, generator=g), torch.randint(0, 50, (13,), generator=g)
    results = []
    for compile in (False, True):
        h_s = torch.randn(13, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = kd_loss(h_s, head_s, h_t, head_t, labels, loss, 0.5, 2.0, chunk_size=5, compile=compile)
        out["loss"].backward()
        results.append((out["loss"].detach(), out["kd"], h_s.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
