"""MTA (Multi-Granular Trajectory Alignment) losses, method.md §2-§5.

Pieces, each usable alone:
- `importance_weights`: parameter-free token weights w from one layer's states (§2);
- `span_membership` / `pool_spans`: span representations U and span weights ω (§3);
- `dsa_loss`: Dynamic Structural Alignment, within-model span distance matrices compared (§4);
- `hid_loss` / `hid_loss_spans`: projected hidden-state alignment, per token or per span (§5);
- `MTALoss`: all of it over the key layers of a batch, with one projector per key layer.

Spans are token ranges [start, end) (half-open), one row per span: LongTensor [K, 2].
Everything derived from weights runs in float32 (or float64 if the states are).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRANULARITIES = ("word", "phrase")


def importance_weights(h: Tensor, mask: Tensor) -> Tensor:
    """Attention each token receives from the other tokens of its sample, parameter-free (§2).

    Ĥ = h / std(h) over the hidden dim (no mean subtraction; torch's default unbiased std, N - 1);
    A = softmax_rows(Ĥ Ĥᵀ / sqrt(d)) with the diagonal and padding columns masked out;
    w_t = mean over valid rows s of A[s, t]. Padding gets 0, each sample's weights sum to 1
    (a sample with a single valid token gives it w = 1). Detached, float32 math.
    h [B, T, d], mask [B, T] bool (True = real token) -> w [B, T].
    """
    with torch.no_grad():
        mask = mask.bool()
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        h_hat = h / h.std(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        scores = h_hat @ h_hat.transpose(1, 2) / math.sqrt(h.shape[-1])  # [B, T, T]
        eye = torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
        visible = mask[:, None, :] & ~eye  # row s may attend to column t
        # A row with no visible column (single-token sample, padding rows) is all -inf: NaN -> 0.
        attn = scores.masked_fill(~visible, -math.inf).softmax(dim=-1).nan_to_num(0.0)
        n_valid = mask.sum(dim=1, keepdim=True)  # [B, 1]
        w = (attn * mask[:, :, None]).sum(dim=1) / n_valid.clamp_min(1)
        return torch.where(n_valid == 1, mask.to(w.dtype), w)


def span_membership(token_ranges: Tensor, n_tokens: int) -> Tensor:
    """Dense span x token membership: token_ranges [K, 2] ([start, end)) -> BoolTensor [K, n_tokens]."""
    pos = torch.arange(n_tokens, device=token_ranges.device)
    return (pos >= token_ranges[:, :1]) & (pos < token_ranges[:, 1:])


def pool_spans(h: Tensor, w: Tensor, token_ranges: Tensor) -> tuple[Tensor, Tensor]:
    """Importance-weighted span means U and normalised span weights ω (§3).

    U_k = Σ_{t∈S_k} w_t h_t / Σ_{t∈S_k} w_t, ω_k = Σ_{t∈S_k} w_t / Σ_j Σ_{t∈S_j} w_t.
    A span with no weight (empty range, or only zero-weight tokens) keeps its row with U_k = 0 and
    ω_k = 0, so it drops out of every ω-weighted loss and student and teacher spans stay index-aligned.
    Gradients flow to h; w is detached.
    h [T, d], w [T], token_ranges [K, 2] -> U [K, d], ω [K] (float32 at least).
    """
    dtype = torch.promote_types(torch.promote_types(h.dtype, w.dtype), torch.float32)
    weighted = span_membership(token_ranges, h.shape[0]).to(dtype) * w.detach().to(dtype)  # [K, T]
    mass = weighted.sum(dim=1)  # [K]
    tiny = torch.finfo(dtype).tiny
    u = (weighted @ h.to(dtype)) / mass.clamp_min(tiny)[:, None]
    return u, mass / mass.sum().clamp_min(tiny)


def _cosine_distances(u: Tensor) -> Tensor:
    """1 - cos between all rows: [K, d] -> [K, K]. Zero rows have cos 0 with everything."""
    u = F.normalize(u, dim=-1)
    return 1 - u @ u.T


def dsa_loss(u_s: Tensor, u_t: Tensor, omega: Tensor) -> Tensor:
    """Dynamic Structural Alignment for one sample and layer (§4).

    Σ_{i≠j} ω_i ω_j (D^S_ij - D^T_ij)² / Σ_{i≠j} ω_i ω_j with D = 1 - cos within each model, so the
    hidden sizes may differ. 0 when fewer than two spans carry weight.
    u_s [K, dS], u_t [K, dT], omega [K] (teacher span weights) -> scalar.
    """
    off_diagonal = ~torch.eye(omega.shape[0], dtype=torch.bool, device=omega.device)
    pair = omega[:, None] * omega[None, :] * off_diagonal
    sq = (_cosine_distances(u_s) - _cosine_distances(u_t)) ** 2
    return (pair * sq).sum() / pair.sum().clamp_min(torch.finfo(pair.dtype).tiny)


def _projected_cosine_distance(projector: nn.Linear, x_s: Tensor, x_t: Tensor) -> Tensor:
    """1 - cos(projector(x_s), x_t) per row: [n, dS], [n, dT] -> [n], in float32 at least."""
    p = projector(x_s.to(projector.weight.dtype))
    dtype = torch.promote_types(torch.promote_types(p.dtype, x_t.dtype), torch.float32)
    return 1 - F.cosine_similarity(p.to(dtype), x_t.to(dtype), dim=-1)


def hid_loss(h_s: Tensor, h_t: Tensor, projector: nn.Linear, w_t: Tensor, covered: Tensor) -> Tensor:
    """Hidden Representation Alignment at token level, same tokenizer (§5).

    Σ_{covered t} w^T_t (1 - cos(projector(h^S_t), h^T_t)), teacher weights detached.
    h_s [T, dS], h_t [T, dT], w_t [T], covered [T] bool (token inside one of the layer's spans) -> scalar.
    """
    return (w_t.detach() * covered * _projected_cosine_distance(projector, h_s, h_t)).sum()


def hid_loss_spans(u_s: Tensor, u_t: Tensor, projector: nn.Linear, omega: Tensor) -> Tensor:
    """Hidden Representation Alignment on span representations, for different tokenizers (§5, our choice).

    Σ_k ω_k (1 - cos(projector(U^S_k), U^T_k)). u_s [K, dS], u_t [K, dT], omega [K] -> scalar.
    """
    return (omega.detach() * _projected_cosine_distance(projector, u_s, u_t)).sum()


def mean_over_valid(values: list[Tensor], valid: list[Tensor], counts: Callable[[Tensor], Tensor] | None = None
                    ) -> Tensor:
    """Mean over key layers of each layer's mean over the samples that count, without a host sync.

    values, valid: one [B] tensor per key layer (valid: 1.0 where the sample contributes). A layer with no
    valid sample is left out of the layer mean; no valid sample at all gives 0. `counts` maps the batch's
    per-layer counts [L] to those the sums are divided by (data parallelism: the global counts over the
    number of ranks, see `kd_loss`'s `denominator`)."""
    values, valid = torch.stack(values), torch.stack(valid)   # [L, B]
    counts = valid.sum(dim=1) if counts is None else counts(valid.sum(dim=1))   # [L]
    per_layer = (values * valid).sum(dim=1) / torch.where(counts > 0, counts, torch.ones_like(counts))
    layers = (counts > 0).to(per_layer.dtype)
    return (per_layer * layers).sum() / layers.sum().clamp_min(1)


class MTALoss(nn.Module):
    """DSA + Hid over the key layers of a batch, student and teacher sharing one tokenizer.

    key_layers: (student layer, teacher layer, "word" | "phrase") triples (see `schedule`); one
    Linear(dS -> dT, no bias) projector per key layer, created only when `use_hid`.
    student_pooling: whose importance weights pool the student's spans, "student" (its own, default)
    or "teacher"; the pair weights ω_i ω_j and the Hid token weights always come from the teacher.
    normalize_hid: renormalise the teacher's token weights over each sample's covered tokens (the MTA
    group's code) instead of using the raw weights (method.md §5, the default).
    Teacher states are targets: detached, so a live teacher gets no gradient either.
    use_dsa / use_hid switch the two terms off for ablations (a disabled term reports 0).

    Averaging: each term is, per key layer, the mean over the samples that can contribute to it (DSA:
    at least two spans carrying weight; Hid: covered tokens carrying weight), then the mean over key
    layers that have such a sample. A sample with one phrase has no pair to compare, so it is left out
    rather than counted as a perfect 0 (which would shrink the term with the share of short samples).
    """

    def __init__(
        self,
        key_layers: list[tuple[int, int, str]],
        student_dim: int,
        teacher_dim: int,
        lambda_dsa: float = 2.0,
        lambda_hid: float = 0.2,
        use_dsa: bool = True,
        use_hid: bool = True,
        student_pooling: str = "student",
        normalize_hid: bool = False,
    ) -> None:
        super().__init__()
        if student_pooling not in ("student", "teacher"):
            raise ValueError(f"student_pooling must be 'student' or 'teacher', got {student_pooling!r}")
        for _, _, granularity in key_layers:
            if granularity not in GRANULARITIES:
                raise ValueError(f"granularity must be 'word' or 'phrase', got {granularity!r}")
        self.key_layers = [tuple(k) for k in key_layers]
        self.lambda_dsa, self.lambda_hid = lambda_dsa, lambda_hid
        self.use_dsa, self.use_hid = use_dsa, use_hid
        self.student_pooling = student_pooling
        self.normalize_hid = normalize_hid
        n_projectors = len(key_layers) if use_hid else 0
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(n_projectors))

    def forward(
        self,
        student_states: dict[int, Tensor],
        teacher_states: dict[int, Tensor],
        mask: Tensor,
        spans: list[dict[str, Tensor]],
        teacher_mask: Tensor | None = None,
        teacher_spans: list[dict[str, Tensor]] | None = None,
        counts: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """student_states {layer: [B, T, dS]}, teacher_states {layer: [B, T', dT]}, mask [B, T] bool,
        spans: per sample {"word": [Kw, 2], "phrase": [Kp, 2]} token ranges.

        Same tokenizer: T' = T and the spans serve both models. A student with its own tokenizer
        passes `teacher_mask` [B, T'] and `teacher_spans` (the same spans, in the same order, as
        teacher token ranges): student spans are then pooled with the student's weights, a span
        counts only where both models have a token of it, and Hid compares span representations.
        Returns scalars "dsa" and "hid" (unweighted, averaged as the class docstring says; `counts` as in
        `mean_over_valid`) and "mta" = λ_dsa dsa + λ_hid hid.
        """
        cross = teacher_spans is not None
        teacher_mask = teacher_mask if cross else mask
        teacher_spans = teacher_spans if cross else spans
        batch, n_tokens = mask.shape
        zero = torch.zeros((), device=mask.device)
        dsa_values, dsa_valid, hid_values, hid_valid = [], [], [], []
        for i, (layer_s, layer_t, granularity) in enumerate(self.key_layers):
            h_s, h_t = student_states[layer_s], teacher_states[layer_t].detach()
            w_t = importance_weights(h_t, teacher_mask)
            own_weights = cross or (self.use_dsa and self.student_pooling == "student")
            w_s = importance_weights(h_s, mask) if own_weights else w_t
            layer_dsa, layer_dsa_valid, layer_hid, layer_hid_valid = [], [], [], []
            for b in range(batch):
                ranges_s = spans[b][granularity].to(mask.device)
                ranges_t = teacher_spans[b][granularity].to(mask.device)
                if cross or self.use_dsa:
                    u_t, omega = pool_spans(h_t[b], w_t[b], ranges_t)
                    u_s, omega_s = pool_spans(h_s[b], w_s[b], ranges_s)
                    if cross:
                        omega = omega * (omega_s > 0)
                        omega = omega / omega.sum().clamp_min(torch.finfo(omega.dtype).tiny)
                if self.use_dsa:
                    layer_dsa.append(dsa_loss(u_s, u_t, omega))
                    layer_dsa_valid.append(((omega > 0).sum() >= 2).to(omega.dtype))
                if self.use_hid and cross:
                    layer_hid.append(hid_loss_spans(u_s, u_t, self.projectors[i], omega))
                    layer_hid_valid.append((omega > 0).any().to(omega.dtype))
                elif self.use_hid:
                    covered = span_membership(ranges_s, n_tokens).any(dim=0)
                    weights = w_t[b] * covered
                    mass = weights.sum()
                    if self.normalize_hid:
                        weights = weights / mass.clamp_min(torch.finfo(weights.dtype).tiny)
                    layer_hid.append(hid_loss(h_s[b], h_t[b], self.projectors[i], weights, covered))
                    layer_hid_valid.append((mass > 0).to(weights.dtype))
            if self.use_dsa:
                dsa_values.append(torch.stack(layer_dsa))
                dsa_valid.append(torch.stack(layer_dsa_valid))
            if self.use_hid:
                hid_values.append(torch.stack(layer_hid))
                hid_valid.append(torch.stack(layer_hid_valid))
        dsa = mean_over_valid(dsa_values, dsa_valid, counts) if dsa_values else zero
        hid = mean_over_valid(hid_values, hid_valid, counts) if hid_values else zero
        return {"dsa": dsa, "hid": hid, "mta": self.lambda_dsa * dsa + self.lambda_hid * hid}
