"""Independent float64 references for the method's formulas, written from method.md §2-§5 and §7 with
plain numpy loops, not from the library's code, so that tests can hold the library's values against them.

Where method.md leaves a choice open, the reference follows the library's documented choice:
- importance weights use the unbiased std (N - 1) over the hidden dim; one valid token gets w = 1;
- a span without weight keeps its row with U = 0 and ω = 0;
- token Hid sums w^T over the covered tokens without renormalising them (renormalised over them with
  `normalize_hid`, the MTA group's code);
- with two tokenizers a span counts only where the student has a token of it (ω masked, renormalised)
  and Hid compares span representations;
- every term is, per key layer, the mean over the samples that can contribute (DSA: two or more spans
  with weight; Hid: covered tokens with weight), then the mean over the key layers that have one.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def importance_weights(h: np.ndarray) -> np.ndarray:
    """§2 for one sample's valid tokens h [n, d]: attention received, self-attention excluded."""
    n, d = h.shape
    if n == 1:
        return np.ones(1)
    h_hat = h / h.std(axis=-1, ddof=1, keepdims=True)
    weights = np.zeros(n)
    for s in range(n):
        others = [t for t in range(n) if t != s]
        scores = np.array([h_hat[s] @ h_hat[t] / math.sqrt(d) for t in others])
        weights[others] += softmax(scores) / n
    return weights


def pool(h: np.ndarray, w: np.ndarray, ranges) -> tuple[np.ndarray, np.ndarray]:
    """§3: weighted span means U [K, d] and span weights ω [K] normalised over the sample's spans."""
    u = np.zeros((len(ranges), h.shape[1]))
    mass = np.zeros(len(ranges))
    for k, (start, end) in enumerate(ranges):
        mass[k] = w[start:end].sum()
        if mass[k] > 0:
            u[k] = (w[start:end, None] * h[start:end]).sum(0) / mass[k]
    total = mass.sum()
    return u, (mass / total if total > 0 else mass)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 0.0


def dsa(u_s: np.ndarray, u_t: np.ndarray, omega: np.ndarray) -> float:
    """§4: Σ_{i≠j} ω_i ω_j (d_S(i, j) - d_T(i, j))² / Σ_{i≠j} ω_i ω_j with d = 1 - cos; 0 without pairs."""
    num = den = 0.0
    for i in range(len(omega)):
        for j in range(len(omega)):
            if i != j:
                pair = omega[i] * omega[j]
                num += pair * ((1 - cosine(u_s[i], u_s[j])) - (1 - cosine(u_t[i], u_t[j]))) ** 2
                den += pair
    return num / den if den > 0 else 0.0


def hid_tokens(h_s: np.ndarray, h_t: np.ndarray, projector: np.ndarray, w_t: np.ndarray, covered) -> float:
    """§5, same tokenizer: Σ_{covered t} w^T_t (1 - cos(W h^S_t, h^T_t)); projector W [dT, dS]."""
    return sum(w_t[t] * (1 - cosine(projector @ h_s[t], h_t[t])) for t in covered)


def hid_spans(u_s: np.ndarray, u_t: np.ndarray, projector: np.ndarray, omega: np.ndarray) -> float:
    """§5, other tokenizer: Σ_k ω_k (1 - cos(W U^S_k, U^T_k))."""
    return sum(omega[k] * (1 - cosine(projector @ u_s[k], u_t[k])) for k in range(len(omega)))


def mean_of_means(per_layer: list[list[float]]) -> float:
    """Mean over layers of each layer's mean over its contributing samples; layers without one left out."""
    means = [sum(values) / len(values) for values in per_layer if values]
    return sum(means) / len(means) if means else 0.0


