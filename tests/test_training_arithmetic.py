"""The arithmetic of `mta train`, checked against computations made here: one optimizer step against a direct
`torch.optim.AdamW` step, the learning-rate schedule over a run that warms up, the epoch order, and the
values logged for a first step against the formulas of method.md evaluated independently.

Runs use the tiny fp32 cache (8 samples, teacher layers 2, 3, 4) and CPU."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mta_cli.cache.reader import CacheReader
from mta_cli.models import load_causal_lm
from mta_cli.training import trainer
from mta_cli.training.batches import CacheBatches
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests import reference, tiny
from tests.test_losses import NUMPY_DIVERGENCES

TEACHER_LAST = 4


@pytest.fixture(scope="module")
def reader(tiny_fp32_cache) -> CacheReader:
    return CacheReader(tiny_fp32_cache)


@pytest.fixture(scope="module")
def pad_id(reader) -> int:
    return reader.meta["tokenizer"]["pad_token_id"]


@pytest.fixture
def initial(monkeypatch) -> dict:
    """Copies of the student and of the objective (projectors) as `mta train` built them, before any step;
    and the batches the objective was called with."""
    made = {"batches": []}
    build_student = trainer.build_student

    def build(*args, **kwargs):
        student = build_student(*args, **kwargs)
        made["student"] = copy.deepcopy(student)
        return student

    class Recording(Objective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made["objective"] = copy.deepcopy(self)

        def forward(self, student, batch, progress=0.0):
            made["batches"].append(batch)
            return super().forward(student, batch, progress)

    monkeypatch.setattr(trainer, "build_student", build)
    monkeypatch.setattr(trainer, "Objective", Recording)
    return made


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_config(out: Path, cache: str, **options) -> TrainConfig:
    """One step, batches of 2, srkl (α = 0.5) + MTA, a 2-layer student pruned from the teacher, unless
    `options` say otherwise."""
    settings = dict(init_from_teacher=True, keep_layers=2, batch_size=2, max_steps=1, seed=0, device="cpu",
                    objective=ObjectiveConfig(loss="srkl", mta=True)) | options
    return TrainConfig(out=str(out), cache=cache, **settings)


# --- one optimizer step -------------------------------------------------------------------------------------

LR, PROJECTOR_LR, WEIGHT_DECAY = 1e-3, 3e-2, 0.2


@pytest.mark.parametrize("grad_accum,max_grad_norm", [(1, 0.05), (2, 0.05), (2, 1e3)],
                         ids=["accum1-clipped", "accum2-clipped", "accum2-unclipped"])
def test_one_step_equals_a_direct_adamw_step(grad_accum, max_grad_norm, tiny_fp32_cache, reader, pad_id, tmp_path,
                                             initial):
    """The step of `mta train` is: the mean of `grad_accum` micro-batch losses, gradients clipped to a total
    norm of max_grad_norm (torch's rule: scaled by max_norm / (norm + 1e-6) when above), then AdamW with the
    student at --lr, the projectors at --projector-lr, both with --weight-decay. Recomputed here from the
    initial weights with torch.optim.AdamW: the same weights after the step (within float32 rounding, 1e-7
    absolute and 1e-6 relative, while weight decay alone moves a weight by lr · decay = 2e-4 of its value) and
    the same Adam moments (they record the clipped, averaged gradient, which Adam's first update hides: it is
    about lr · sign(gradient) whatever the gradient's scale)."""
    run = tmp_path / "run"
    train(run_config(run, tiny_fp32_cache, grad_accum=grad_accum, max_grad_norm=max_grad_norm, lr=LR,
                        projector_lr=PROJECTOR_LR, weight_decay=WEIGHT_DECAY))
    student, objective = initial["student"].train(), initial["objective"]
    layers = sorted({TEACHER_LAST} | set(objective.config.teacher_layers))
    batches = CacheBatches(reader, 2, layers, 0, pad_id, prefetch=False).iterate(0)
    student_params = [p for p in student.parameters() if p.requires_grad]
    params = student_params + list(objective.parameters())
    for _, batch in zip(range(grad_accum), batches):
        (objective(student, batch)["loss"] / grad_accum).backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))
    if max_grad_norm < 1:
        assert norm > 4 * max_grad_norm  # the threshold bites
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_grad_norm / (norm + 1e-6))
    else:
        assert norm < max_grad_norm
    optimizer = torch.optim.AdamW([{"params": student_params, "lr": LR},
                                   {"params": list(objective.parameters()), "lr": PROJECTOR_LR}],
                                  weight_decay=WEIGHT_DECAY)
    optimizer.step()

    assert metrics(run)[0]["lr"] == LR  # one step: no warmup, the cosine starts at the full rate
    saved = load_file(run / "model.safetensors")
    for name, value in student.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=1e-6, atol=1e-7, msg=name)
    checkpoint = run / "checkpoints" / "step-000001"
    projectors = load_file(checkpoint / "objective.safetensors")
    assert len(projectors) == 2
    for name, value in objective.state_dict().items():
        torch.testing.assert_close(projectors[name], value, rtol=1e-6, atol=1e-7, msg=name)
    moments = load_file(checkpoint / "optimizer.safetensors")
    state = optimizer.state_dict()["state"]
    assert sorted(moments) == sorted(f"{i}.{key}" for i, s in state.items() for key in s)
    for i, s in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[f"{i}.{key}"], s[key], rtol=1e-5, atol=1e-12, msg=f"{i}.{key}")


