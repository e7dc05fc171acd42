"""FDD: the final norm a cache stores for the logit lens, and the loss (value and gradient) against a direct
computation with full logits of both models at every paired layer, offline from an fp32 cache equal to online."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from mta_cli.cache.reader import CacheReader
from mta_cli.losses.fdd import fdd_loss
from mta_cli.losses.kd import LogitHead
from mta_cli.losses.lens import final_norm, final_norm_module
from mta_cli.student import prune_layers
from mta_cli.teacher import output_head
from mta_cli.training.batches import collate
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.source import Source
from mta_cli.training.trainer import TrainConfig
from tests import tiny
from tests.test_cache import cli  # noqa: F401
from tests.test_online_offline import (CPU, INDICES, data_file, losses_and_grads, online, online_batch,  # noqa: F401
                                       readers, segmenter, teacher, tokenizer)


def gemma2(tok):
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.model.norm.weight.normal_()
    return model.eval()


@pytest.mark.parametrize("make, kind", [(tiny.tiny_llama, "rms"), (tiny.tiny_gpt2, "layer"), (gemma2, "rms_offset")])
def test_the_final_norm_is_recognised_and_reproduces_the_module(make, kind, bl_tok):
    model = make(bl_tok)
    with torch.no_grad():
        for p in final_norm_module(model).parameters():
            p.uniform_(0.5, 1.5)
    norm = final_norm(model)
    assert norm is not None and norm.kind == kind
    h = torch.randn(5, 7, norm.weight.shape[0]) * 4
    with torch.no_grad():
        torch.testing.assert_close(norm(h), final_norm_module(model)(h), rtol=0, atol=0)


def test_the_cache_stores_the_final_norm_bit_for_bit(readers, teacher):
    stored = readers["fp32"].final_norm
    module = final_norm_module(teacher)
    assert stored.kind == "rms" and stored.eps == module.variance_epsilon
    assert torch.equal(stored.weight, module.weight.detach())
    h = torch.randn(3, 48)
    assert torch.equal(stored(h), module(h).detach())
    bf16 = readers["bf16"].final_norm
    assert torch.equal(bf16.weight, module.weight.detach().to(torch.bfloat16).float())


# --- the loss against full logits ------------------------------------------------------------------------------


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) per row, written out."""
    p = torch.softmax(p_logits, -1)
    return (p * (torch.log_softmax(p_logits, -1) - torch.log_softmax(q_logits, -1))).sum(-1)


def direct_fdd(student, teacher, ids, targets, labels, pairs, alpha, w_feat, w_delta):
    """FDD written directly from the models: full logit-lens logits of both at every pair, their own norms."""
    out_s = student(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(input_ids=ids, output_hidden_states=True)
    n_s, n_t = len(out_s.hidden_states) - 1, len(out_t.hidden_states) - 1

    def lens(model, states, layer, last):
        h = states[layer] if layer == last else model.model.norm(states[layer])
        return model.lm_head(h)[targets]

    zs = [lens(student, out_s.hidden_states, s, n_s) for s, _ in pairs]
    with torch.no_grad():
        zt = [lens(teacher, out_t.hidden_states, t, n_t) for _, t in pairs]
    ce = torch.nn.functional.cross_entropy(zs[-1], labels)
    kd = kl_rows(zt[-1], zs[-1]).mean()
    k = len(pairs) - 1
    traj = sum(kl_rows(t, s).mean() for s, t in zip(zs[:-1], zt[:-1])) / k
    delta = sum(kl_rows(tb - ta, sb - sa).mean() for sa, sb, ta, tb in zip(zs[:-1], zs[1:], zt[:-1], zt[1:])) / k
    return (1 - alpha) * ce + alpha * kd + w_feat * traj + w_delta * delta, {"ce": ce, "kd": kd, "fdd_traj": traj,
                                                                              "fdd_delta": delta}


def test_fdd_value_and_gradient_equal_the_direct_computation(bl_tok):
    teacher = tiny.tiny_llama(bl_tok, n_layers=4, seed=1).double()
    student = tiny.tiny_llama(bl_tok, n_layers=2, hidden=32, seed=2).double().train()
    with torch.no_grad():
        student.model.norm.weight.uniform_(0.5, 1.5)
        teacher.model.norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(bl_tok), (2, 9), generator=g)
    targets = torch.zeros(2, 9, dtype=torch.bool)
    targets[:, 3:8] = True
    labels = ids[:, 1:][targets[:, :-1]]
    pairs = [(1, 2), (2, 4)]
    alpha, w_feat, w_delta = 0.3, 0.7, 1.3

    expected, parts = direct_fdd(student, teacher, ids, targets, labels, pairs, alpha, w_feat, w_delta)
    expected.backward()
    direct_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    out_s = student(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(input_ids=ids, output_hidden_states=True)
    norm_s, norm_t = final_norm_module(student), final_norm(teacher)
    s_states = [norm_s(out_s.hidden_states[1])[targets], out_s.hidden_states[2][targets]]
    t_states = [norm_t(out_t.hidden_states[2])[targets], out_t.hidden_states[4][targets]]
    for chunk in (3, 1024):  # several chunks (K = 2 layers share each) and one
        student.zero_grad()
        got = fdd_loss(s_states, output_head(student, detach=False), t_states, output_head(teacher), labels, alpha,
                       1.0, w_feat, w_delta, "fkl", chunk_size=chunk)
        got["loss"].backward(retain_graph=True)
        assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-10)
        for key, value in parts.items():
            assert got[key].item() == pytest.approx(value.item(), rel=1e-10), key
        for name, grad in direct_grads.items():
            torch.testing.assert_close(dict(student.named_parameters())[name].grad, grad, rtol=1e-10, atol=1e-12,
                                       msg=name)


