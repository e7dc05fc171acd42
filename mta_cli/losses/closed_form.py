"""CE and a KL-family divergence from logits, differentiated in closed form instead of by autograd.

Every dense divergence of `divergences` except TVD and AKL is a weighted sum of KLs to a mixture of the two
distributions, m_α = α p + (1 - α) q, with p the teacher's and q the student's distribution at temperature τ:

    fkl = KL(p || m_0)    rkl = KL(q || m_1)    skl = KL(p || m_λ)    srkl = KL(q || m_(1-λ))
    js  = ½ KL(p || m_½) + ½ KL(q || m_½)

With s = log q = log_softmax(z / τ) for the student's logits z, and r = s - log m_α (so e^r = q / m_α):

    ∂ KL(p || m_α) / ∂s_v = -(1 - α) p_v e^(r_v)
    ∂ KL(q || m_α) / ∂s_v = q_v (r_v + 1 - (1 - α) e^(r_v))

and through the softmax ∂D/∂z = (a - q Σ_v a_v) / τ for a = ∂D/∂s; a constant c q_v in a cancels there, so the
`+ 1` is left out. CE (temperature 1, s1 = log_softmax(z)) has ∂CE/∂z = e^(s1) - onehot(label).

Autograd through log_softmax, logaddexp, exp and the products keeps about a dozen [n, V] tensors and walks
each forward and back; this computes the same values and the gradient with about half the passes over
[n, V], keeping two such tensors for backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MixtureKL:
    """weight · KL(x || α p + (1 - α) q), where x is the teacher's p (`of_teacher`) or the student's q."""

    weight: float
    of_teacher: bool
    alpha: float


def mixture_terms(loss: str, skew_lambda: float = 0.1) -> tuple[MixtureKL, ...] | None:
    """The divergence `loss` (a key of DIVERGENCES) as KLs to mixtures; None when it is not one (tvd, akl)."""
    lam = skew_lambda
    return {
        "fkl": (MixtureKL(1.0, True, 0.0),),
        "rkl": (MixtureKL(1.0, False, 1.0),),
        "skl": (MixtureKL(1.0, True, lam),),
        "srkl": (MixtureKL(1.0, False, 1.0 - lam),),
        "js": (MixtureKL(0.5, True, 0.5), MixtureKL(0.5, False, 0.5)),
    }.get(loss)


def _log_mixture(s: Tensor, t: Tensor, alpha: float) -> Tensor:
    """log(α p + (1 - α) q) from s = log q, t = log p: [n, V]."""
    if alpha == 0.0:
        return s
    if alpha == 1.0:
        return t
    # log(α p + (1 - α) q) = log(1 - α) + logaddexp(s, t + log(α / (1 - α))): two passes instead of four
    mixed = t + math.log(alpha / (1.0 - alpha))
    return torch.logaddexp(s, mixed, out=mixed).add_(math.log1p(-alpha))


def divergence_and_grad(s: Tensor, q: Tensor, t: Tensor, terms: tuple[MixtureKL, ...],
                        temperature: float) -> tuple[Tensor, Tensor]:
    """The divergence per position [n] and its gradient w.r.t. the student's logits [n, V].

    s, q: the student's log-probs and probs at `temperature` [n, V]; t: the teacher's log-probs [n, V]."""
    p = t.exp() if any(term.of_teacher for term in terms) else None
    values, grad_s = None, None
    for term in terms:
        log_m = _log_mixture(s, t, term.alpha)
        if term.of_teacher:
            value = torch.linalg.vecdot(p, t - log_m)
            if term.alpha == 0.0:  # fkl: m = q, e^r = 1
                a = -p
            elif term.alpha < 1.0:
                a = (s - log_m).exp_().mul_(p).mul_(-(1.0 - term.alpha))
            else:  # KL(p || p): no dependence on the student
                a = None
        else:
            r = s - log_m
            value = torch.linalg.vecdot(q, r)
            if term.alpha != 1.0:
                r.sub_(r.exp(), alpha=1.0 - term.alpha)
            a = r.mul_(q)
        values = value * term.weight if values is None else values.add_(value, alpha=term.weight)
        if a is not None:
            if grad_s is not None:
                grad_s.add_(a, alpha=term.weight)
            else:
                grad_s = a if term.weight == 1.0 else a.mul_(term.weight)
    if grad_s is None:
        return values, torch.zeros_like(s)
    grad_z = grad_s.addcmul_(q, grad_s.sum(-1, keepdim=True), value=-1.0)
    return values, grad_z.div_(temperature) if temperature != 1.0 else grad_z


def sums_and_gradients(logits: Tensor, labels: Tensor, teacher_logp: Tensor | None,
                       terms: tuple[MixtureKL, ...] | None, temperature: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """[CE sum, divergence sum] [2], the student's probabilities q1 = softmax(logits) [n, V] (CE's gradient is
    q1 - onehot) and the divergence's gradient w.r.t. the logits [n, V] (None without terms: SFT)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    s1 = torch.log_softmax(z, dim=-1)
    ce = -s1.gather(-1, labels[:, None]).sum()
    q1 = s1.exp()
    if terms is None:
        return torch.stack([ce, torch.zeros_like(ce)]), q1, None
    s = s1 if temperature == 1.0 else torch.log_softmax(z / temperature, dim=-1)
    q = q1 if temperature == 1.0 else s.exp()
    values, grad_kd = divergence_and_grad(s, q, teacher_logp.to(s.dtype), terms, temperature)
    return torch.stack([ce, values.sum()]), q1, grad_kd


@functools.cache
def compiled_sums_and_gradients() -> Callable[..., tuple[Tensor, Tensor, Tensor | None]]:
    """`sums_and_gradients` compiled once per process (shapes dynamic: the last chunk is shorter), its passes
    over [n, V] fused."""
    return torch.compile(sums_and_gradients, dynamic=True)


class _ClosedFormSums(torch.autograd.Function):
    """[CE sum, divergence sum] of logits [n, V]; backward from the gradients kept in forward."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, teacher_logp: Tensor | None,
                terms: tuple[MixtureKL, ...] | None, temperature: float, compute: Callable) -> Tensor:
        sums, q1, grad_kd = compute(logits, labels, teacher_logp, terms, temperature)
        ctx.input_dtype = logits.dtype
        ctx.save_for_backward(q1, labels, grad_kd)
        return sums

    @staticmethod
    def backward(ctx, grad_sums: Tensor):
        q1, labels, grad_kd = ctx.saved_tensors
        grad = q1 * grad_sums[0]
        grad[torch.arange(len(labels), device=grad.device), labels] -= grad_sums[0]
        if grad_kd is not None:
            grad.addcmul_(grad_kd, grad_sums[1])
        return grad.to(ctx.input_dtype), None, None, None, None, None


def closed_form_sums(logits: Tensor, labels: Tensor, teacher_logp: Tensor | None,
                     terms: tuple[MixtureKL, ...] | None, temperature: float, compile: bool = False) -> Tensor:
    """[CE sum, divergence sum] over positions, shape [2], as `kd._sums` computes them, with a closed-form backward.

    logits [n, V] (temperature 1), labels [n], teacher_logp [n, V] at `temperature` (None with terms None: SFT).
    `compile` computes them with `compiled_sums_and_gradients`."""
    compute = compiled_sums_and_gradients() if compile else sums_and_gradients
    return _ClosedFormSums.apply(logits, labels, teacher_logp, terms, temperature, compute)
