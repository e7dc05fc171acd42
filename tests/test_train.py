"""`mta train` on tiny models (CPU, no download): objective values by hand, DSA sanity, exact resume,
run outputs, depth pruning, key-layer errors and the CLI.

The cache here is fp32 extracted one sample per batch (layers 2, 3, 4 of a 4-layer Llama teacher), so
its states are bitwise those of a direct single-sample forward of the teacher.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.cli import app
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.losses import LogitHead
from mta_cli.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from mta_cli.student import build_student, evenly_spaced, prune_layers
from mta_cli.training import trainer
from mta_cli.training.batches import collate
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.source import key_layers
from mta_cli.training.trainer import TrainConfig, train
from tests import tiny

RECORDS = tiny.RECORDS
CACHE_LAYERS = [2, 3, 4]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def run_cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tiny_fp32_cache) -> str:
    return tiny_fp32_cache


@pytest.fixture(scope="module")
def reader(cache) -> CacheReader:
    return CacheReader(cache)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_causal_lm(str(tiny_teacher_dir), "fp32", "cpu")


@pytest.fixture(scope="module")
def cache_head(reader) -> LogitHead:
    return reader.head


def config(out, cache, loss="srkl", mta=True, **options) -> TrainConfig:
    options = {"init_from_teacher": True, "keep_layers": 2, "batch_size": 2, "seed": 0, "device": "cpu"} | options
    return TrainConfig(out=str(out), cache=cache, objective=ObjectiveConfig(loss=loss, mta=mta), **options)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def stop_at(step: int, events: list | None = None):
    """A progress callback that interrupts training when step `step` is reported (as Ctrl-C would)."""
    def progress(event: str, info: dict) -> None:
        if events is not None and event != "status":
            events.append((event, dict(info)))
        if event == "step" and info["step"] == step:
            raise KeyboardInterrupt
    return progress


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


# --- 2. the objective by hand ---------------------------------------------------------------------------------


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("loss,alpha,temperature", [("fkl", 1.0, 1.0), ("fkl", 0.3, 2.0), ("srkl", 0.5, 1.0)])
def test_objective_equals_hand_computed_value(loss, alpha, temperature, reader, teacher, cache_head):
    """KD loss from the cache (last state + stored head, chunked) == by hand from both models' full logits."""
    student = prune_layers(copy.deepcopy(teacher), 2).train()
    with torch.no_grad():
        student.lm_head.weight.mul_(8.0)  # a peaked student: fkl, rkl and srkl differ clearly
    indices = [0, 3, 4]
    pad = reader.meta["tokenizer"]["pad_token_id"]
    batch = collate([reader[i] for i in indices], pad)
    objective = Objective(ObjectiveConfig(loss=loss, kd_alpha=alpha, temperature=temperature, chunk_size=7),
                          cache_head, 4, 48, 48)
    losses = objective(student, batch)

    with torch.no_grad():
        student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ce, kd = [], []
        for row, i in enumerate(indices):
            sample = reader[i]
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))
            n, start = len(ids), sample.n_prompt_tokens - 1  # position t predicts token t + 1
            teacher_logits = teacher(ids[None]).logits[0, start:n - 1]
            logits = student_logits[row, start:n - 1]
            targets = ids[start + 1:n]
            ce.append(-logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0])
            log_t = (teacher_logits / temperature).log_softmax(-1)
            log_s = (logits / temperature).log_softmax(-1)
            if loss == "fkl":
                kd.append(kl(log_t, log_s))
            else:  # KL(p_S || 0.1 p_S + 0.9 p_T)
                kd.append(kl(log_s, torch.log(0.1 * log_s.exp() + 0.9 * log_t.exp())))
        ce, kd = torch.cat(ce).mean(), torch.cat(kd).mean()
    n_targets = int((batch.labels != -100).sum())
    assert n_targets == sum(reader[i].n_tokens - reader[i].n_prompt_tokens for i in indices) > 20
    assert kd > 0.05  # far from 0: the comparison below is not between two tiny numbers
    torch.testing.assert_close(losses["ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["kd"], kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], (1 - alpha) * ce + alpha * kd, rtol=1e-5, atol=1e-6)


# --- 3. DSA sanity ------------------------------------------------------------------------------------------------


def test_dsa_is_zero_when_the_student_is_the_teacher(reader, teacher, cache_head):
    pad = reader.meta["tokenizer"]["pad_token_id"]
    batch = collate([reader[i] for i in (0, 2, 5)], pad)
    schedule, _ = key_layers([2, 3, 4], [2, 3, 4], 1, 4, 4, reader.layers, cached=True)
    assert schedule == [(2, 2, "word"), (3, 3, "phrase"), (4, 4, "phrase")]
    same = copy.deepcopy(teacher).train()
    objective = Objective(ObjectiveConfig(loss="fkl", mta=True, key_layers=schedule), cache_head, 4, 48, 48)
    losses = objective(same, batch)
    assert losses["dsa"].abs() < 1e-9
    assert losses["kd"].abs() < 1e-7  # same model, same distribution
    assert losses["hid"] > 0.1  # the projectors are random: Hid is not trivially zero
    pruned = prune_layers(copy.deepcopy(teacher), 2).train()
    objective = Objective(ObjectiveConfig(loss="fkl", mta=True, key_layers=[(1, 2, "word"), (2, 4, "phrase")]),
                          cache_head, 4, 48, 48)
    assert objective(pruned, batch)["dsa"] > 1e-3  # a different student is not aligned


def test_dsa_zero_through_the_trainer(cache, tmp_path):
    run = tmp_path / "same"
    summary = train(config(run, cache, loss="fkl", keep_layers=4, student_layers=[2, 3, 4],
                           teacher_layers=[2, 3, 4], batch_size=8, max_steps=1))
    first = metrics(run)[0]
    assert summary.steps == 1 and first["dsa"] < 1e-9 and first["kd"] < 1e-7 and first["hid"] > 0.1
    saved = json.loads((run / "training_config.json").read_text())
    assert saved["objective"]["key_layers"] == [[2, 2, "word"], [3, 3, "phrase"], [4, 4, "phrase"]]


@pytest.fixture(scope="module")
def small_config(tmp_path_factory, bl_tok) -> Path:
    """A random-init Llama student of hidden size 32 (the teacher has 48), 2 layers."""
    path = tmp_path_factory.mktemp("student-config") / "student.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": len(bl_tok), "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "max_position_embeddings": 256,
                                "pad_token_id": bl_tok.pad_token_id, "eos_token_id": bl_tok.eos_token_id}))
    return path


