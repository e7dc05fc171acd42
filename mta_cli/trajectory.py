"""Trajectory diagnostics: how well a student's key layers align with the teacher's cached states.

For each key-layer pair (student layer, teacher layer): the DSA distance of method.md §4 (mean over
samples, the student's spans pooled with its own importance weights) and linear CKA between student
and teacher representations (token states with the teacher's tokenizer, span representations with
another one). A model compared with its own cache gives CKA 1 and DSA 0 at matching layers.
"""

from __future__ import annotations

import statistics

import torch

from mta_cli.cache.reader import CacheReader
from mta_cli.losses import dsa_loss, importance_weights, pair_teacher_layers, pool_spans
from mta_cli.models import n_layers, tokenizer_fingerprint
from mta_cli.training.batches import collate


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of x [n, d1] and y [n, d2]: 1 for representations equal up to
    rotation and isotropic scaling, 0 for unrelated ones."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-30))


def key_layer_pairs(model, reader: CacheReader) -> list[tuple[int, int, str]]:
    """The schedule a student was trained with (saved in its config by `mta train`); otherwise the default
    schedule of `mta train` for this cache: each cached teacher layer with the student layer at the same
    relative depth (`pair_teacher_layers`; a model compared with its own cache is paired layer for layer)."""
    saved = (getattr(model.config, "mta_training", None) or {}).get("objective", {}).get("key_layers")
    if saved:
        return [tuple(p) for p in saved]
    return pair_teacher_layers(reader.layers, n_layers(model), reader.meta["teacher"]["n_layers"])


@torch.no_grad()
def trajectory_diagnostics(model, tokenizer, cache: str | CacheReader, max_samples: int = 64, batch_size: int = 8,
                           device: torch.device | str = "cpu") -> list[dict]:
    """Per key-layer pair: {"student_layer", "teacher_layer", "granularity", "dsa", "cka", "samples"}."""
    reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
    pairs = key_layer_pairs(model, reader)
    own_tokenizer = tokenizer_fingerprint(tokenizer) != reader.meta["config"]["tokenizer_sha256"]
    samples = [reader.sample(i, [t for _, t, _ in pairs]) for i in range(min(max_samples, len(reader)))]
    teacher_pad = reader.meta["tokenizer"]["pad_token_id"] or 0
    dsa = {p: [] for p in pairs}
    student_rows = {p: [] for p in pairs}
    teacher_rows = {p: [] for p in pairs}
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size], teacher_pad, tokenizer if own_tokenizer else None)
        batch = batch.to(device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        mask = batch.attention_mask.bool()
        teacher_mask = mask if batch.teacher_mask is None else batch.teacher_mask.bool()
        teacher_spans = batch.spans if batch.teacher_spans is None else batch.teacher_spans
        for pair in pairs:
            layer_s, layer_t, granularity = pair
            h_s, h_t = out.hidden_states[layer_s].float(), batch.teacher_states[layer_t]
            w_s, w_t = importance_weights(h_s, mask), importance_weights(h_t, teacher_mask)
            for b in range(h_s.shape[0]):
                u_t, omega = pool_spans(h_t[b], w_t[b], teacher_spans[b][granularity])
                u_s, omega_s = pool_spans(h_s[b], w_s[b], batch.spans[b][granularity])
                omega = omega * (omega_s > 0)
                dsa[pair].append(float(dsa_loss(u_s, u_t, omega / omega.sum().clamp_min(1e-12))))
                if own_tokenizer:
                    keep = omega > 0
                    student_rows[pair].append(u_s[keep].cpu())
                    teacher_rows[pair].append(u_t[keep].cpu())
                else:
                    student_rows[pair].append(h_s[b][mask[b]].cpu())
                    teacher_rows[pair].append(h_t[b][mask[b]].cpu())
    return [{"student_layer": s, "teacher_layer": t, "granularity": g, "dsa": statistics.fmean(dsa[(s, t, g)]),
             "cka": linear_cka(torch.cat(student_rows[(s, t, g)]), torch.cat(teacher_rows[(s, t, g)])),
             "cka_over": "spans" if own_tokenizer else "tokens", "samples": len(samples)} for s, t, g in pairs]
