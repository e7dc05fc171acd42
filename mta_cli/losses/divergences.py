"""Per-token divergences between a teacher distribution p_T and a student distribution p_S.

Every function takes log-probabilities, `student_logp` and `teacher_logp` of shape [N, V] (any
leading dims work; `log_probs(logits / temperature)` makes them), and returns the divergence per
position, shape [N]. Taking log-probabilities lets the caller share one log_softmax between the
cross-entropy and the divergence. Mixtures such as λ p + (1 - λ) q are formed in log space with
`logaddexp`, so no log(0) is ever taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor


def log_probs(logits: Tensor) -> Tensor:
    """log_softmax over the vocabulary, upcast to float32 (fp64 stays fp64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _log_mix(logp: Tensor, logq: Tensor, lam: float) -> Tensor:
    """log(λ p + (1 - λ) q) from log p and log q, for 0 <= λ <= 1."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixing weight must lie in [0, 1], got {lam}")
    log_lam = math.log(lam) if lam > 0 else -math.inf
    log_rest = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(logp + log_lam, logq + log_rest)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = Σ_v p_v (log p_v - log q_v), summed over the last dim."""
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(ls: Tensor, lt: Tensor) -> Tensor:
    """KL(p_T || p_S): mode-covering, the classic KD loss. [N, V] x2 -> [N]."""
    return _kl(lt, ls)


def reverse_kl(ls: Tensor, lt: Tensor) -> Tensor:
    """KL(p_S || p_T): mode-seeking (MiniLLM). [N, V] x2 -> [N]."""
    return _kl(ls, lt)


def skew_forward_kl(ls: Tensor, lt: Tensor, lam: float = 0.1) -> Tensor:
    """DistiLLM skew KL: KL(p_T || λ p_T + (1 - λ) p_S); bounded by -log λ. [N, V] x2 -> [N]."""
    return _kl(lt, _log_mix(lt, ls, lam))


def skew_reverse_kl(ls: Tensor, lt: Tensor, lam: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL: KL(p_S || λ p_S + (1 - λ) p_T). [N, V] x2 -> [N]."""
    return _kl(ls, _log_mix(ls, lt, lam))


def js(ls: Tensor, lt: Tensor) -> Tensor:
    """Jensen-Shannon: ½ KL(p_T || m) + ½ KL(p_S || m), m = ½ (p_T + p_S); in [0, log 2]. [N, V] x2 -> [N]."""
    lm = _log_mix(lt, ls, 0.5)
    return 0.5 * _kl(lt, lm) + 0.5 * _kl(ls, lm)


def tvd(ls: Tensor, lt: Tensor) -> Tensor:
    """Total variation distance ½ Σ_v |p_T - p_S|; in [0, 1]. [N, V] x2 -> [N]."""
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


def adaptive_kl(ls: Tensor, lt: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (AKL, Wu et al. 2024): FKL and RKL mixed by where the two distributions differ.

    As in the AKL authors' code: sort the vocabulary by teacher probability, descending; the head is
    the tokens whose cumulative teacher probability is <= μ, plus the most probable token (so a top-1
    above μ is still the head); the tail is the rest. With the detached gaps g_head = Σ_head |p_T - p_S|
    and g_tail = Σ_tail |p_T - p_S|: AKL = g_head / (g_head + g_tail) FKL + g_tail / (g_head + g_tail) RKL.
    p_T = [.3, .3, .2, .2], p_S = [.4, .2, .2, .2]: head = one .3 token, tail = the rest, gaps .1 and .1:
    AKL = ½ FKL + ½ RKL. Identical distributions give 0. [N, V] x2 -> [N].
    """
    with torch.no_grad():
        pt_sorted, order = lt.exp().sort(dim=-1, descending=True)
        gap = (pt_sorted - ls.exp().gather(-1, order)).abs()
        head = pt_sorted.cumsum(-1) <= mu
        head[..., 0] = True
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
    return g_head / total * _kl(lt, ls) + g_tail / total * _kl(ls, lt)


def topk_forward_kl(ls: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, rest_mass: Tensor) -> Tensor:
    """KL(p_T || p_S) when the teacher is known only by its top-K log-probs and left-over mass.

    The K tokens are buckets of their own, all other tokens one extra bucket of mass r:
    D = Σ_k p_T,k (log p_T,k - log p_S,k) + r (log r - log(1 - Σ_k p_S,k)).
    log(1 - Σ_k p_S,k) is a logsumexp over the student's log-probs outside the top K (exact, no
    cancellation); r = 0 contributes 0. With K = V this is the dense forward KL.
    ls [N, V] student log-probs, topk_ids [N, K] int, topk_logprobs [N, K], rest_mass [N] -> [N].
    """
    lt_k = topk_logprobs.to(ls.dtype)
    ls_k = ls.gather(-1, topk_ids)
    if topk_ids.shape[-1] >= ls.shape[-1]:  # K = V: no token outside, r is rounding noise
        return (lt_k.exp() * (lt_k - ls_k)).sum(-1)
    ls_rest = ls.scatter(-1, topk_ids, -math.inf).logsumexp(-1)
    r = rest_mass.to(ls.dtype).clamp_min(0.0)
    rest_term = torch.where(r > 0, r * (r.log() - ls_rest), torch.zeros_like(r))
    return (lt_k.exp() * (lt_k - ls_k)).sum(-1) + rest_term


def bound_divergence(name: str, skew_lambda: float = 0.1, akl_mu: float = 0.5) -> Callable[[Tensor, Tensor], Tensor]:
    """DIVERGENCES[name] with its parameter bound: the skew λ of skl / srkl, the μ of akl."""
    if name in ("skl", "srkl"):
        return partial(DIVERGENCES[name], lam=skew_lambda)
    if name == "akl":
        return partial(DIVERGENCES[name], mu=akl_mu)
    return DIVERGENCES[name]


DIVERGENCES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
    "js": js,
    "tvd": tvd,
    "akl": adaptive_kl,
}
