"""Feature dynamics distillation (FDD; Gong et al., ACL 2025) from exact teacher logits at every paired layer.

The paper views the layers as steps of an ODE and matches the whole feature trajectory, not only its end:
features are mapped into the vocabulary through the output head (they may differ in size between the two
models), compared layer by layer ("layer-wise feature KD"), and so are their first-order changes between
adjacent layers ("layer feature delta KD"), on top of the logit KD term. The definition implemented here
(written from the paper's abstract and description; no public code of the authors was available to compare
against), with the paired layers k = 1..K ascending and the K-th pair the two final layers:

    z^S_k = head_S(norm_S(h^S_k)),   z^T_k = head_T(norm_T(h^T_k))      (logit lens; h_K is already normed)
    L_FDD = (1 - α) CE + α D(z^T_K, z^S_K)                                           logit KD
          + w_feat  · 1/(K-1) Σ_{k<K} D(z^T_k, z^S_k)                                  trajectory
          + w_delta · 1/(K-1) Σ_{k<K} D(z^T_{k+1} - z^T_k, z^S_{k+1} - z^S_k)          first differences

with D(a, b) = D(softmax(a / τ) ‖ softmax(b / τ)) per target position (forward KL by default), each term the
mean over target positions; no feature or delta term when K = 1. The differences of logits are read as
logits themselves (a distribution over how the prediction moves between the two layers).

Memory: K layers of [chunk, V] logits live at once, so the chunk is divided by K; one step stays within a
small factor of a plain KD step's peak (`make bench-train` prints both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mta_cli.losses.divergences import DIVERGENCES, bound_divergence, log_probs
from mta_cli.losses.kd import LogitHead, _check, chunked_sums


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    return log_probs(logits if temperature == 1 else logits / temperature)


def fdd_sums(student_logits: list[Tensor], teacher_logits: list[Tensor], labels: Tensor, divergence,
             temperature: float) -> Tensor:
    """[CE sum, D_final sum, trajectory sum, delta sum] over the positions of one chunk.

    student_logits / teacher_logits: K tensors [n, V] at the paired layers (the last the final layers); the
    teacher's carry no graph. Sums run over positions and, for the last two, over the K - 1 earlier layers."""
    zs, zt = [z.to(torch.promote_types(z.dtype, torch.float32)) for z in student_logits], teacher_logits
    final_logp = log_probs(zs[-1])
    ce = F.nll_loss(final_logp, labels, reduction="sum")
    final_student = final_logp if temperature == 1 else _tempered(zs[-1], temperature)
    with torch.no_grad():
        teacher = [_tempered(z, temperature) for z in zt]
        teacher_deltas = [_tempered(b - a, temperature) for a, b in zip(zt[:-1], zt[1:])]
    kd = divergence(final_student, teacher[-1]).sum()
    zero = ce.new_zeros(())
    trajectory = sum((divergence(_tempered(s, temperature), t).sum() for s, t in zip(zs[:-1], teacher[:-1])), zero)
    deltas = sum((divergence(_tempered(b - a, temperature), t).sum()
                  for a, b, t in zip(zs[:-1], zs[1:], teacher_deltas)), zero)
    return torch.stack([ce, kd, trajectory, deltas])


def fdd_loss(student_states: list[Tensor], student_head: LogitHead, teacher_states: list[Tensor],
             teacher_head: LogitHead, labels: Tensor, alpha: float, temperature: float, feature_weight: float = 1.0,
             delta_weight: float = 1.0, divergence: str = "fkl", chunk_size: int = 1024, skew_lambda: float = 0.1,
             akl_mu: float = 0.5, denominator: float | None = None) -> dict[str, Tensor]:
    """FDD (module docstring) from normed states at the K paired layers.

    student_states: K tensors [N, dS] (norm_S applied; gradients reach them and the student head),
    teacher_states: K tensors [N, dT] (norm_T applied), labels [N] of the N target positions.
    Returns {"loss", "ce", "kd", "fdd_traj", "fdd_delta"}: the total and each term's mean per position
    (trajectory and delta also averaged over the K - 1 layers); `denominator` replaces N as in `kd_loss`."""
    _check(divergence, alpha, temperature)
    if divergence not in DIVERGENCES or len(student_states) != len(teacher_states) or not student_states:
        raise ValueError("FDD needs a divergence and the same number (>= 1) of student and teacher layers")
    n, k = labels.numel(), len(student_states)
    d = n if denominator is None else denominator
    dtype = torch.promote_types(student_states[0].dtype, torch.float32)
    layers = max(k - 1, 1)
    coef = torch.tensor([(1 - alpha) / d, alpha / d, feature_weight / (d * layers), delta_weight / (d * layers)],
                        dtype=dtype)
    bound = bound_divergence(divergence, skew_lambda, akl_mu)

    def chunk_sums(head: LogitHead, hs: list[Tensor], chunk_labels: Tensor, *ts: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = [teacher_head(t) for t in ts]
        return fdd_sums([head(h) for h in hs], teacher_logits, chunk_labels, bound, temperature)

    combined, sums = chunked_sums(chunk_sums, student_head, coef, n, max(1, chunk_size // k), student_states, labels,
                                  *teacher_states)
    means = sums / torch.tensor([d, d, d * layers, d * layers], dtype=sums.dtype)
    total = combined if combined is not None else (sums * coef.to(sums.dtype)).sum()
    return {"loss": total, "ce": means[0], "kd": means[1], "fdd_traj": means[2], "fdd_delta": means[3]}