def test_dsa_with_a_student_of_another_hidden_size(reader, cache_head, small_config):
    student = build_student(student_config=str(small_config), seed=0)
    assert student.config.hidden_size == 32 and student.training
    schedule, _ = key_layers(None, None, 1, 2, 4, reader.layers, cached=False)
    assert schedule == [(1, 2, "word"), (2, 4, "phrase")]
    objective = Objective(ObjectiveConfig(loss="srkl", mta=True, key_layers=schedule), cache_head, 4, 32, 48)
    assert [tuple(p.weight.shape) for p in objective.mta.projectors] == [(48, 32), (48, 32)]
    batch = collate([reader[i] for i in (1, 6)], reader.meta["tokenizer"]["pad_token_id"])
    losses = objective(student, batch)
    assert torch.isfinite(losses["dsa"]) and losses["dsa"] > 1e-4
    losses["dsa"].backward(retain_graph=True)
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert grads["model.embed_tokens.weight"].abs().sum() > 0
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["lm_head.weight"] is None  # DSA reaches the key layers' states, not the head
    assert all(p.grad is None for p in objective.parameters())  # DSA has no parameters of its own
    losses["hid"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())


def test_train_a_student_of_another_hidden_size(cache, small_config, tmp_path):
    run = tmp_path / "small"
    summary = train(config(run, cache, init_from_teacher=False, keep_layers=None, student_config=str(small_config),
                           max_steps=2, lr=1e-3))
    assert summary.steps == 2
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "dsa", "hid")) and all(r["dsa"] > 0 for r in rows)
    saved = AutoModelForCausalLM.from_pretrained(run)
    assert saved.config.hidden_size == 32
    initial = build_student(student_config=str(small_config), seed=0)
    assert not torch.equal(saved.model.embed_tokens.weight, initial.model.embed_tokens.weight)  # it trained