def test_fdd_without_gradients_equals_with(bl_tok):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(7, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(7, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    head_s, head_t = LogitHead(torch.randn(11, 8, generator=g, dtype=torch.float64)), \
        LogitHead(torch.randn(11, 6, generator=g, dtype=torch.float64))
    labels = torch.randint(0, 11, (7,), generator=g)
    with torch.no_grad():
        plain = fdd_loss(s, head_s, t, head_t, labels, 0.5, 2.0, chunk_size=2)
    fused = fdd_loss([x.requires_grad_() for x in s], head_s, t, head_t, labels, 0.5, 2.0, chunk_size=5)
    for key in plain:
        assert plain[key].item() == pytest.approx(fused[key].item(), rel=1e-12), key


# --- offline == online, and through mta train ----------------------------------------------------------------


def test_fdd_offline_from_fp32_cache_is_bitwise_online(readers, teacher, online, segmenter, data_file, tmp_path):
    student = prune_layers(copy.deepcopy(teacher), 2).train()
    reader = readers["fp32"]
    offline = collate([reader[i] for i in INDICES], online.pad_id)
    live = online_batch(teacher, online, segmenter, INDICES)
    out = str(tmp_path)
    cached = Source(TrainConfig(out=out, cache=reader.url), CPU)
    running = Source(TrainConfig(out=out, teacher=reader.meta["teacher"]["path"], data=str(data_file)), CPU)

    def objective(source):
        config = ObjectiveConfig(loss="fdd", key_layers=[(1, 2, "word"), (2, 4, "phrase")])
        return Objective(config, source.head, 4, 48, 48, source.final_norm)

    off, off_grads = losses_and_grads(student, objective(cached), offline)
    on, on_grads = losses_and_grads(student, objective(running), live)
    assert sorted(off) == ["ce", "fdd_delta", "fdd_traj", "kd", "loss"]
    for key in off:
        assert torch.equal(off[key], on[key]), key
    for name in off_grads:
        assert torch.equal(off_grads[name], on_grads[name]), name
    assert off["fdd_traj"] > 0 and off["fdd_delta"] > 0


def test_mta_train_with_fdd_and_mta(readers, tmp_path):
    result = cli("train", "--cache", readers["fp32"].url, "--out", tmp_path / "run", "--init-from-teacher",
                 "--keep-layers", 2, "--loss", "fdd", "--mta", "--max-steps", 2, "--batch-size", 4, "--device", "cpu",
                 "--fdd-delta-weight", "0.5", "--json")
    assert result.exit_code == 0, result.stderr
    import json

    final = json.loads(result.stdout)["final"]
    assert {"fdd_traj", "fdd_delta", "dsa", "hid", "kd", "ce"} <= set(final)
    assert np.isfinite(final["loss"]) and final["fdd_delta"] > 0
    refused = cli("train", "--cache", readers["fp32"].url, "--out", tmp_path / "r2", "--init-from-teacher",
                  "--keep-layers", 2, "--loss", "fdd", "--topk", "--device", "cpu")
    assert refused.exit_code == 1 and "cannot train from top-k" in refused.stderr


def test_a_cache_without_a_reproducible_norm_refuses_fdd(readers, monkeypatch, tmp_path):
    reader = CacheReader(readers["fp32"].url)
    monkeypatch.setitem(reader.meta["teacher"]["head"], "norm", None)
    assert reader.final_norm is None
    with pytest.raises(ValueError, match="norm has a form mta cannot reproduce"):
        Objective(ObjectiveConfig(loss="fdd", key_layers=[(1, 2, "word")]), reader.head, 4, 48, 48, reader.final_norm)
