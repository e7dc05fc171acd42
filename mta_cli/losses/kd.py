"""Base distillation losses: SFT and (1 - α) CE + α D(p_T, p_S), from hidden states and output heads.

The cache stores the teacher's last hidden state and its output head, so exact teacher logits are
recomputed here with one matmul. For a 150k vocabulary [N, V] logits do not fit for long batches,
so `kd_loss` walks the positions in chunks and fuses head and loss (`_FusedChunks`): each chunk's
student and teacher logits are built, reduced to two sums, and differentiated at once, then freed.
SFT and the KL family (fkl, rkl, skl, srkl, js) are differentiated in closed form (`closed_form`), TVD and
AKL by autograd.
Peak memory is O(chunk_size * V) plus the gradients of the hidden states and the head; nothing is
recomputed in backward.

Conventions shared by every loss here:
- positions are flat: the caller passes only response positions, already shifted (`labels[i]` is
  the token that position i predicts); each reported loss is the MEAN over those N positions, or the
  sum divided by `denominator` when given (data parallelism: this rank's share of a global batch
  divides by the global N over the number of ranks, so that the ranks' mean is the global mean);
- CE uses the true labels at temperature 1; the divergence uses logits / temperature for both
  models and is NOT multiplied by T² (as in DistiLLM);
- "sft" is CE alone, any key of `DIVERGENCES` is (1 - α) CE + α D.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mta_cli.losses.closed_form import closed_form_sums, mixture_terms
from mta_cli.losses.divergences import DIVERGENCES, bound_divergence, log_probs, topk_forward_kl

LOSSES = ("sft", *DIVERGENCES)
CHUNK_BYTES = 48 << 20  # one [chunk, V] float32 tensor; a KD chunk keeps about six alive


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one [chunk, V] float32 tensor is about 48 MiB: 256 for SmolLM2's 49,152
    tokens (peak memory of an srkl step 1.11x sft's at batch 8 x 256, against 1.42x with 1,024)."""
    return max(32, min(4096, CHUNK_BYTES // (4 * vocab_size)))


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

    def to(self, device: torch.device | str) -> "LogitHead":
        bias = None if self.bias is None else self.bias.to(device)
        return LogitHead(self.weight.to(device), bias, self.scale, self.softcap)

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
    divergence(log_probs(student_logits / temperature), *teacher) summed, or 0 when `divergence` is
    None (SFT). At temperature 1 the CE and the divergence share one log_softmax.
    """
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    logp = log_probs(logits)
    ce = F.nll_loss(logp, labels, reduction="sum")
    if divergence is None:
        return torch.stack([ce, torch.zeros_like(ce)])
    tempered = logp if temperature == 1 else log_probs(logits / temperature)
    return torch.stack([ce, divergence(tempered, *teacher).sum()])


@functools.cache
def compiled_sums() -> Callable[..., Tensor]:
    """`_sums` compiled once per process (torch.compile, shapes dynamic: the last chunk is shorter): the
    elementwise work over [chunk, V] fused into fewer passes. Compiling takes ~25 s on 2 CPU cores."""
    return torch.compile(_sums, dynamic=True)


def teacher_log_probs(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Teacher log-probabilities at `temperature`, without a graph."""
    with torch.no_grad():
        return log_probs(teacher_logits if temperature == 1 else teacher_logits / temperature)


def _reduce(sums: Tensor, n: int, loss: str, alpha: float, combined: Tensor | None = None) -> dict[str, Tensor]:
    """Means over the n positions and the combined loss, from [CE sum, divergence sum].

    `combined` is the already computed (differentiable) loss of `_fused_chunks`; the components are
    then reported without a graph."""
    ce, kd = sums / n
    total = combined if combined is not None else (ce if loss == "sft" else (1 - alpha) * ce + alpha * kd)
    if loss == "sft":
        return {"loss": total, "ce": total}
    return {"loss": total, "ce": ce, "kd": kd}


def _coefficients(loss: str, alpha: float, n: int, dtype: torch.dtype) -> Tensor:
    """Weights turning [CE sum, divergence sum] into the combined mean loss."""
    if n == 0:
        raise ValueError("no positions to compute a loss on (N = 0)")
    return torch.tensor([1.0 / n, 0.0] if loss == "sft" else [(1 - alpha) / n, alpha / n], dtype=dtype)


class _FusedChunks(torch.autograd.Function):
    """Chunked loss whose gradient is computed during forward, chunk by chunk (fused head + loss).

    For each chunk of positions the head's logits are built, reduced to a vector of sums (e.g. [CE sum,
    D sum]), and the gradient of coef · sums w.r.t. the chunk's hidden states and the head's tensors is
    taken at once; then the chunk's [chunk, V] tensors are freed. Backward only scales the stored
    gradients. Per chunk this costs 3 student-head matmuls (forward, two gradients), where
    checkpointing costs 4, and the teacher's logits are computed once instead of twice.
    `n_hidden` hidden inputs [N, dS] (several for the logit lens of FDD) are chunked together.
    Returns (combined loss, sums without a graph).
    """

    @staticmethod
    def forward(ctx, fn, head, coef, chunk_size, n_hidden, *tensors):
        hidden, weight, bias, rest = list(tensors[:n_hidden]), tensors[n_hidden], tensors[n_hidden + 1], \
            tensors[n_hidden + 2:]
        n = hidden[0].shape[0]
        grad_hidden = [torch.zeros_like(h) for h in hidden]
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        sums = 0
        for start in range(0, n, chunk_size):
            chunk = [t[start:start + chunk_size] if t is not None else None for t in rest]
            with torch.enable_grad():
                hs = [h[start:start + chunk_size].detach().requires_grad_() for h in hidden]
                w = weight.detach().requires_grad_()
                b = bias.detach().requires_grad_() if bias is not None else None
                chunk_sums = fn(LogitHead(w, b, head.scale, head.softcap), hs, *chunk)
                objective = (chunk_sums * coef.to(chunk_sums.dtype)).sum()
            grads = torch.autograd.grad(objective, hs + [w] + ([b] if b is not None else []), allow_unused=True)
            for g_hidden, g in zip(grad_hidden, grads[:n_hidden]):
                if g is not None:
                    g_hidden[start:start + chunk_size] = g
            grad_weight += grads[n_hidden]
            if b is not None:
                grad_bias += grads[n_hidden + 1]
            sums = sums + chunk_sums.detach()
        ctx.n_hidden = n_hidden
        ctx.save_for_backward(grad_weight, grad_bias, *grad_hidden)
        ctx.mark_non_differentiable(sums)
        return (sums * coef.to(sums.dtype)).sum(), sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        grad_weight, grad_bias, *grad_hidden = ctx.saved_tensors
        scaled_bias = grad_bias * grad_loss if grad_bias is not None else None
        n_rest = len(ctx.needs_input_grad) - 5 - ctx.n_hidden - 2
        return (None, None, None, None, None, *[g * grad_loss for g in grad_hidden], grad_weight * grad_loss,
                scaled_bias, *([None] * n_rest))


def chunked_sums(fn: Callable[..., Tensor], head: LogitHead, coef: Tensor, n: int, chunk_size: int,
                 hidden: list[Tensor], *tensors: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """(combined loss or None, sums) of fn(head, hidden chunks, *chunks) over chunks of positions.

    With gradients needed, `_FusedChunks` computes them on the fly; otherwise a plain loop."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in [*hidden, *params]):
        return _FusedChunks.apply(fn, head, coef, chunk_size, len(hidden), *hidden, head.weight, head.bias, *tensors)
    sums = sum(fn(head, [h[s:s + chunk_size] for h in hidden],
                  *[t[s:s + chunk_size] if t is not None else None for t in tensors])
               for s in range(0, n, chunk_size))
    return None, sums


def _chunked(fn: Callable[..., Tensor], head: LogitHead, coef: Tensor, n: int, chunk_size: int, hidden: Tensor,
             *tensors: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """`chunked_sums` for one hidden input: fn(head, hidden chunk, *chunks)."""
    return chunked_sums(lambda head_, hs, *chunks: fn(head_, hs[0], *chunks), head, coef, n, chunk_size, [hidden],
                        *tensors)


def kd_loss_from_logits(
    student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, loss: str, alpha: float, temperature: float,
    skew_lambda: float = 0.1, akl_mu: float = 0.5,
) -> dict[str, Tensor]:
    """The base loss from full logits, student_logits [N, V], teacher_logits [N, V] (unused for "sft"), labels [N].

    Returns {"loss", "ce", "kd"} (no "kd" for "sft"), scalar means over the N positions.
    Reference for `kd_loss` and the loss of the online baseline. skew_lambda / akl_mu: see `bound_divergence`.
    """
    _check(loss, alpha, temperature)
    if loss == "sft":
        sums = _sums(student_logits, labels, None, temperature)
    else:
        sums = _sums(student_logits, labels, bound_divergence(loss, skew_lambda, akl_mu), temperature,
                     (teacher_log_probs(teacher_logits, temperature),))
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
    skew_lambda: float = 0.1,
    akl_mu: float = 0.5,
    denominator: float | None = None,
    compile: bool = False,
) -> dict[str, Tensor]:
    """The base loss from last hidden states, with logits computed chunk by chunk (see module docstring).

    student_hidden [N, dS], teacher_hidden [N, dT] (None for "sft"), labels [N].
    Gradients reach student_hidden and the student head's tensors; the teacher side runs under no_grad.
    Returns what `kd_loss_from_logits` returns for the full logits (sums over `denominator` when given).
    `compile` compiles the per-chunk work (`closed_form.compiled_sums_and_gradients`, or `compiled_sums` for
    tvd and akl).
    """
    _check(loss, alpha, temperature)
    divergence = bound_divergence(loss, skew_lambda, akl_mu) if loss != "sft" else None
    terms = mixture_terms(loss, skew_lambda)
    closed_form = divergence is None or terms is not None
    term_sums = compiled_sums() if compile else _sums

    def chunk_sums(head: LogitHead, s_hidden: Tensor, t_hidden: Tensor | None, chunk_labels: Tensor) -> Tensor:
        t_logp = None
        if divergence is not None:
            with torch.no_grad():
                t_logp = teacher_log_probs(teacher_head(t_hidden), temperature)
        if closed_form:
            return closed_form_sums(head(s_hidden), chunk_labels, t_logp, terms, temperature, compile)
        return term_sums(head(s_hidden), chunk_labels, divergence, temperature, () if t_logp is None else (t_logp,))

    n = labels.numel()
    d = n if denominator is None else denominator
    coef = _coefficients(loss, alpha, d, torch.promote_types(student_hidden.dtype, torch.float32))
    combined, sums = _chunked(chunk_sums, student_head, coef, n, chunk_size, student_hidden, teacher_hidden, labels)
    return _reduce(sums, d, loss, alpha, combined)


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
    denominator: float | None = None,
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

    def chunk_sums(head: LogitHead, s_hidden: Tensor, ids: Tensor, logprobs: Tensor, rest: Tensor,
                   chunk_labels: Tensor) -> Tensor:
        return _sums(head(s_hidden), chunk_labels, divergence, temperature, (ids, logprobs, rest))

    n = labels.numel()
    d = n if denominator is None else denominator
    coef = _coefficients(loss, alpha, d, torch.promote_types(student_hidden.dtype, torch.float32))
    combined, sums = _chunked(chunk_sums, student_head, coef, n, chunk_size, student_hidden, topk_ids,
                              topk_logprobs, rest_mass, labels)
    return _reduce(sums, d, loss, alpha, combined)
