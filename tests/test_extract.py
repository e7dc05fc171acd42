"""`mta extract` end to end on tiny teachers built here (CPU, no download).

What is proven (issue 2, "done when"):
- states read back equal a direct forward of the teacher: exactly for an fp32 cache extracted one sample
  per batch, within 1e-5 with padded, length-bucketed batches; bf16 / fp16 caches equal the fp32 states
  rounded to that dtype exactly, int8 within half a quantisation step per token;
- the stored head reproduces the teacher's own logits (Llama, tied Llama, GPT-2, Gemma-2 soft-capping);
- the default / requested / out-of-range teacher layers;
- the stored text, tokens, offsets, spans, token ranges, source lines and top-k match the library
  functions that made them, and random access agrees with whole-shard reads;
- bad input through the CLI fails with file:line:field and writes nothing; --skip-invalid, --dry-run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mta_cli.cache.reader import CacheReader
from mta_cli.encode import encode_record
from mta_cli.extraction import HEAD_COMPRESSION_ESTIMATE, ExtractConfig, extract
from mta_cli.models import load_causal_lm, load_tokenizer
from mta_cli.records import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, load_records
from mta_cli.segment import Segmenter, spans_to_token_ranges
from tests import tiny
from tests.tiny import write_jsonl

MAX_LENGTH, MAX_PROMPT = 64, 32

# Prompt-format lines: a blank line (3) and an invalid record (6, no "output") make source lines non-trivial;
# line 7 has several references; line 8 has a non-ASCII character; line 10 is truncated on both sides.
LINES = [
    {"prompt": "### Instruction:\nName three primary colors.\n\n### Response:\n",
     "output": "Red, blue and yellow are the primary colors."},
    {"prompt": "Tell me about the history of the Roman Empire.\n", "output": "The Roman Empire had famous emperors."},
    None,
    {"prompt": "Q: What does photosynthesis do?\nA: ",
     "output": "Photosynthesis converts light energy into chemical energy stored in sugar."},
    {"prompt": "Write a sentence about a fox.\n", "output": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "This record has no output field.\n"},
    {"prompt": "Describe your morning.\n", "output": ["I have been running every morning.", "I run daily."]},
    {"prompt": "Who wrote a letter?\n", "output": "Alice quickly wrote a long letter to her old friend at the café."},
    {"prompt": "Say hi.\n", "output": "Hi!"},
    {"prompt": "Tell me about the history of the Roman Empire and its famous emperors. " * 5 + "\n",
     "output": "The cat sleeps on a warm mat while the dog runs. " * 5},
]
SOURCE_LINES = [1, 2, 4, 5, 7, 8, 9, 10]

ALPACA = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Summarise the text.", "input": "The quick brown fox jumps over the lazy dog.",
     "output": "A fox jumps over a dog."},
    {"instruction": "Describe photosynthesis.", "output": "Plants convert light energy into sugar."},
]


def run(teacher, data, out, **options) -> tuple:
    config = ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), max_length=MAX_LENGTH,
                           max_prompt_length=MAX_PROMPT, device="cpu", **options)
    summary = extract(config)
    return summary, CacheReader(out)


def all_samples(reader: CacheReader) -> list:
    return [sample for shard in reader.iter_shards() for sample in shard]


def direct(model, input_ids: np.ndarray):
    """The teacher's own forward on one sample: (hidden_states tuple of [T, d], logits [T, V])."""
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids.astype(np.int64))[None], output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "records.jsonl", LINES)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_causal_lm(str(tiny_teacher_dir), "fp32", "cpu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_teacher_dir, data_file) -> dict:
    """Caches of the same data: fp32 one sample per batch (all layers, top-5) and batched in every dtype."""
    base = tmp_path_factory.mktemp("caches")
    made = {}
    common = dict(skip_invalid=True, shard_size=3)
    made["fp32_b1"] = run(tiny_teacher_dir, data_file, base / "fp32_b1.zarr", dtype="fp32", batch_size=1,
                          layers=[0, 1, 2, 3], top_k=5, **common)
    made["fp32"] = run(tiny_teacher_dir, data_file, base / "fp32.zarr", dtype="fp32", batch_size=4,
                       layers=[1, 2, 3], **common)
    made["bf16"] = run(tiny_teacher_dir, data_file, base / "bf16.zarr", dtype="bf16", batch_size=4, **common)
    made["fp16"] = run(tiny_teacher_dir, data_file, base / "fp16.zarr", dtype="fp16", batch_size=4, layers=[1],
                       **common)
    made["int8"] = run(tiny_teacher_dir, data_file, base / "int8.zarr", dtype="int8", batch_size=4, **common)
    return made


# --- 1. states ---------------------------------------------------------------------------------------


def test_fp32_states_equal_a_direct_forward_exactly(caches, teacher):
    summary, reader = caches["fp32_b1"]
    assert reader.layers == [0, 1, 2, 3, 4] and summary.layers == [0, 1, 2, 3, 4]
    samples = all_samples(reader)
    assert len(samples) == 8
    for sample in samples:
        hidden, _ = direct(teacher, sample.input_ids)
        assert sorted(sample.states) == [0, 1, 2, 3, 4]
        for layer, h in sample.states.items():
            assert h.dtype == torch.float32 and h.shape == (sample.n_tokens, 48)
            assert torch.equal(h, hidden[layer]), f"sample {sample.index} layer {layer}"


def test_batched_fp32_states_match_within_1e5(caches, teacher):
    summary, reader = caches["fp32"]
    samples = all_samples(reader)
    lengths = [s.n_tokens for s in samples]
    assert len(set(lengths)) > 4  # batches of 4 mix lengths: padding is exercised
    for sample in samples:
        hidden, _ = direct(teacher, sample.input_ids)
        assert sorted(sample.states) == [1, 2, 3, 4]
        for layer, h in sample.states.items():
            assert h.shape == hidden[layer].shape
            torch.testing.assert_close(h, hidden[layer], rtol=0, atol=1e-5)


def test_bf16_and_fp16_states_are_the_fp32_states_rounded(caches):
    fp32 = all_samples(caches["fp32"][1])
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        reader = caches[dtype][1]
        raw = reader.root["shards/00000/states/4"]
        assert raw.dtype == (np.uint16 if dtype == "bf16" else np.float16)
        for ref, sample in zip(fp32, all_samples(reader), strict=True):
            assert np.array_equal(ref.input_ids, sample.input_ids)
            for layer, h in sample.states.items():
                expected = ref.states[layer].to(torch_dtype).float()
                assert torch.equal(h, expected), f"{dtype} sample {sample.index} layer {layer}"
                assert not torch.equal(h, ref.states[layer])  # rounding did happen: the comparison can fail


def test_int8_states_within_half_a_step(caches):
    fp32 = all_samples(caches["fp32"][1])
    reader = caches["int8"][1]
    assert reader.root["shards/00000/states/4"].dtype == np.int8
    for ref, sample in zip(fp32, all_samples(reader), strict=True):
        for layer, h in sample.states.items():
            exact = ref.states[layer]
            scale = exact.abs().amax(dim=-1) / 127.0  # per-token absmax scale
            err = (h - exact).abs().amax(dim=-1)
            assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-7), f"int8 sample {sample.index} layer {layer}"
            assert torch.all(err > 0)  # quantised: not the fp32 values themselves
    stored_scale = reader.root["shards/00000/states/4.scale"][...]
    first = fp32[0].states[4]
    np.testing.assert_allclose(stored_scale[:len(first)], (first.abs().amax(-1) / 127).numpy(), rtol=1e-6)


