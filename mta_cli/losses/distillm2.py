"""DistiLLM-2's contrastive loss (Ko et al., ICML 2025), as its trainer computes it (`distillm_v2`).

For a prompt x with a teacher-generated response y_T and a student-generated one y_S:

    L = (2 - β) · 1/|y_T| Σ_t KL(p_T ‖ α p_T + (1 - α) p_S)          on y_T: pull the student up where the teacher is
      +      β · 1/|y_S| Σ_t KL(p_S ‖ (1 - α) p_T + α sg(p_S))          on y_S: push it down where only it is

(skew forward KL on the teacher's responses, skew reverse KL on the student's, the student's share of the
second mixture without gradient; α = 0.1; each response's tokens averaged, then the responses; β = 1, or
rising from 1 to 1.5 over the first half of training with `gradual`). The trainer's optional adaptive α is
off by default there and not offered here.

Offline, the two kinds of response come from two caches (`mta generate` with the teacher and with the
student, each extracted once), and a batch holds one kind: a batch of teacher-generated (or dataset)
responses takes the first term, a batch of student-generated ones the second. At equal shares this is half
the per-prompt sum above in expectation (the same direction; the pairs are not formed per prompt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mta_cli.losses.divergences import _kl, _log_mix, log_probs, skew_forward_kl
from mta_cli.losses.kd import LogitHead, chunked_sums, teacher_log_probs


def skew_reverse_kl_detached(ls: Tensor, lt: Tensor, lam: float = 0.1) -> Tensor:
    """KL(p_S ‖ (1 - λ) p_T + λ sg(p_S)): the skew reverse KL with the student's share of the mixture held fixed.
    [N, V] x2 -> [N]."""
    return _kl(ls, _log_mix(ls.detach(), lt, lam))


def sequence_weights(targets: Tensor, sequences: float | None = None) -> Tensor:
    """Per-target-position weights [N] that turn a sum over positions into the mean over sequences of each
    sequence's mean over its positions. targets [B, T] bool; `sequences` replaces the number of sequences
    with targets as the divisor (data parallelism, see `kd_loss`'s `denominator`)."""
    per_sequence = targets.sum(dim=1)                                   # [B]
    rows = targets.nonzero()[:, 0]                                      # [N], row-major as `x[targets]`
    if sequences is None:
        sequences = (per_sequence > 0).sum()
    return 1.0 / (per_sequence[rows] * sequences).to(torch.float64)  # exact; cast where it is used


def beta_at(progress: float, beta: float = 1.0, gradual: bool = False) -> float:
    """β at `progress` (step / total steps): fixed, or 1 + 0.5 · min(1, 2 · progress) when gradual."""
    return 1.0 + 0.5 * min(1.0, 2.0 * progress) if gradual else beta


def distillm2_loss(student_hidden: Tensor, student_head: LogitHead, teacher_hidden: Tensor, teacher_head: LogitHead,
                   labels: Tensor, weights: Tensor, student_generated: bool, beta: float = 1.0,
                   skew_lambda: float = 0.1, temperature: float = 1.0, chunk_size: int = 1024,
                   denominator: float | None = None) -> dict[str, Tensor]:
    """The batch's term of the module docstring. student_hidden [N, dS], teacher_hidden [N, dT], labels [N] of the
    N target positions, weights [N] from `sequence_weights`. Returns {"loss", "kd"} (kd: the term before its
    factor) and "ce" (reported, not trained; its sum over `denominator` when given, else over N)."""
    n = labels.numel()
    factor = beta if student_generated else 2.0 - beta
    divergence = skew_reverse_kl_detached if student_generated else skew_forward_kl
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    coef = torch.tensor([0.0, factor], dtype=dtype)

    def chunk_sums(head: LogitHead, hs: list[Tensor], chunk_labels: Tensor, t_hidden: Tensor, w: Tensor) -> Tensor:
        logits = head(hs[0])
        logp = log_probs(logits)
        with torch.no_grad():
            t_logp = teacher_log_probs(teacher_head(t_hidden), temperature)
            ce = F.nll_loss(logp, chunk_labels, reduction="sum")
        tempered = logp if temperature == 1 else log_probs(logits.to(dtype) / temperature)
        return torch.stack([ce, (w.to(tempered.dtype) * divergence(tempered, t_logp, skew_lambda)).sum()])

    combined, sums = chunked_sums(chunk_sums, student_head, coef, n, chunk_size, [student_hidden], labels,
                                  teacher_hidden, weights)
    total = combined if combined is not None else sums[1] * factor
    return {"loss": total, "ce": sums[0] / (n if denominator is None else denominator), "kd": sums[1]}