# --- 4. stop and resume ---------------------------------------------------------------------------------------


def resume_scenario(base: Path, make, stop: int, check_negative: bool = False) -> dict:
    """Run uninterrupted; run again, interrupted when step `stop` is reported, then --resume."""
    captured = []

    def capture(*args, **kwargs):
        captured.append(build_student(*args, **kwargs))
        return captured[-1]

    events: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_student", capture)
        full = train(make(base / "full"), progress=lambda event, info: events.append((event, dict(info)))
                     if event != "status" else None)
    interrupted_events: list = []
    with pytest.raises(KeyboardInterrupt):
        train(make(base / "cut"), progress=stop_at(stop, interrupted_events))
    after_cut = {"checkpoints": sorted(p.name for p in (base / "cut" / "checkpoints").iterdir()),
                 "metrics": metrics(base / "cut"), "final_saved": (base / "cut" / "model.safetensors").exists()}
    if check_negative:  # the same resume without restoring the RNG state
        shutil.copytree(base / "cut", base / "cut-no-rng")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "set_rng_state", lambda state: None)
            train(make(base / "cut-no-rng", resume=True))
    resumed = train(make(base / "cut", resume=True))
    return {"full": full, "resumed": resumed, "events": events, "interrupted_events": interrupted_events,
            "after_cut": after_cut, "student": captured[0], "base": base}


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, cache) -> dict:
    """Pruned-teacher student, srkl + MTA (projectors), grad_accum 2: 4 micro-batches per epoch, 2 steps."""
    def make(out, **options):
        return config(out, cache, max_steps=5, checkpoint_every=3, grad_accum=2, **options)
    return resume_scenario(tmp_path_factory.mktemp("llama-runs"), make, stop=4)


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory, cache, bl_tok) -> dict:
    """A GPT-2 student (dropout 0.1: the RNG state must be restored), fkl + MTA (3 key layers), 4 steps per epoch."""
    base = tmp_path_factory.mktemp("gpt2-runs")
    student_dir = tiny.save_tiny_model(base / "gpt2", bl_tok, tiny.tiny_gpt2(bl_tok))

    def make(out, **options):
        return TrainConfig(out=str(out), cache=cache, student=str(student_dir),
                           objective=ObjectiveConfig(loss="fkl", mta=True), batch_size=2, max_steps=4,
                           checkpoint_every=2, seed=0, device="cpu", **options)
    return resume_scenario(base, make, stop=3, check_negative=True)


def test_interrupt_leaves_the_last_checkpoint(llama_runs):
    after = llama_runs["after_cut"]
    assert after["checkpoints"] == ["step-000003"] and not after["final_saved"]
    assert [m["step"] for m in after["metrics"]] == [1, 2, 3, 4]  # step 4 was reported, then interrupted
    start, *steps = llama_runs["events"]
    assert start[0] == "start" and start[1]["total_steps"] == 5 and start[1]["step"] == 0
    # the cache holds teacher layers 2, 3, 4: the 2-layer student gets 3 and 4, at its own relative depths
    assert start[1]["key_layers"] == [(1, 3, "word"), (2, 4, "phrase")]
    assert [(e, i["step"]) for e, i in steps] == [("step", s) for s in range(1, 6)]