# --- 2. head ---------------------------------------------------------------------------------------


def assert_head_reproduces_logits(reader: CacheReader, model, atol=1e-5) -> None:
    last = reader.meta["teacher"]["n_layers"]
    samples = all_samples(reader)
    assert samples
    for sample in samples:
        _, logits = direct(model, sample.input_ids)
        recomputed = reader.head(sample.states[last])
        assert recomputed.shape == logits.shape == (sample.n_tokens, reader.meta["teacher"]["vocab_size"])
        torch.testing.assert_close(recomputed, logits, rtol=1e-5, atol=atol)


def test_head_reproduces_llama_logits(caches, teacher):
    reader = caches["fp32_b1"][1]
    head = reader.head
    assert head.bias is None and head.softcap is None and head.scale == 1.0
    assert torch.equal(head.weight, teacher.lm_head.weight.detach())
    assert_head_reproduces_logits(reader, teacher)
    assert_head_reproduces_logits(caches["fp32"][1], teacher)


def gemma2(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, final_logit_softcapping=0.5,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "tied_llama", "gemma2_softcap"])
def test_head_reproduces_logits_of_other_teachers(kind, tmp_path, bl_tok):
    build = {"gpt2": lambda: tiny.tiny_gpt2(bl_tok), "tied_llama": lambda: tiny.tiny_llama(bl_tok, tie=True),
             "gemma2_softcap": lambda: gemma2(bl_tok)}[kind]
    folder = tiny.save_tiny_model(tmp_path / "teacher", bl_tok, build())
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    summary, reader = run(folder, data, tmp_path / "cache.zarr", dtype="fp32", batch_size=2)
    model = load_causal_lm(str(folder), "fp32", "cpu")
    assert summary.samples == 3 and reader.meta["config"]["data"]["format"] == "alpaca"
    assert reader.meta["config"]["data"]["template"] == {"with_input": ALPACA_PROMPT_WITH_INPUT,
                                                         "without_input": ALPACA_PROMPT}
    for sample, record in zip(all_samples(reader), ALPACA, strict=True):  # the Alpaca template, its end kept
        template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input"))
        assert sample.text == prompt[len(prompt) - sample.prompt_chars:] + record["output"]
        assert sample.prompt_chars > len("### Response:\n")
    assert_head_reproduces_logits(reader, model)
    head = reader.head
    if kind == "gemma2_softcap":
        assert head.softcap == 0.5 and reader.meta["teacher"]["head"]["softcap"] == 0.5
        sample = reader[0]
        _, logits = direct(model, sample.input_ids)
        uncapped = dataclasses.replace(head, softcap=None)(sample.states[2])
        assert (uncapped - logits).abs().max() > 1e-2  # the cap matters here: the test would see it missing
    else:
        assert head.softcap is None
        # tied heads are the input embeddings
        assert torch.equal(head.weight, model.get_input_embeddings().weight.detach())


