"""Base distillation losses: SFT and (1 - α) CE + α D(p_T, p_S), from hidden states and output heads.

The cache stores the teacher's last hidden state and its output head, so exact teacher logits are
recomputed here with one matmul. For a 150k vocabulary [N, V] logits do not fit for long batches,
so `kd_loss` walks the positions in chunks: each chunk's student and teacher logits exist only
inside a `torch.utils.checkpoint` region, are reduced to two scalar sums at once, and are recomputed
during backward instead of being kept. Peak memory is O(chunk_size * V), at the price of a second
head matmul (student and teacher) per chunk in backward.

Conventions shared by every loss here:
- positions are flat: the caller passes only response positions, already shifted (`labels[i]` is
  the token that position i predicts); each reported loss is the MEAN over those N positions;
- CE uses the true labels at temperature 1; the divergence uses logits / temperature for both
  models and is NOT multiplied by T² (as in DistiLLM);
- "sft" is CE alone, any key of `DIVERGENCES` is (1 - α) CE + α D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mta_cli.losses.divergences import DIVERGENCES, topk_forward_kl

LOSSES = ("sft", *DIVERGENCES)


@dataclass
class LogitHead:
    """A model's output head: logits = scale * (h @ weight.T + bias), then c * tanh(logits / c) if softcap = c.

    weight [V, d], bias [V] or None. `scale` covers heads such as Cohere's `logit_scale`, `softcap`
    Gemma-2's final logit soft-capping.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, h: Tensor) -> Tensor:
        """[..., d] -> [..., V], in the weight's dtype."""
        logits = F.linear(h.to(self.weight.dtype), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _check(loss: str, alpha: float, temperature: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _sums(
    student_logits: Tensor,
    labels: Tensor,
    divergence: Callable[..., Tensor] | None,
    temperature: float,
    teacher: tuple[Tensor, ...] = (),
) -> Tensor:
    """[CE sum, divergence sum] over positions, as a float tensor of shape [2].

    student_logits [n, V] at temperature 1, labels [n]; the divergence term is
    divergence(student_logits / temperature, *teacher) summed, or 0 when `divergence` is None (SFT).
    """
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, labels, reduction="sum")
    kd = divergence(logits / temperature, *teacher).sum() if divergence is not None else torch.zeros_like(ce)
    return torch.stack([ce, kd])


def _reduce(sums: Tensor, n: int, loss: str, alpha: float) -> dict[str, Tensor]:
    """Means over the n positions and the combined loss, from [CE sum, divergence sum]."""
    ce, kd = sums / n
    if loss == "sft":
        return {"loss": ce, "ce": ce}
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def _chunked(fn: Callable[..., Tensor], n: int, chunk_size: int, *tensors: Tensor) -> Tensor:
    """Σ over chunks of positions of fn(*chunk slices), each chunk checkpointed (recomputed in backward)."""
    if n == 0:
        raise ValueError("no positions to compute a loss on (N = 0)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = 0
    for start in range(0, n, chunk_size):
        chunk = [t[start : start + chunk_size] if t is not None else None for t in tensors]
        total = total + checkpoint(fn, *chunk, use_reentrant=False)
    return total


def kd_loss_from_logits(
    student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, loss: str, alpha: float, temperature: float
) -> dict[str, Tensor]:
    """The base loss from full logits, student_logits [N, V], teacher_logits [N, V] (unused for "sft"), labels [N].

    Returns {"loss", "ce", "kd"} (no "kd" for "sft"), scalar means over the N positions.
    Reference for `kd_loss` and the loss of the online baseline.
    """
    _check(loss, alpha, temperature)
    if loss == "sft":
        sums = _sums(student_logits, labels, None, temperature)
    else:
        sums = _sums(student_logits, labels, DIVERGENCES[loss], temperature, (teacher_logits.detach() / temperature,))
    return _reduce(sums, labels.numel(), loss, alpha)


def kd_loss(
    student_hidden: Tensor,
    student_head: LogitHead,
    teacher_hidden: Tensor | None,
    teacher_head: LogitHead | None,
    labels: Tensor,
    loss: str,
    alpha: float,
    temperature: float,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """The base loss from last hidden states, with logits computed chunk by chunk (see module docstring).

    student_hidden [N, dS], teacher_hidden [N, dT] (None for "sft"), labels [N].
    Gradients reach student_hidden and the student head's tensors; the teacher side runs under no_grad.
    Returns what `kd_loss_from_logits` returns for the full logits.
    """
    _check(loss, alpha, temperature)

    def chunk_sums(s_hidden: Tensor, t_hidden: Tensor | None, chunk_labels: Tensor) -> Tensor:
        if loss == "sft":
            return _sums(student_head(s_hidden), chunk_labels, None, temperature)
        with torch.no_grad():
            t_logits = teacher_head(t_hidden) / temperature
        return _sums(student_head(s_hidden), chunk_labels, DIVERGENCES[loss], temperature, (t_logits,))

    n = labels.numel()
    sums = _chunked(chunk_sums, n, chunk_size, student_hidden, teacher_hidden, labels)
    return _reduce(sums, n, loss, alpha)


def topk_kd_loss(
    student_hidden: Tensor,
    student_head: LogitHead,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    rest_mass: Tensor,
    labels: Tensor,
    loss: str,
    alpha: float,
    temperature: float,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """`kd_loss` for a cache that holds sparse teacher log-probs instead of the teacher's states and head.

    topk_ids [N, K] int, topk_logprobs [N, K], rest_mass [N] (1 - Σ_k p_T,k), student_hidden [N, dS], labels [N].
    Only "fkl" (the left-over mass as one extra bucket, see `topk_forward_kl`) and "sft" are defined.
    The stored log-probs are used as they are: they must have been extracted at `temperature`,
    which here divides the student's logits only.
    """
    _check(loss, alpha, temperature)
    if loss not in ("sft", "fkl"):
        raise ValueError(f"loss {loss!r} needs the teacher's full distribution; with top-k teacher log-probs use 'fkl'")

    divergence = topk_forward_kl if loss == "fkl" else None

    def chunk_sums(s_hidden: Tensor, ids: Tensor, logprobs: Tensor, rest: Tensor, chunk_labels: Tensor) -> Tensor:
        return _sums(student_head(s_hidden), chunk_labels, divergence, temperature, (ids, logprobs, rest))

    n = labels.numel()
    sums = _chunked(chunk_sums, n, chunk_size, student_hidden, topk_ids, topk_logprobs, rest_mass, labels)
    return _reduce(sums, n, loss, alpha)