@pytest.mark.parametrize("runs,steps,resumed_at,projectors", [("llama_runs", 5, 3, 2), ("gpt2_runs", 4, 2, 3)])
def test_resume_reproduces_the_uninterrupted_run(runs, steps, resumed_at, projectors, request):
    r = request.getfixturevalue(runs)
    full, cut = r["base"] / "full", r["base"] / "cut"
    assert r["full"].resumed_from is None
    assert r["resumed"].resumed_from == str(cut / "checkpoints" / f"step-{resumed_at:06d}")
    assert r["full"].steps == r["resumed"].steps == steps
    assert_same_tensors(load_file(full / "model.safetensors"), load_file(cut / "model.safetensors"), "final student")
    last = f"step-{r['full'].steps:06d}"
    for name in ("model", "objective", "optimizer", "rng"):  # the final checkpoints: projectors and Adam moments
        assert_same_tensors(load_file(full / "checkpoints" / last / f"{name}.safetensors"),
                            load_file(cut / "checkpoints" / last / f"{name}.safetensors"), f"{last}/{name}")
    assert len(load_file(full / "checkpoints" / last / "objective.safetensors")) == projectors
    # every step logged once, with the uninterrupted run's numbers (timings aside)
    timing = {"step_seconds", "tokens_per_second"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(full))
    assert [m["step"] for m in metrics(cut)] == list(range(1, r["full"].steps + 1))


def test_gpt2_resume_needs_the_rng_state(gpt2_runs):
    """The negative control: dropout masks differ when the RNG state is not restored."""
    assert gpt2_runs["student"].config.resid_pdrop > 0 and gpt2_runs["student"].training
    base = gpt2_runs["base"]
    full, other = load_file(base / "full" / "model.safetensors"), load_file(base / "cut-no-rng" / "model.safetensors")
    assert any(not torch.equal(full[k], other[k]) for k in full)


def test_resuming_a_finished_run_is_a_no_op(llama_runs, cache):
    cut = llama_runs["base"] / "cut"
    before = load_file(cut / "model.safetensors")
    summary = train(config(cut, cache, max_steps=5, checkpoint_every=3, grad_accum=2, resume=True))
    assert summary.steps == 5 and summary.resumed_from.endswith("step-000005")
    assert_same_tensors(before, load_file(cut / "model.safetensors"), "re-saved student")
    assert [m["step"] for m in metrics(cut)] == [1, 2, 3, 4, 5]


def test_accumulated_step_metrics_average_the_micro_batches(cache, tmp_path):
    """With lr 0 the weights stay put: a grad_accum=2 step logs the mean of two grad_accum=1 steps."""
    frozen = {"lr": 0.0, "projector_lr": 0.0}
    train(config(tmp_path / "one", cache, max_steps=4, **frozen))
    train(config(tmp_path / "two", cache, max_steps=2, grad_accum=2, **frozen))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]
    for k, row in enumerate(two):
        pair = one[2 * k:2 * k + 2]
        assert pair[0]["loss"] != pair[1]["loss"]  # two different batches
        assert row["tokens"] == pair[0]["tokens"] + pair[1]["tokens"]
        for key in ("loss", "ce", "kd", "dsa", "hid"):
            assert row[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, rel=1e-6), key


def test_epochs_with_accumulation_reach_the_announced_total(cache, tmp_path):
    """8 samples in batches of 3 are 3 micro-batches per epoch: 2 epochs, grad_accum 2 = 3 whole steps."""
    events: list = []
    run = tmp_path / "epochs"
    summary = train(config(run, cache, mta=False, loss="fkl", batch_size=3, grad_accum=2, epochs=2),
                    progress=lambda event, info: events.append((event, dict(info))) if event != "status" else None)
    assert events[0][1]["total_steps"] == summary.steps == 3
    assert events[0][1]["batches_per_epoch"] == 3
    assert [r["epoch"] for r in metrics(run)] == [0, 1, 1]  # step 2 takes one micro-batch from each epoch
    assert [r["lr"] for r in metrics(run)][-1] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]  # the final one
    again = train(config(run, cache, mta=False, loss="fkl", batch_size=3, grad_accum=2, epochs=2, resume=True))
    assert again.steps == 3 and again.resumed_from == str(run / "checkpoints" / "step-000003")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