# --- 3. layers ---------------------------------------------------------------------------------------


def test_default_and_requested_layers(caches):
    assert caches["bf16"][1].layers == [2, 3, 4] and caches["bf16"][0].layers == [2, 3, 4]
    assert sorted(caches["bf16"][1].root["shards/00000/states"].array_keys()) == ["2", "3", "4"]
    assert caches["fp16"][1].layers == [1, 4]  # the last layer is always stored
    assert sorted(caches["fp16"][1].root["shards/00001/states"].array_keys()) == ["1", "4"]
    int8_keys = sorted(caches["int8"][1].root["shards/00000/states"].array_keys())
    assert int8_keys == ["2", "2.scale", "3", "3.scale", "4", "4.scale"]


@pytest.mark.parametrize("layers", [[5], [2, -1]])
def test_out_of_range_layer_is_refused_before_writing(layers, tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "cache.zarr"
    with pytest.raises(ValueError, match=r"out of range: the teacher has layers 0\.\.4") as e:
        run(tiny_teacher_dir, data_file, out, layers=layers, skip_invalid=True)
    assert str([l for l in layers if not 0 <= l <= 4]) in str(e.value)
    assert not out.exists()


# --- 4. content --------------------------------------------------------------------------------------


def test_cache_content_matches_the_library(caches, tiny_teacher_dir, data_file):
    summary, reader = caches["fp32_b1"]
    tok = load_tokenizer(str(tiny_teacher_dir))
    dataset = load_records(data_file, tokenizer=tok, skip_invalid=True)
    encoded = [encode_record(tok, r, MAX_LENGTH, MAX_PROMPT, True) for r in dataset.records]
    assert [r.line for r in dataset.records] == SOURCE_LINES
    assert summary.samples == len(reader) == 8 and summary.shards == 3 and summary.shards_reused == 0
    assert summary.skipped_invalid == 1 and summary.dropped_no_response == 0
    assert summary.truncated == sum(e.truncated for e in encoded) == 1
    assert summary.tokens == sum(len(e.input_ids) for e in encoded) == reader.meta["n_tokens"]
    assert [int(reader.root[f"shards/{k:05d}"].attrs["n_samples"]) for k in range(3)] == [3, 3, 2]

    segmenter = Segmenter()
    samples = all_samples(reader)
    for i, (sample, enc) in enumerate(zip(samples, encoded, strict=True)):
        assert sample.index == i
        assert sample.source_line == SOURCE_LINES[i]
        assert sample.text == enc.text and sample.prompt_chars == enc.prompt_chars
        assert sample.n_prompt_tokens == enc.n_prompt_tokens
        assert sample.input_ids.dtype == np.int32 and np.array_equal(sample.input_ids, enc.input_ids)
        assert np.array_equal(sample.offsets, enc.offsets)
        seg = segmenter.segment(sample.text, sample.prompt_chars)
        assert len(seg.words) > 0 and len(seg.phrases) > 0
        assert np.array_equal(sample.words, seg.words) and np.array_equal(sample.word_labels, seg.word_labels)
        assert np.array_equal(sample.phrases, seg.phrases) and np.array_equal(sample.phrase_labels, seg.phrase_labels)
        assert np.array_equal(sample.word_tokens, spans_to_token_ranges(sample.text, sample.offsets, seg.words))
        assert np.array_equal(sample.phrase_tokens, spans_to_token_ranges(sample.text, sample.offsets, seg.phrases))
    assert "café" in samples[5].text  # utf-8 text round-trips; offsets are in characters
    assert samples[5].offsets[-2, 1] == len(samples[5].text)
    assert samples[4].text == "Describe your morning.\nI have been running every morning."  # first reference
    long = samples[7]
    assert long.n_tokens == MAX_LENGTH and long.n_prompt_tokens == MAX_PROMPT  # cut on both sides
    assert long.input_ids[-1] != tok.eos_token_id and samples[0].input_ids[-1] == tok.eos_token_id


def assert_same_sample(a, b) -> None:
    assert a.index == b.index and a.text == b.text and a.source_line == b.source_line
    assert a.prompt_chars == b.prompt_chars and a.n_prompt_tokens == b.n_prompt_tokens
    for name in ("input_ids", "offsets", "words", "word_tokens", "word_labels", "phrases", "phrase_tokens",
                 "phrase_labels", "topk_ids", "topk_logprobs", "topk_rest"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), name
    assert sorted(a.states) == sorted(b.states)
    for layer in a.states:
        assert torch.equal(a.states[layer], b.states[layer])


@pytest.mark.parametrize("name", ["fp32_b1", "int8"])
def test_random_access_equals_shard_reads(name, caches):
    reader = caches[name][1]
    samples = all_samples(reader)
    assert len(reader) == len(samples) == 8 and len(reader.shard_indices) == 3
    for i in [7, 0, 3, 2, 5, 1, 6, 4]:
        assert_same_sample(reader[i], samples[i])
    assert sorted(reader.sample(4, layers=[4]).states) == [4]
    with pytest.raises(IndexError, match="holds 8 samples"):
        reader[8]


def test_top_k(caches, teacher):
    reader = caches["fp32_b1"][1]
    assert reader.meta["config"]["top_k"] == 5
    for sample in all_samples(reader):
        _, logits = direct(teacher, sample.input_ids)
        logprobs = torch.log_softmax(logits, dim=-1)
        values, ids = logprobs.topk(5, dim=-1)
        assert sample.topk_ids.shape == (sample.n_tokens, 5) and sample.topk_ids.dtype == np.int32
        assert np.array_equal(sample.topk_ids, ids.numpy())
        np.testing.assert_allclose(sample.topk_logprobs, values.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(sample.topk_rest, 1 - values.exp().sum(-1).numpy(), rtol=0, atol=1e-5)
        assert np.all(sample.topk_rest > 0)
    assert all_samples(caches["fp32"][1])[0].topk_ids is None


# --- 5. the CLI ----------------------------------------------------------------------------------------

GOOD = {"prompt": "Name three primary colors.\n", "output": "Red, blue and yellow."}


def cli(*args):
    from mta_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def extract_args(teacher, data, out, *extra):
    return ("extract", "--teacher", teacher, "--data", data, "--out", out, "--max-length", MAX_LENGTH,
            "--max-prompt-length", MAX_PROMPT, "--device", "cpu", *extra)


@pytest.mark.parametrize("line, field, message", [
    ('{"prompt": "x", "output": ', None, "invalid JSON"),
    ({"prompt": "Name a color.\n"}, "output", "missing"),
    ({"prompt": 5, "output": "Red."}, "prompt", "expected a string, got int"),
    ({"prompt": "Name a color.\n", "output": "  "}, "output", "the response is empty"),
])
def test_cli_rejects_bad_input_and_writes_nothing(line, field, message, tmp_path, tiny_teacher_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    out = tmp_path / "cache.zarr"
    result = cli(*extract_args(tiny_teacher_dir, data, out))
    assert result.exit_code == 1, result.output
    error = result.stderr
    assert f"{data}:3: " in error  # file and 1-based line (line 2 is blank)
    if field:
        assert f"field {field!r}: {message}" in error
    else:
        assert message in error
    assert "--skip-invalid" in error
    assert not out.exists()


def test_cli_skip_invalid_reports_the_count(tmp_path, tiny_teacher_dir):
    data = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"prompt": "x"}, {"prompt": 1, "output": "y"}, GOOD])
    out = tmp_path / "cache.zarr"
    result = cli(*extract_args(tiny_teacher_dir, data, out, "--skip-invalid", "--json", "--dtype", "fp16"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_invalid"] == 2 and summary["samples"] == 2 and summary["layers"] == [2, 3, 4]
    assert summary["tokens"] > 0 and summary["bytes_written"] > 0 and summary["shards"] == 1
    reader = CacheReader(out)
    assert len(reader) == 2 and [reader[i].source_line for i in range(2)] == [1, 4]
    assert reader.meta["data"]["skipped_invalid"] == 2 and reader.state_dtype == "fp16"


def test_cli_dry_run_writes_nothing(tmp_path, tiny_teacher_dir, data_file):
    out = tmp_path / "cache.zarr"
    result = cli(*extract_args(tiny_teacher_dir, data_file, out, "--skip-invalid", "--dry-run", "--json",
                               "--top-k", "5"))
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    tok = load_tokenizer(str(tiny_teacher_dir))
    records = load_records(data_file, tokenizer=tok, skip_invalid=True).records
    expected_tokens = sum(len(encode_record(tok, r, MAX_LENGTH, MAX_PROMPT).input_ids) for r in records)
    assert figures["tokens"] == expected_tokens and figures["samples"] == 8 and figures["skipped_invalid"] == 1
    assert figures["layers"] == [2, 3, 4] and figures["truncated"] == 1
    # bf16: 3 layers x 48 x 2 bytes + ids and offsets (12) + top-5 (8 x 5 + 4)
    assert figures["raw_bytes_per_token"] == 3 * 48 * 2 + 12 + 44
    # the head counts as stored: its raw fp32 size times the compression measured on a real head
    assert figures["est_total_bytes"] > figures["head_bytes"] == int(len(tok) * 48 * 4 * HEAD_COMPRESSION_ESTIMATE)
    assert not out.exists()


def test_cli_extract_help_has_an_example():
    result = cli("extract", "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and "mta extract --teacher" in result.stdout


# --- 2b. a head with a bias, a scale, a soft-cap ---------------------------------------------------------


def phi_with_a_head_bias(tok):
    """Phi's output head has a bias; a random one (HF initialises it to zero) so that dropping it shows."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()
    return model


def cohere_with_a_logit_scale(tok):
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          logit_scale=0.25, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.eos_token_id)
    return CohereForCausalLM(config).eval()


@pytest.mark.parametrize("kind,teacher_dtype", [("phi_bias", "fp32"), ("phi_bias", "bf16"), ("cohere_scale", "fp32")])
def test_head_bias_and_scale_are_read_back_and_reproduce_the_logits(kind, teacher_dtype, tmp_path, bl_tok):
    """The stored head's bias and scale come back from the cache, the weight and bias bit for bit in the
    teacher's precision (as float32), and the head read back reproduces the teacher's own logits (bf16: within
    bf16 rounding); without the bias (the scale) they would be far off."""
    build = {"phi_bias": phi_with_a_head_bias, "cohere_scale": cohere_with_a_logit_scale}[kind]
    folder = tiny.save_tiny_model(tmp_path / "teacher", bl_tok, build(bl_tok))
    _, reader = run(folder, write_jsonl(tmp_path / "alpaca.jsonl", ALPACA[:2]), tmp_path / "cache.zarr",
                    dtype="fp32", teacher_dtype=teacher_dtype, batch_size=2)
    model = load_causal_lm(str(folder), teacher_dtype, "cpu")
    head = reader.head
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, model.lm_head.weight.detach().float())
    sample = reader[0]
    _, logits = direct(model, sample.input_ids)
    last = sample.states[2]
    tolerance = {"fp32": 1e-5, "bf16": 0.05}[teacher_dtype]
    torch.testing.assert_close(head(last), logits.float(), rtol=tolerance, atol=tolerance)
    if kind == "phi_bias":
        assert head.bias is not None and torch.equal(head.bias, model.lm_head.bias.detach().float())
        assert head.scale == 1.0 and head.softcap is None
        assert (dataclasses.replace(head, bias=None)(last) - logits.float()).abs().max() > 0.5
    else:
        assert head.bias is None and head.scale == 0.25 and head.softcap is None
        assert (dataclasses.replace(head, scale=1.0)(last) - logits.float()).abs().max() > 0.5


def test_key_layers_in_int8_and_the_last_in_bf16(caches, tiny_teacher_dir, data_file, tmp_path):
    """--key-dtype int8: the last layer (exact logits) as in the bf16 cache, the others quantised per token."""
    _, mixed = run(tiny_teacher_dir, data_file, tmp_path / "mixed.zarr", dtype="bf16", key_dtype="int8", batch_size=4,
                   skip_invalid=True, shard_size=3)
    _, bf16 = caches["bf16"]
    _, fp32 = caches["fp32"]
    assert mixed.layer_dtypes == {2: "int8", 3: "int8", 4: "bf16"} and mixed.meta["config"]["key_dtype"] == "int8"
    for a, b, exact in zip(all_samples(mixed), all_samples(bf16), all_samples(fp32)):
        assert torch.equal(a.states[4], b.states[4])
        for layer in (2, 3):
            if layer in exact.states:
                step = exact.states[layer].abs().amax(dim=-1, keepdim=True) / 127
                assert torch.all((a.states[layer] - exact.states[layer]).abs() <= step / 2 + 1e-6)
    from mta_cli.cache import inspect as cache_inspect

    assert cache_inspect.verify(mixed.url) == []
    info_mixed, info_bf16 = cache_inspect.info(mixed.url), cache_inspect.info(bf16.url)
    assert info_mixed["bytes_per_token"] < info_bf16["bytes_per_token"]
    assert (info_mixed["state_dtype"], info_mixed["key_dtype"]) == ("bf16", "int8")
    assert (info_bf16["state_dtype"], info_bf16["key_dtype"]) == ("bf16", "bf16")