def test_adamw_runs_fused_on_one_process_only():
    """The direct comparison above holds with the fused kernel (one pass per tensor, 5-8x faster on CPU):
    the trainer takes it for plain floating-point parameters on the run's device, and leaves FSDP's
    sharded parameters to the default path."""
    floats = [{"params": [torch.nn.Parameter(torch.ones(3))]}, {"params": []}]
    assert trainer.fused_adamw(floats, torch.device("cpu"), fsdp=False)
    assert not trainer.fused_adamw(floats, torch.device("cpu"), fsdp=True)
    assert not trainer.fused_adamw(floats, torch.device("meta"), fsdp=False)
    on_another_device = [{"params": [torch.nn.Parameter(torch.ones(3, device="meta"))]}]
    assert not trainer.fused_adamw(on_another_device, torch.device("cpu"), fsdp=False)


# --- the learning-rate schedule -----------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_cosine(tiny_fp32_cache, tmp_path):
    """16 steps, warmup ratio 0.25: 4 warmup steps at lr·1/4, 2/4, 3/4, 4/4 (the first step already trains),
    then lr·½(1 + cos(π k / 12)) for k = 0..11 over the 12 remaining steps."""
    run = tmp_path / "run"
    train(run_config(run, tiny_fp32_cache, objective=ObjectiveConfig(loss="sft"), batch_size=4, max_steps=16,
                        warmup_ratio=0.25, lr=LR, checkpoint_every=0))
    warmup = [LR * k / 4 for k in (1, 2, 3, 4)]
    decay = [LR * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)]
    assert [row["lr"] for row in metrics(run)] == pytest.approx(warmup + decay, rel=1e-12, abs=0)


# --- the epoch order ----------------------------------------------------------------------------------------


def test_epoch_order_differs_between_epochs_and_is_a_function_of_seed_and_epoch(tiny_fp32_cache, reader, pad_id,
                                                                                tmp_path, initial):
    """Three epochs of `mta train`: each visits every sample once, in an order of its own; a fresh loader
    asked for the epochs in reverse order reproduces each one (a pure function of seed and epoch), and
    another seed gives another order."""
    train(run_config(tmp_path / "run", tiny_fp32_cache, objective=ObjectiveConfig(loss="sft"), max_steps=None,
                        epochs=3, lr=0.0, checkpoint_every=0))
    seen = [batch.sample_indices for batch in initial["batches"]]
    per_epoch = [seen[4 * e:4 * e + 4] for e in range(3)]  # 8 samples in batches of 2
    assert len(seen) == 12
    flat = [[i for batch in epoch for i in batch] for epoch in per_epoch]
    assert all(sorted(order) == list(range(8)) for order in flat)
    assert flat[0] != flat[1] and flat[1] != flat[2] and flat[0] != flat[2]

    fresh = CacheBatches(reader, 2, [TEACHER_LAST], 0, pad_id, prefetch=False)
    for epoch in (2, 1, 0):
        assert [b.sample_indices for b in fresh.iterate(epoch)] == per_epoch[epoch]
    other_seed = CacheBatches(reader, 2, [TEACHER_LAST], 1, pad_id, prefetch=False)
    assert [b.sample_indices for b in other_seed.iterate(0)] != per_epoch[0]