# --- 6. outputs ------------------------------------------------------------------------------------------------


def test_run_folder_outputs(llama_runs, tiny_teacher_dir):
    run = llama_runs["base"] / "full"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert {"loss", "ce", "kd", "dsa", "hid", "lr", "tokens_per_second", "epoch", "tokens"} <= set(row)
        assert all(np.isfinite(row[k]) for k in ("loss", "ce", "kd", "dsa", "hid", "lr"))
        assert row["tokens"] > 0 and row["tokens_per_second"] > 0 and 0 <= row["lr"] <= 1e-4
        # the logged total is the logged parts put together (srkl, α = 0.5, λ_dsa = 2, λ_hid = 0.2)
        total = 0.5 * row["ce"] + 0.5 * row["kd"] + 2.0 * row["dsa"] + 0.2 * row["hid"]
        assert row["loss"] == pytest.approx(total, rel=1e-5)
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]  # 4 batches of 2 per epoch, 2 batches per step
    # the rate each step used: no warmup (int(0.05 * 5) = 0), cosine from 1e-4 over 5 steps
    expected = [1e-4 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert llama_runs["full"].final == rows[-1]

    saved = json.loads((run / "training_config.json").read_text())
    assert saved["tool"].startswith("mta-cli ") and saved["cache"] and saved["keep_layers"] == 2
    assert saved["objective"]["loss"] == "srkl" and saved["objective"]["mta"] is True
    assert saved["grad_accum"] == 2 and saved["max_steps"] == 5

    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.config.num_hidden_layers == 2 and model.config.mta_training["objective"]["loss"] == "srkl"
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer(str(tiny_teacher_dir)))
    ids = tokenizer("The quick brown fox jumps.", return_tensors="pt")["input_ids"]
    in_memory = llama_runs["student"].eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, in_memory(ids).logits)
    teacher = load_causal_lm(str(tiny_teacher_dir))
    assert not torch.equal(model.lm_head.weight, teacher.lm_head.weight)  # it was trained

    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000003", "step-000005"]
    for folder in checkpoints:
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "objective.safetensors",
                                                            "optimizer.safetensors", "rng.safetensors", "state.json"]
        state = json.loads((folder / "state.json").read_text())
        assert state["progress"]["step"] == int(folder.name[-6:])
    found = [p for p in run.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert found == []
    assert {p.suffix for p in run.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".jsonl", ".jinja"}


# --- 6. pruning ----------------------------------------------------------------------------------------------


def test_evenly_spaced_layers():
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced(6, 1) == [5]
    for bad in (0, 7):
        with pytest.raises(ValueError, match="between 1 and the teacher's 6 layers"):
            evenly_spaced(6, bad)


@pytest.mark.parametrize("n,keep", [(4, 2), (30, 8)])
def test_prune_layers_keeps_evenly_spaced_blocks(n, keep, bl_tok):
    teacher = tiny.tiny_llama(bl_tok, n_layers=n, hidden=32)
    blocks = list(teacher.model.layers)
    ids = torch.tensor([bl_tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        teacher_hidden = teacher(ids, output_hidden_states=True).hidden_states
    pruned = prune_layers(copy.deepcopy(teacher), keep)
    chosen = evenly_spaced(n, keep)
    assert chosen[0] == 0 and chosen[-1] == n - 1 and len(chosen) == keep
    assert pruned.config.num_hidden_layers == keep and len(pruned.model.layers) == keep
    for new, old in enumerate(chosen):
        assert torch.equal(pruned.model.layers[new].mlp.up_proj.weight, blocks[old].mlp.up_proj.weight)
        assert pruned.model.layers[new].self_attn.layer_idx == new
    with torch.no_grad():
        out = pruned(ids, output_hidden_states=True)
    assert len(out.hidden_states) == keep + 1 and out.logits.shape == (1, ids.shape[1], len(bl_tok))
    assert torch.equal(out.hidden_states[0], teacher_hidden[0])
    torch.testing.assert_close(out.hidden_states[1], teacher_hidden[1], rtol=0, atol=1e-6)  # block 0 is kept
    greedy = pruned.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=bl_tok.pad_token_id)
    no_cache = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False,
                               pad_token_id=bl_tok.pad_token_id)
    assert greedy.shape == (1, ids.shape[1] + 6) and torch.equal(greedy, no_cache)  # KV cache slots re-indexed


def test_prune_gpt2_and_build_student_from_teacher(bl_tok, tiny_teacher_dir):
    gpt2 = prune_layers(tiny.tiny_gpt2(bl_tok, n_layers=4), 3)
    assert gpt2.config.n_layer == gpt2.config.num_hidden_layers == 3 and len(gpt2.transformer.h) == 3
    ids = torch.tensor([bl_tok("Hello there.")["input_ids"]])
    assert gpt2.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=bl_tok.pad_token_id).shape[1] == \
        ids.shape[1] + 3
    student = build_student(init_from_teacher=str(tiny_teacher_dir), keep_layers=2)
    assert student.training and student.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="--keep-layers K"):
        build_student(init_from_teacher=str(tiny_teacher_dir))
    with pytest.raises(ValueError, match="exactly one of"):
        build_student()


