"""Values of the method's losses against the float64 references of tests/reference.py: MTALoss per key layer
and granularity, over a batch, across tokenizers; the key-layer mapping of explicit --student-layers; the
chunked KD loss with a scaled, soft-capped student head, with and without gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mta_cli.losses import LogitHead, MTALoss, kd_loss, topk_kd_loss
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests import reference

TOL = dict(rtol=1e-9, atol=1e-12)

# Two samples on a 7-token grid (the second padded to 5). Word and phrase spans differ, so pooling the wrong
# granularity changes every value; the second sample's word spans include an empty one.
LENGTHS = [7, 5]
SPANS = [
    {"word": [[0, 1], [1, 2], [2, 4], [5, 6], [6, 7]], "phrase": [[0, 2], [2, 5], [5, 7]]},
    {"word": [[0, 1], [1, 3], [3, 3], [3, 5]], "phrase": [[0, 3], [3, 5]]},
]
KEY_LAYERS = [(1, 2, "word"), (2, 3, "phrase")]
D_S, D_T = 4, 5


def random_states(layers, dim, seed, width=7):
    g = np.random.default_rng(seed)
    return {layer: g.normal(size=(len(LENGTHS), width, dim)) for layer in layers}


def as_torch(states):
    return {k: torch.tensor(v) for k, v in states.items()}


def span_tensors(spans):
    return [{k: torch.tensor(v, dtype=torch.long).reshape(-1, 2) for k, v in s.items()} for s in spans]


def mask_of(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def mta_loss(key_layers_, **options) -> MTALoss:
    """An MTALoss in float64, its projectors drawn from a fixed seed."""
    torch.manual_seed(0)
    return MTALoss(key_layers_, D_S, D_T, **options).double()


def projector_arrays(loss: MTALoss):
    return [p.weight.detach().numpy() for p in loss.projectors] or None


STUDENT, TEACHER = random_states([1, 2], D_S, seed=1), random_states([2, 3], D_T, seed=2)


def assert_matches(out: dict, expected: dict) -> None:
    for key in ("dsa", "hid", "mta"):
        np.testing.assert_allclose(out[key].item(), expected[key], **TOL, err_msg=key)


def test_mta_loss_equals_the_reference_over_a_batch():
    """Word spans at the word layer, phrase spans above, pairs and Hid weighted by the teacher, the student's
    spans pooled with its own weights, the mean over layers and samples: all against the reference."""
    loss = mta_loss(KEY_LAYERS)
    out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(LENGTHS, 7), span_tensors(SPANS))
    expected = reference.mta(STUDENT, TEACHER, LENGTHS, SPANS, KEY_LAYERS, projector_arrays(loss))
    assert expected["dsa"] > 1e-3 and expected["hid"] > 1e-2
    assert_matches(out, expected)


@pytest.mark.parametrize("granularity", ["word", "phrase"])
def test_each_key_layer_pools_the_spans_of_its_granularity(granularity):
    """A key layer marked word (phrase) pools exactly the word (phrase) spans; the other granularity's
    value is far from it, so the comparison sees a swap."""
    layers = [(1, 2, granularity)]
    loss = mta_loss(layers)
    out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(LENGTHS, 7), span_tensors(SPANS))
    expected = reference.mta(STUDENT, TEACHER, LENGTHS, SPANS, layers, projector_arrays(loss))
    assert_matches(out, expected)
    other = {"word": "phrase", "phrase": "word"}[granularity]
    swapped = [{granularity: s[other], other: s[granularity]} for s in SPANS]
    wrong = reference.mta(STUDENT, TEACHER, LENGTHS, swapped, layers, projector_arrays(loss))
    assert abs(wrong["dsa"] - expected["dsa"]) > 1e-3 and abs(wrong["hid"] - expected["hid"]) > 1e-3


def test_hid_is_weighted_by_the_teacher_not_the_student():
    """method.md §5: token Hid uses the teacher's importance weights, even when the student pools its spans
    with its own (here the two sets of weights differ, and so would the value)."""
    loss = mta_loss(KEY_LAYERS)
    out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(LENGTHS, 7), span_tensors(SPANS))
    projectors = projector_arrays(loss)
    expected = 0.0
    with_student_weights = 0.0
    for i, (layer_s, layer_t, granularity) in enumerate(KEY_LAYERS):
        for b, n in enumerate(LENGTHS):
            h_s, h_t = STUDENT[layer_s][b, :n], TEACHER[layer_t][b, :n]
            covered = sorted({t for start, end in SPANS[b][granularity] for t in range(start, end)})
            expected += reference.hid_tokens(h_s, h_t, projectors[i], reference.importance_weights(h_t), covered)
            with_student_weights += reference.hid_tokens(h_s, h_t, projectors[i],
                                                         reference.importance_weights(h_s), covered)
    expected, with_student_weights = expected / 4, with_student_weights / 4
    np.testing.assert_allclose(out["hid"].item(), expected, **TOL)
    assert abs(with_student_weights - expected) > 1e-3


def test_mta_loss_is_the_mean_over_the_batch():
    """The batch value is the mean of the per-sample values (not their sum)."""
    loss = mta_loss(KEY_LAYERS)
    batch = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(LENGTHS, 7), span_tensors(SPANS))
    alone = []
    for b, n in enumerate(LENGTHS):
        one = lambda states: {k: torch.tensor(v[b:b + 1, :n]) for k, v in states.items()}  # noqa: E731
        alone.append(loss(one(STUDENT), one(TEACHER), torch.ones(1, n, dtype=torch.bool), span_tensors(SPANS[b:b + 1])))
    for key in ("dsa", "hid", "mta"):
        np.testing.assert_allclose(batch[key].item(), (alone[0][key].item() + alone[1][key].item()) / 2, **TOL)


@pytest.mark.parametrize("pooling", ["student", "teacher"])
def test_dsa_only_and_pooling_options_against_the_reference(pooling):
    """Without Hid (no projectors) and with either pooling option, DSA still equals the reference."""
    loss = mta_loss(KEY_LAYERS, use_hid=False, student_pooling=pooling)
    out = loss(as_torch(STUDENT), as_torch(TEACHER), mask_of(LENGTHS, 7), span_tensors(SPANS))
    expected = reference.mta(STUDENT, TEACHER, LENGTHS, SPANS, KEY_LAYERS, None, pooling=pooling)
    np.testing.assert_allclose(out["dsa"].item(), expected["dsa"], **TOL)
    assert out["hid"].item() == 0.0
    np.testing.assert_allclose(out["mta"].item(), 2.0 * expected["dsa"], **TOL)


# The student of another tokenizer: its own 8-token grid, the same spans in the same order. Span 2 of the
# first sample has no student token (an empty range) while the teacher has two: only the student's coverage
# keeps it out of the pair and Hid weights.
CROSS_LENGTHS = [8, 6]
CROSS_SPANS = [
    {"word": [[0, 2], [2, 3], [4, 4], [5, 8]], "phrase": [[0, 3], [4, 8]]},
    {"word": [[0, 1], [1, 3], [3, 6]], "phrase": [[0, 3], [3, 6]]},
]
TEACHER_LENGTHS = [7, 5]
TEACHER_SPANS = [
    {"word": [[0, 1], [1, 2], [2, 4], [5, 7]], "phrase": [[0, 2], [2, 7]]},
    {"word": [[0, 1], [1, 2], [2, 5]], "phrase": [[0, 2], [2, 5]]},
]


def test_cross_tokenizer_mta_equals_the_reference_with_coverage_masking():
    """Other tokenizer: spans pooled on each model's own grid, span weights masked by the student's
    coverage and renormalised, Hid on span representations; without the mask the value differs."""
    student = random_states([1, 2], D_S, seed=3, width=8)
    loss = mta_loss(KEY_LAYERS)
    out = loss(as_torch(student), as_torch(TEACHER), mask_of(CROSS_LENGTHS, 8), span_tensors(CROSS_SPANS),
               mask_of(TEACHER_LENGTHS, 7), span_tensors(TEACHER_SPANS))
    expected = reference.mta(student, TEACHER, CROSS_LENGTHS, CROSS_SPANS, KEY_LAYERS, projector_arrays(loss),
                             teacher_lengths=TEACHER_LENGTHS, teacher_spans=TEACHER_SPANS)
    assert_matches(out, expected)

    h_s, h_t = student[1][0, :8], TEACHER[2][0, :7]
    u_t, omega = reference.pool(h_t, reference.importance_weights(h_t), TEACHER_SPANS[0]["word"])
    u_s, omega_s = reference.pool(h_s, reference.importance_weights(h_s), CROSS_SPANS[0]["word"])
    assert omega[2] > 0.05 and omega_s[2] == 0  # the teacher weighs the span the student lacks
    unmasked = reference.dsa(u_s, u_t, omega)
    masked = omega * (omega_s > 0) / (omega * (omega_s > 0)).sum()
    assert abs(unmasked - reference.dsa(u_s, u_t, masked)) > 1e-3


# --- key layers -------------------------------------------------------------------------------------------


def test_explicit_student_layers_map_to_the_floor_of_the_relative_depth(tiny_fp32_cache, tmp_path):
    """method.md §6: l_T = floor(l_S · N_T / N_S). A 3-layer student of the 4-layer teacher given
    --student-layers 3,2: 2 · 4/3 = 2.67 -> 2 (ceil would give 3) and 3 · 4/3 = 4. `mta train` announces and
    saves the schedule [(2, 2, word), (3, 4, phrase)]."""
    events = []
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), cache=tiny_fp32_cache, init_from_teacher=True, keep_layers=3, student_layers=[3, 2],
                      objective=ObjectiveConfig(loss="sft", mta=True), batch_size=8, max_steps=1, checkpoint_every=0,
                      device="cpu"), progress=lambda event, info: events.append((event, info)) if event != "status" else None)
    assert events[0][0] == "start" and events[0][1]["key_layers"] == [(2, 2, "word"), (3, 4, "phrase")]
    saved = json.loads((run / "training_config.json").read_text())
    assert saved["objective"]["key_layers"] == [[2, 2, "word"], [3, 4, "phrase"]]


# --- the chunked KD loss ----------------------------------------------------------------------------------

ALPHA, TEMPERATURE = 0.3, 2.0


def make_kd_problem(n: int, seed: int = 0):
    """fp64 states and heads; the student head has a bias, a scale and a soft-cap that binds."""
    g = torch.Generator().manual_seed(seed)
    vocab, d_s, d_t = 9, 5, 6
    student_hidden = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    student = dict(weight=torch.randn(vocab, d_s, generator=g, dtype=torch.float64),
                   bias=torch.randn(vocab, generator=g, dtype=torch.float64), scale=1.7, softcap=2.5)
    teacher_hidden = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    teacher = dict(weight=torch.randn(vocab, d_t, generator=g, dtype=torch.float64),
                   bias=torch.randn(vocab, generator=g, dtype=torch.float64), scale=0.8, softcap=3.0)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return student_hidden, student, teacher_hidden, teacher, labels


def hand_logits(h, weight, bias, scale, softcap):
    return softcap * torch.tanh(scale * (h @ weight.T + bias) / softcap)


def hand_fkl_loss(student_hidden, student, teacher_hidden, teacher, labels):
    """(1 - α) CE + α KL(p_T || p_S) at temperature τ (no τ²), means over positions, written out."""
    z_s, z_t = hand_logits(student_hidden, **student), hand_logits(teacher_hidden, **teacher)
    ce = -torch.log_softmax(z_s, -1)[torch.arange(len(labels)), labels].mean()
    log_p_t = torch.log_softmax(z_t / TEMPERATURE, -1)
    log_p_s = torch.log_softmax(z_s / TEMPERATURE, -1)
    kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return {"loss": (1 - ALPHA) * ce + ALPHA * kd, "ce": ce, "kd": kd}


def head(parts: dict) -> LogitHead:
    return LogitHead(parts["weight"], parts["bias"], parts["scale"], parts["softcap"])


def test_fused_chunks_keep_the_student_heads_scale_and_softcap():
    """Gradients on (the fused path): value and gradients of hidden states, head weight and bias equal the
    hand formula, for a head whose scale and soft-cap change the loss."""
    student_hidden, student, teacher_hidden, teacher, labels = make_kd_problem(7)
    leaves = [student_hidden.requires_grad_(), student["weight"].requires_grad_(), student["bias"].requires_grad_()]
    out = kd_loss(student_hidden, head(student), teacher_hidden, head(teacher), labels, "fkl", ALPHA, TEMPERATURE,
                  chunk_size=3)
    grads = torch.autograd.grad(out["loss"], leaves)
    expected = hand_fkl_loss(student_hidden, student, teacher_hidden, teacher, labels)
    expected_grads = torch.autograd.grad(expected["loss"], leaves)
    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(out[key], expected[key].detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain = hand_fkl_loss(student_hidden, student | {"scale": 1.0, "softcap": 1e9}, teacher_hidden, teacher, labels)
    assert abs(plain["loss"].item() - expected["loss"].item()) > 1e-2  # scale and cap matter here


@pytest.mark.parametrize("n,chunk_size", [(7, 3), (7, 2), (6, 3), (5, 1)])
def test_kd_loss_without_gradients_covers_every_position(n, chunk_size):
    """Gradients off (evaluation, diagnostics): the plain chunk loop gives the hand value for every N and
    chunk size, the uneven last chunk included; so does a call with grad mode on but nothing to train."""
    student_hidden, student, teacher_hidden, teacher, labels = make_kd_problem(n, seed=n)
    expected = hand_fkl_loss(student_hidden, student, teacher_hidden, teacher, labels)
    with torch.no_grad():
        off = kd_loss(student_hidden, head(student), teacher_hidden, head(teacher), labels, "fkl", ALPHA,
                      TEMPERATURE, chunk_size=chunk_size)
    frozen = kd_loss(student_hidden, head(student), teacher_hidden, head(teacher), labels, "fkl", ALPHA,
                     TEMPERATURE, chunk_size=chunk_size)
    for out in (off, frozen):
        assert not out["loss"].requires_grad
        for key in ("loss", "ce", "kd"):
            torch.testing.assert_close(out[key], expected[key], rtol=1e-12, atol=1e-12)


def test_topk_kd_loss_without_gradients_covers_every_position():
    """The top-k variant shares the chunk loop: with every token kept it is the exact fkl loss, no grad."""
    student_hidden, student, teacher_hidden, teacher, labels = make_kd_problem(7, seed=1)
    expected = hand_fkl_loss(student_hidden, student, teacher_hidden, teacher, labels)
    log_p_t = torch.log_softmax(hand_logits(teacher_hidden, **teacher) / TEMPERATURE, -1)
    ids = torch.arange(log_p_t.shape[1]).expand_as(log_p_t)
    with torch.no_grad():
        out = topk_kd_loss(student_hidden, head(student), ids, log_p_t, torch.zeros(7, dtype=torch.float64),
                           labels, "fkl", ALPHA, TEMPERATURE, chunk_size=3)
    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=1e-12)
