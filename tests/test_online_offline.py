"""The correctness anchor (design.md): a loss computed from the cache equals the loss computed with the
live teacher on the same batch.

Setup: a tiny 4-layer Llama teacher; caches extracted with batch_size=1, so every cached state comes
from a single-sample forward, as do the online states here (`live_samples` one sample at a time,
then collated together, exactly as the offline batch is).

What is proven, and with which tolerance:
- fp32 cache: the offline and online `Batch` are bitwise identical (ids, mask, labels, every
  teacher layer, spans), so every loss of `LOSSES`, and `--mta` (DSA + Hid, DSA only, Hid only),
  gives the SAME loss components and the SAME gradients of every student and projector parameter
  (tolerance 0: torch.equal). The real iterators (`CacheBatches` vs `DataBatches` with a live teacher,
  batch size 1) yield identical batches too; the teacher run on a padded batch (what `DataBatches` does
  with batch_size > 1) agrees within atol 1e-5 on the states and rtol 1e-4 on the losses;
- bf16 cache: every loss component within rtol 2e-3 / atol 1e-6 (measured: <= 2e-4 relative on this
  teacher), gradients with cosine similarity > 0.99 per parameter tensor; every teacher-dependent term
  (kd, dsa, hid) is NOT bitwise equal to the live one (the rounding is visible: the comparison can fail);
- the head stored in the cache is the live teacher's head, bit for bit, and reproduces its logits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mta_cli.cache.reader import CacheReader
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.losses import LOSSES, LogitHead, default_key_layers
from mta_cli.models import load_causal_lm, load_tokenizer
from mta_cli.segment import Segmenter
from mta_cli.student import prune_layers
from mta_cli.training.batches import Batch, CacheBatches, collate
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.data import DataBatches, LiveTeacher, live_samples
from mta_cli.training.trainer import Source, TrainConfig
from tests import tiny
from tests.test_training_arithmetic import independent_losses

MAX_LENGTH, MAX_PROMPT = 64, 32
CPU = torch.device("cpu")
LAYERS = [0, 1, 2, 3, 4]
RECORDS = tiny.RECORDS[:5]
INDICES = [0, 2, 3]  # three lengths: the collated batch is padded
STUDENT_LAYERS = 2
# (name, ObjectiveConfig options): every base loss, then MTA on top of srkl in its three forms
VARIANTS = [(loss, {"loss": loss}) for loss in LOSSES] + [
    ("srkl+mta", {"loss": "srkl", "mta": True}),
    ("srkl+mta-dsa-only", {"loss": "srkl", "mta": True, "use_hid": False}),
    ("fkl+mta-hid-only", {"loss": "fkl", "mta": True, "use_dsa": False}),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    tiny.write_jsonl(path, RECORDS)
    return path


@pytest.fixture(scope="module")
def readers(tmp_path_factory, tiny_teacher_dir, data_file) -> dict[str, CacheReader]:
    base = tmp_path_factory.mktemp("caches")
    made = {}
    for dtype in ("fp32", "bf16"):
        extract(ExtractConfig(teacher=str(tiny_teacher_dir), data=str(data_file), out=str(base / f"{dtype}.zarr"),
                              dtype=dtype, batch_size=1, layers=LAYERS[:-1], shard_size=2, device="cpu",
                              max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT))
        made[dtype] = CacheReader(base / f"{dtype}.zarr")
    return made


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_causal_lm(str(tiny_teacher_dir), "fp32", "cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return load_tokenizer(str(tiny_teacher_dir))


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter()


@pytest.fixture(scope="module")
def online(teacher, tokenizer, data_file, segmenter) -> DataBatches:
    return DataBatches(tokenizer, str(data_file), 1, 0, MAX_LENGTH, MAX_PROMPT,
                       LiveTeacher(teacher, LAYERS, CPU, segmenter))


@pytest.fixture(scope="module")
def heads(readers, tiny_teacher_dir, data_file, tmp_path_factory) -> dict[str, LogitHead]:
    """The teacher heads exactly as `mta train` builds them: from each cache, and from the live teacher."""
    out = str(tmp_path_factory.mktemp("unused-run"))
    made = {dtype: Source(TrainConfig(out=out, cache=reader.url), CPU).head for dtype, reader in readers.items()}
    made["live"] = Source(TrainConfig(out=out, teacher=str(tiny_teacher_dir), data=str(data_file)), CPU).head
    return made


@pytest.fixture(scope="module")
def student(teacher):
    return prune_layers(copy.deepcopy(teacher), STUDENT_LAYERS).train()


def offline_batch(reader: CacheReader, indices: list[int], pad_id: int) -> Batch:
    return collate([reader[i] for i in indices], pad_id)


def online_batch(teacher, online: DataBatches, segmenter, indices: list[int]) -> Batch:
    """Teacher and spaCy run now, one sample per forward (as the batch_size=1 cache was made)."""
    samples = [live_samples(teacher, [online.samples[i]], [i], segmenter, LAYERS, online.pad_id, CPU)[0]
               for i in indices]
    return collate(samples, online.pad_id)


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.sample_indices == b.sample_indices
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert sorted(a.teacher_states) == sorted(b.teacher_states) == LAYERS
    for layer in LAYERS:
        assert torch.equal(a.teacher_states[layer], b.teacher_states[layer]), f"layer {layer}"
    assert len(a.spans) == len(b.spans)
    for sa, sb in zip(a.spans, b.spans):
        assert torch.equal(sa["word"], sb["word"]) and torch.equal(sa["phrase"], sb["phrase"])


def make_objective(options: dict, head: LogitHead, student_dim: int = 48, seed: int = 0) -> Objective:
    config = ObjectiveConfig(**options)
    if config.mta:
        config.key_layers = default_key_layers(STUDENT_LAYERS, 4, m=2)  # [(1, 2, word), (2, 4, phrase)]
    torch.manual_seed(seed)
    return Objective(config, head, 4, student_dim, 48)


def losses_and_grads(student, objective: Objective, batch: Batch) -> tuple[dict, dict]:
    student.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    losses = objective(student, batch)
    losses["loss"].backward()
    named = [(f"student.{n}", p) for n, p in student.named_parameters()] + \
            [(f"objective.{n}", p) for n, p in objective.named_parameters()]
    grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
    return {k: v.detach().clone() for k, v in losses.items()}, grads


# --- the batches ---------------------------------------------------------------------------------------------


def test_offline_and_online_batches_are_bitwise_equal(readers, teacher, online, segmenter):
    reader = readers["fp32"]
    assert reader.layers == LAYERS and len(reader) == len(online.samples) == len(RECORDS)
    offline = offline_batch(reader, INDICES, online.pad_id)
    live = online_batch(teacher, online, segmenter, INDICES)
    assert_batches_equal(offline, live)
    lengths = offline.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and offline.input_ids.shape == (3, max(lengths))  # really padded
    assert (offline.labels != -100).sum() > 0 and offline.teacher_states[4].shape == (3, max(lengths), 48)
    assert all(len(s["word"]) >= 2 and len(s["phrase"]) >= 2 for s in offline.spans)


def test_cache_and_online_iterators_yield_the_same_batches(readers, online):
    reader = readers["fp32"]
    cached = {tuple(b.sample_indices): b for b in CacheBatches(reader, 1, LAYERS, 0, online.pad_id).iterate(0)}
    live = {tuple(b.sample_indices): b for b in online.iterate(0)}
    assert sorted(cached) == sorted(live) == [(i,) for i in range(len(RECORDS))]
    for key in cached:
        assert_batches_equal(cached[key], live[key])


def test_padded_live_teacher_batch_is_close(readers, teacher, online, segmenter, heads, student):
    """`DataBatches` with batch_size > 1 runs the teacher on a padded batch: equal up to float noise."""
    offline = offline_batch(readers["fp32"], INDICES, online.pad_id)
    samples = live_samples(teacher, [online.samples[i] for i in INDICES], INDICES, segmenter, LAYERS,
                           online.pad_id, CPU)
    padded = collate(samples, online.pad_id)
    assert torch.equal(padded.input_ids, offline.input_ids) and torch.equal(padded.labels, offline.labels)
    for layer in LAYERS:
        torch.testing.assert_close(padded.teacher_states[layer], offline.teacher_states[layer], rtol=0, atol=1e-5)
    options = {"loss": "srkl", "mta": True}
    off, _ = losses_and_grads(student, make_objective(options, heads["fp32"]), offline)
    on, _ = losses_and_grads(student, make_objective(options, heads["live"]), padded)
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=1e-4, atol=1e-6)


# --- the head ------------------------------------------------------------------------------------------------


def test_cached_head_is_the_live_head(readers, teacher, heads):
    live = teacher.get_output_embeddings().weight.detach()
    for dtype in ("fp32", "bf16"):
        head = readers[dtype].head
        assert head.bias is None and head.scale == 1.0 and head.softcap is None
        assert torch.equal(head.weight, live), dtype  # teacher_dtype fp32: the head is stored in fp32
        assert torch.equal(heads[dtype].weight, live) and heads[dtype].bias is None
    assert torch.equal(heads["live"].weight, live) and heads["live"].bias is None
    assert heads["live"].scale == heads["fp32"].scale == 1.0 and heads["live"].softcap is heads["fp32"].softcap
    sample = readers["fp32"][1]
    with torch.no_grad():
        logits = teacher(torch.from_numpy(sample.input_ids.astype(np.int64))[None]).logits[0]
    torch.testing.assert_close(heads["fp32"](sample.states[4]), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(readers["fp32"].head(sample.states[4]), logits, rtol=1e-5, atol=1e-5)


# --- losses and gradients ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(readers, teacher, online, segmenter) -> dict[str, Batch]:
    return {"fp32": offline_batch(readers["fp32"], INDICES, online.pad_id),
            "bf16": offline_batch(readers["bf16"], INDICES, online.pad_id),
            "live": online_batch(teacher, online, segmenter, INDICES)}


def check_components(name: str, options: dict, losses: dict) -> None:
    expected = {"loss", "ce"} | ({"kd"} if options["loss"] != "sft" else set()) | \
        ({"dsa", "hid"} if options.get("mta") else set())
    assert set(losses) == expected, name
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), name
    assert losses["ce"] > 0 and losses["loss"] > 0
    if "kd" in losses:
        assert losses["kd"] > 0, name  # the pruned student differs from its teacher
    if options.get("mta"):
        assert (losses["dsa"] > 0) == options.get("use_dsa", True), name  # a disabled term reports exactly 0
        assert (losses["hid"] > 0) == options.get("use_hid", True), name
        assert losses["dsa"] >= 0 and losses["hid"] >= 0


@pytest.mark.parametrize("name,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fp32_cache_equals_live_teacher_exactly(name, options, batches, heads, student):
    offline_objective = make_objective(options, heads["fp32"], seed=0)
    online_objective = make_objective(options, heads["live"], seed=1)  # other init, then the same weights
    if options.get("use_hid", True) and options.get("mta"):
        assert not torch.equal(online_objective.mta.projectors[0].weight, offline_objective.mta.projectors[0].weight)
    online_objective.load_state_dict(offline_objective.state_dict())
    off, off_grads = losses_and_grads(student, offline_objective, batches["fp32"])
    on, on_grads = losses_and_grads(student, online_objective, batches["live"])
    check_components(name, options, off)
    assert set(on) == set(off)
    for key in off:
        assert torch.equal(on[key], off[key]), f"{name} {key}: {on[key].item()} vs {off[key].item()}"
    assert sorted(on_grads) == sorted(off_grads)
    n_student = sum(1 for _ in student.parameters())
    n_projectors = len(offline_objective.mta.projectors) if options.get("mta") else 0
    assert len(off_grads) == n_student + n_projectors  # every parameter, projectors included, gets a gradient
    assert sum(g.abs().sum() for g in off_grads.values()) > 0
    for key in off_grads:
        assert torch.equal(on_grads[key], off_grads[key]), f"{name}: gradient of {key}"


@pytest.mark.parametrize("name,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_bf16_cache_is_close_to_live_teacher(name, options, batches, heads, student):
    objective = make_objective(options, heads["bf16"])
    off, off_grads = losses_and_grads(student, objective, batches["bf16"])
    on, on_grads = losses_and_grads(student, objective, batches["live"])
    check_components(name, options, off)
    for key in off:
        torch.testing.assert_close(off[key], on[key], rtol=2e-3, atol=1e-6, msg=f"{name} {key}")
    assert torch.equal(off["ce"], on["ce"])  # CE never reads the teacher
    # every term that reads the teacher's states sees the bf16 rounding: the comparison above can fail
    teacher_terms = [k for k in ("kd", "dsa", "hid") if k in off and off[k] != 0]
    assert teacher_terms or options["loss"] == "sft"
    for key in teacher_terms:
        assert not torch.equal(off[key], on[key]), f"{name} {key}"
    for key in off_grads:
        cosine = torch.nn.functional.cosine_similarity(off_grads[key].flatten(), on_grads[key].flatten(), dim=0)
        if on_grads[key].abs().max() > 0:
            assert cosine > 0.99, f"{name}: gradient of {key}, cosine {cosine.item():.4f}"


@pytest.mark.parametrize("name,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fp32_cache_losses_equal_independent_values(name, options, batches, heads, student, teacher):
    """Equal offline and online values could share a mistake: every component from the fp32 cache also equals
    the method's formulas evaluated independently (numpy divergences on the live teacher's logits, the
    float64 MTA reference), within float32 rounding."""
    objective = make_objective(options, heads["fp32"])
    with torch.no_grad():
        losses = objective(student, batches["fp32"])
    expected = independent_losses(student, objective, batches["fp32"], teacher)
    assert set(losses) == set(expected), name
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-4, abs=1e-7), f"{name} {key}"