# --- logged values of a first step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_causal_lm(str(tiny_teacher_dir), "fp32", "cpu")


@pytest.fixture(scope="module")
def other_students(tmp_path_factory, bl_tok, sp_tok) -> dict[str, dict]:
    """TrainConfig options for a random student of hidden size 32 (the teacher has 48), and for a student
    with its own (sentencepiece) tokenizer."""
    base = tmp_path_factory.mktemp("students")
    small = base / "small.json"
    small.write_text(json.dumps({"model_type": "llama", "vocab_size": len(bl_tok), "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "max_position_embeddings": 256,
                                 "pad_token_id": bl_tok.pad_token_id, "eos_token_id": bl_tok.eos_token_id}))
    own = tiny.save_tiny_model(base / "own-tokenizer", sp_tok, tiny.tiny_llama(sp_tok, n_layers=2, hidden=32))
    return {"small": dict(init_from_teacher=False, keep_layers=None, student_config=str(small)),
            "own_tokenizer": dict(init_from_teacher=False, keep_layers=None, student=str(own),
                                  objective=ObjectiveConfig(loss="sft", mta=True))}


def independent_losses(student, objective: Objective, batch, teacher) -> dict[str, float]:
    """Every loss component of one batch from the models' own forwards, numpy divergences and the MTA
    reference: the teacher runs live on each unpadded sample (the cache is not read for its logits).
    A term switched off by the objective's options counts 0."""
    config = objective.config
    with torch.no_grad():
        out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    targets = batch.labels != -100
    divergence = None if config.loss == "sft" else NUMPY_DIVERGENCES[config.loss]
    teacher_logits = None
    if divergence is not None:
        rows = []
        for b, n in enumerate(batch.attention_mask.sum(1).tolist()):
            with torch.no_grad():
                rows.append(teacher(batch.input_ids[b:b + 1, :n]).logits[0][targets[b, :n]])
        teacher_logits = torch.cat(rows).double().numpy()
    losses = reference.base_losses(out.logits[targets].double().numpy(), teacher_logits,
                                   batch.labels[targets].numpy(), divergence, config.kd_alpha, config.temperature)
    if not config.mta:
        return losses

    def lists(spans):
        return [{k: v.tolist() for k, v in s.items()} for s in spans]

    cross = batch.teacher_mask is not None
    projectors = [p.weight.detach().double().numpy() for p in objective.mta.projectors] if config.use_hid else None
    mta = reference.mta(
        {s: out.hidden_states[s].double().numpy() for s, _, _ in config.key_layers},
        {t: batch.teacher_states[t].double().numpy() for _, t, _ in config.key_layers},
        batch.attention_mask.sum(1).tolist(), lists(batch.spans), config.key_layers, projectors,
        pooling=config.student_pooling, teacher_lengths=batch.teacher_mask.sum(1).tolist() if cross else None,
        teacher_spans=lists(batch.teacher_spans) if cross else None)
    dsa = mta["dsa"] if config.use_dsa else 0.0
    hid = mta["hid"] if config.use_hid else 0.0
    return losses | {"dsa": dsa, "hid": hid, "loss": losses["loss"] + config.lambda_dsa * dsa + config.lambda_hid * hid}


@pytest.mark.parametrize("student_kind", ["pruned", "small", "own_tokenizer"])
def test_first_step_logs_the_independently_computed_losses(student_kind, tiny_fp32_cache, teacher, other_students,
                                                           tmp_path, initial):
    """The loss, CE, KD, DSA and Hid logged for step 1 equal method.md's formulas evaluated here on the
    initial weights and the step's batch: for a student pruned from the teacher (srkl + MTA), one of another
    hidden size (srkl + MTA, projectors 32 -> 48) and one with its own tokenizer (sft + span-level MTA)."""
    run = tmp_path / "run"
    train(run_config(run, tiny_fp32_cache, **other_students.get(student_kind, {})))
    (batch,) = initial["batches"]
    assert (batch.teacher_mask is not None) == (student_kind == "own_tokenizer")
    expected = independent_losses(initial["student"].train(), initial["objective"], batch, teacher)
    logged = metrics(run)[0]
    assert set(expected) <= set(logged)
    assert expected["dsa"] > 1e-4 and expected["hid"] > 1e-2
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