def mta(student: dict, teacher: dict, lengths: list[int], spans: list[dict], key_layers, projectors,
        lambda_dsa: float = 2.0, lambda_hid: float = 0.2, pooling: str = "student",
        teacher_lengths: list[int] | None = None, teacher_spans: list[dict] | None = None,
        normalize_hid: bool = False) -> dict[str, float]:
    """§7's MTA part of a batch: {"dsa", "hid", "mta"}, each term averaged as the module docstring says.

    student {layer: [B, T, dS]}, teacher {layer: [B, T', dT]} arrays; lengths: valid tokens per sample;
    spans: per sample {"word": [[start, end)], "phrase": ...} token ranges; key_layers (student layer,
    teacher layer, granularity); projectors: one [dT, dS] matrix per key layer (None: no Hid term).
    teacher_lengths / teacher_spans: the teacher's own grid when the student has another tokenizer.
    """
    cross = teacher_spans is not None
    dsa_terms, hid_terms = [], []
    for i, (layer_s, layer_t, granularity) in enumerate(key_layers):
        dsa_layer, hid_layer = [], []
        for b, n in enumerate(lengths):
            n_t = teacher_lengths[b] if cross else n
            h_s, h_t = student[layer_s][b, :n], teacher[layer_t][b, :n_t]
            w_t = importance_weights(h_t)
            w_s = importance_weights(h_s) if cross or pooling == "student" else w_t
            ranges_s = spans[b][granularity]
            ranges_t = teacher_spans[b][granularity] if cross else ranges_s
            u_t, omega = pool(h_t, w_t, ranges_t)
            u_s, omega_s = pool(h_s, w_s, ranges_s)
            if cross:
                omega = omega * (omega_s > 0)
                omega = omega / omega.sum() if omega.sum() > 0 else omega
            if (omega > 0).sum() >= 2:
                dsa_layer.append(dsa(u_s, u_t, omega))
            if projectors is None:
                continue
            if cross:
                if (omega > 0).any():
                    hid_layer.append(hid_spans(u_s, u_t, projectors[i], omega))
                continue
            covered = sorted({t for start, end in ranges_s for t in range(start, end)})
            mass = sum(w_t[t] for t in covered)
            if mass > 0:
                weights = w_t / mass if normalize_hid else w_t
                hid_layer.append(hid_tokens(h_s, h_t, projectors[i], weights, covered))
        dsa_terms.append(dsa_layer)
        hid_terms.append(hid_layer)
    dsa_mean, hid_mean = mean_of_means(dsa_terms), mean_of_means(hid_terms)
    return {"dsa": dsa_mean, "hid": hid_mean, "mta": lambda_dsa * dsa_mean + lambda_hid * hid_mean}


def base_losses(student_logits: np.ndarray, teacher_logits: np.ndarray | None, labels: np.ndarray,
                divergence, alpha: float, temperature: float) -> dict[str, float]:
    """§7's base loss over N target positions: SFT (`divergence` None) is the mean CE; otherwise
    (1 - α) CE + α mean D(p_S, p_T), D on softmax(logits / τ) of both models (no τ² factor), CE at τ = 1.
    student_logits, teacher_logits [N, V], labels [N]; divergence(p_S, p_T) -> [N]."""
    ce = float(-log_softmax(student_logits)[np.arange(len(labels)), labels].mean())
    if divergence is None:
        return {"loss": ce, "ce": ce}
    kd = float(divergence(softmax(student_logits / temperature), softmax(teacher_logits / temperature)).mean())
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def response_nll(model, tok, records) -> float:
    """Token-mean NLL (float64) of each record's first reference plus the appended EOS, given its prompt, from
    the model's own full logits; response tokens found from the tokenizer's offsets (those ending past the
    prompt)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for r in records:
        enc = tok(r.text, return_offsets_mapping=True)
        ids = enc["input_ids"] + [tok.eos_token_id]
        response = [i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(r.prompt)] + [len(ids) - 1]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        targets = torch.tensor(response)
        total += F.cross_entropy(logits[targets - 1], torch.tensor(ids)[targets], reduction="sum").item()
        count += len(response)
    return total / count
