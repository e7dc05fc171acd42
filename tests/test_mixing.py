"""Training from several caches: specs with weights, each batch's teacher states from its own cache, shares held
exactly over an epoch, caches of different teachers refused, resume through the mixer's saved state."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.extraction import ExtractConfig, extract
from mta_cli.training.batches import CacheBatches
from mta_cli.training.mixing import MixedBatches, cache_role, parse_cache_spec
from mta_cli.training.objective import ObjectiveConfig
from mta_cli.training.trainer import TrainConfig, train
from tests import tiny


@pytest.mark.parametrize("spec, parsed", [
    ("cache.zarr", ("cache.zarr", None)), ("runs/a.zarr:0.25", ("runs/a.zarr", 0.25)),
    ("s3://bucket/c.zarr", ("s3://bucket/c.zarr", None)), ("s3://bucket/c.zarr:3", ("s3://bucket/c.zarr", 3.0)),
    ("file:///data/c.zarr", ("file:///data/c.zarr", None)),
])
def test_cache_specs(spec, parsed):
    assert parse_cache_spec(spec) == parsed


def test_a_bad_weight_is_refused():
    with pytest.raises(ValueError, match="the weight after ':' must be a finite number >= 0"):
        parse_cache_spec("c.zarr:-1")


def extract_records(teacher, records, out, tmp_path):
    data = tmp_path / (out.name + ".jsonl")
    tiny.write_jsonl(data, records)
    extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), dtype="fp32", shard_size=2,
                          max_length=64, max_prompt_length=32, device="cpu"))
    return out


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory, tiny_teacher_dir):
    base = tmp_path_factory.mktemp("mix")
    a = extract_records(tiny_teacher_dir, tiny.RECORDS[:6], base / "a.zarr", base)
    b = extract_records(tiny_teacher_dir, [{"prompt": "Say it again.\n", "output": r["output"]} for r in tiny.RECORDS],
                        base / "b.zarr", base)
    return a, b


def mixer(caches, weights, batch_size=2):
    readers = [CacheReader(c) for c in caches]
    loaders = [CacheBatches(r, batch_size, r.layers, i, 0) for i, r in enumerate(readers)]
    return readers, MixedBatches(loaders, weights, ["dataset"] * len(readers))


def test_each_batch_carries_its_own_caches_teacher_states(two_caches):
    readers, mixed = mixer(two_caches, [1.0, 1.0])
    seen = Counter()
    for batch in mixed.iterate(0):
        reader = readers[batch.source]
        seen[batch.source] += 1
        for row, index in enumerate(batch.sample_indices):
            sample = reader[index]
            assert batch.input_ids[row, :sample.n_tokens].tolist() == sample.input_ids.tolist()
            for layer in reader.layers:
                assert torch.equal(batch.teacher_states[layer][row, :sample.n_tokens], sample.states[layer])
    assert seen == {0: 4, 1: 3}  # 7 batches in the epoch (3 + 4 in the caches), equal shares: a tie goes first


@pytest.mark.parametrize("weights", [[1.0, 3.0], [0.7, 0.3], [1.0, 0.0]])
def test_shares_hold_over_an_epoch(two_caches, weights):
    _, mixed = mixer(two_caches, weights)
    for epoch in range(2):
        sources = [b.source for b in mixed.iterate(epoch)]
        total = mixed.batches_per_epoch()
        assert len(sources) == total == 7
        for source, weight in enumerate(weights):
            expected = weight / sum(weights) * total * (epoch + 1)
            assert abs(mixed.state.served[source] - expected) <= 1, (source, mixed.state.served)
        if weights[1] == 0:
            assert 1 not in sources


def test_a_cache_whose_share_exceeds_its_size_starts_its_next_epoch(two_caches):
    readers, mixed = mixer(two_caches, [3.0, 1.0])
    indices = [tuple(b.sample_indices) for b in mixed.iterate(0) if b.source == 0]
    own = [tuple(b) for _, batches in mixed.loaders[0].epoch_plan(0) for b in batches]
    again = [tuple(b) for _, batches in mixed.loaders[0].epoch_plan(1) for b in batches]
    assert len(indices) == 5 and indices == (own + again)[:5]


def test_caches_of_different_teachers_are_refused(tmp_path, two_caches, bl_tok):
    other = tiny.save_tiny_model(tmp_path / "other-teacher", bl_tok, tiny.tiny_llama(bl_tok, seed=5))
    c = extract_records(other, tiny.RECORDS[:4], tmp_path / "c.zarr", tmp_path)
    with pytest.raises(CacheError) as caught:
        train(TrainConfig(out=str(tmp_path / "run"), cache=[str(two_caches[0]), str(c)], init_from_teacher=True,
                          keep_layers=2, device="cpu", max_steps=1))
    message = str(caught.value)
    assert str(two_caches[0]) in message and str(c) in message and str(other) in message
    assert "come from different teachers" in message


def test_the_role_comes_from_the_datas_provenance(two_caches, monkeypatch):
    reader = CacheReader(two_caches[0])
    assert cache_role(reader) == "dataset"
    teacher = reader.meta["config"]["teacher"]["weights_sha256"]
    monkeypatch.setitem(reader.meta["data"], "generated_by", [{"model": "t", "weights_sha256": teacher}])
    assert cache_role(reader) == "teacher"
    monkeypatch.setitem(reader.meta["data"], "generated_by", [{"model": "s", "weights_sha256": "0" * 64}])
    assert cache_role(reader) == "student"


def test_mixed_training_resumes_exactly(tmp_path, two_caches):
    def config(out, **options):
        return TrainConfig(out=str(out), cache=[str(two_caches[0]), f"{two_caches[1]}:2"], init_from_teacher=True,
                           keep_layers=2, batch_size=2, max_steps=6, checkpoint_every=2, device="cpu", seed=3,
                           objective=ObjectiveConfig(loss="fkl"), **options)

    full = train(config(tmp_path / "full"))

    def stop(event, info):
        if event == "step" and info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), progress=stop)
    resumed = train(config(tmp_path / "cut", resume=True))
    assert full.steps == resumed.steps == 6
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["progress"]["batches"]["served"] == [2, 4]  # weights 1 : 2 over 6 batches