# --- 5. key layers and a cache lacking one ---------------------------------------------------------------------


def test_key_layer_schedule():
    def schedule(student_layers=None, teacher_layers=None, n_student=2, n_teacher=4, available=CACHE_LAYERS,
                 cached=False):
        return key_layers(student_layers, teacher_layers, 1, n_student, n_teacher, available, cached)[0]

    assert schedule() == [(1, 2, "word"), (2, 4, "phrase")]  # online: the method's default
    assert schedule(cached=True) == [(1, 3, "word"), (2, 4, "phrase")]  # the cache's layers at matching depths
    assert schedule([4, 2], n_student=4, n_teacher=8, available=[4, 8]) == [(2, 4, "word"), (4, 8, "phrase")]
    assert schedule(teacher_layers=[3, 4]) == [(1, 3, "word"), (2, 4, "phrase")]
    with pytest.raises(ValueError, match="must have the same length"):
        schedule([1, 2], [4])
    with pytest.raises(ValueError, match=r"out of range 1\.\.2"):
        schedule([1, 3])
    with pytest.raises(ValueError, match=r"room for only 2 of them"):
        schedule(teacher_layers=[2, 3, 4])


def test_cache_lacking_a_teacher_layer(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CacheError) as caught:
        train(config(out, cache, student_layers=[1, 2], teacher_layers=[1, 4]))
    message = str(caught.value)
    assert "teacher layer(s) [1]" in message and "the cache holds layers [2, 3, 4]" in message
    assert not out.exists()
    result = run_cli("train", "--cache", cache, "--init-from-teacher", "--keep-layers", 2, "--mta",
                     "--student-layers", "1,2", "--teacher-layers", "1,4", "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    assert "error: teacher layer(s) [1]" in result.stderr and "the cache holds layers [2, 3, 4]" in result.stderr
    assert not out.exists()


# --- 7. the CLI ------------------------------------------------------------------------------------------------


def test_cli_train(cache, tmp_path):
    out = tmp_path / "cli-run"
    args = ["train", "--cache", cache, "--init-from-teacher", "--keep-layers", 2, "--loss", "srkl", "--mta",
            "--max-steps", 2, "--out", out, "--device", "cpu", "--json"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["out"] == str(out) and summary["resumed_from"] is None
    assert {"loss", "ce", "kd", "dsa", "hid"} <= set(summary["final"]) and summary["final"]["step"] == 2
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()

    again = run_cli(*args)
    assert again.exit_code == 1 and again.stdout == ""
    assert f"{out} already holds a run; pass --resume" in again.stderr

    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == str(out / "checkpoints" / "step-000002")


def test_cli_unknown_loss(cache, tmp_path):
    out = tmp_path / "never"
    result = run_cli("train", "--cache", cache, "--init-from-teacher", "--keep-layers", 2, "--loss", "kld",
                     "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    assert "error: --loss must be one of sft, fkl, rkl, skl, srkl, js, tvd, akl, fdd, distillm2, got 'kld'" in result.stderr
    assert not out.exists()


# --- a student with its own tokenizer, and the top-k cache variant ------------------------------------------------


def test_a_student_with_another_tokenizer_trains_with_span_level_losses(tmp_path, cache, sp_tok):
    """Cached text re-tokenized for the student, spans mapped by characters: sft + DSA + span Hid train;
    token-level KD is refused with a message."""
    student_dir = tiny.save_tiny_model(tmp_path / "student", sp_tok, tiny.tiny_llama(sp_tok, n_layers=2, hidden=32))
    summary = train(config(tmp_path / "run", cache, loss="sft", init_from_teacher=False, keep_layers=None,
                           student=str(student_dir), max_steps=2))
    assert summary.steps == 2 and summary.final["dsa"] > 0 and summary.final["hid"] > 0
    assert math.isfinite(summary.final["loss"])
    with pytest.raises(ValueError, match="needs identical token positions"):
        train(config(tmp_path / "refused", cache, loss="srkl", init_from_teacher=False, keep_layers=None,
                     student=str(student_dir), max_steps=1))


def test_topk_training_with_every_token_equals_exact_forward_kl(tmp_path, tiny_teacher_dir, teacher, cache_head):
    """A cache with top-k = vocabulary size holds the whole teacher distribution: the top-k fkl loss then
    equals the exact fkl loss from the cached last layer and head."""
    data = tmp_path / "records.jsonl"
    tiny.write_jsonl(data, RECORDS[:3])
    vocab = teacher.config.vocab_size
    out = tmp_path / "topk.zarr"
    extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data), out=str(out), dtype="fp32", batch_size=1,
                          device="cpu", max_length=64, max_prompt_length=32, top_k=vocab))
    reader = CacheReader(str(out))
    batch = collate([reader[i] for i in range(3)], reader.meta["tokenizer"]["pad_token_id"])
    student = prune_layers(copy.deepcopy(teacher), 2)
    values = {}
    for topk in (False, True):
        objective = Objective(ObjectiveConfig(loss="fkl", kd_alpha=0.5, topk=topk), reader.head, 4, 48, 48)
        values[topk] = objective(student, batch)
    for key in ("loss", "ce", "kd"):
        assert values[True][key].item() == pytest.approx(values[False][key].item(), rel=1e-4, abs=1e-6), key
    summary = train(TrainConfig(out=str(tmp_path / "run"), cache=str(out), init_from_teacher=True, keep_layers=2,
                                objective=ObjectiveConfig(loss="fkl", topk=True), max_steps=1, device="cpu"))
    assert summary.steps == 1 and math.isfinite(summary.final["loss"])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert all(p.isfinite().all() for p in trained.parameters())


def test_topk_training_needs_a_topk_cache(tmp_path, cache):
    with pytest.raises(ValueError, match="--top-k"):
        train(TrainConfig(out=str(tmp_path / "run"), cache=cache, init_from_teacher=True, keep_layers=2,
                          objective=ObjectiveConfig(loss="fkl", topk=True), max_steps=1, device="cpu"))


def test_prune_command_saves_a_loadable_pruned_student(tmp_path, tiny_teacher_dir, teacher):
    result = run_cli("prune", "--teacher", tiny_teacher_dir, "--keep-layers", 2, "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.num_hidden_layers == 2
    expected = prune_layers(copy.deepcopy(teacher), 2).state_dict()
    assert_same_tensors(pruned.state_dict(), expected, "pruned weights")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "pruned")) == \
        tokenizer_fingerprint(load_tokenizer(str(tiny_teacher_dir)))
