import hashlib
import json
import pickle
from pathlib import Path

import pytest

from mta_cli.records import (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, DataError, Record,
                             load_records)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "instructions.jsonl"
DOLLY_DEV = Path("/work/shared/data/dolly/dev.jsonl")


def write(tmp_path, lines, name="data.jsonl"):
    """Write JSONL lines (dicts are dumped, strings written as they are) and return the path."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_prompt_format(tmp_path):
    path = write(tmp_path, [
        {"prompt": "Q: 2+2?\nA:", "output": " 4", "instruction": "ignored"},
        "",
        {"prompt": "Q: colors?\nA:", "output": [" red", " blue"]},
    ])
    ds = load_records(path)
    assert ds.format == "prompt" and ds.path == str(path) and ds.skipped == []
    assert ds.records == [Record("Q: 2+2?\nA:", (" 4",), 1), Record("Q: colors?\nA:", (" red", " blue"), 3)]
    assert ds.records[1].text == "Q: colors?\nA: red"


def test_alpaca_format(tmp_path):
    path = write(tmp_path, [
        {"instruction": "Name a color.", "output": "Red."},
        {"instruction": "Summarize.", "input": "Long text.", "output": ["Short.", "Brief."]},
        {"instruction": "Summarize.", "context": "Other text.", "response": "Shorter."},
        {"instruction": "Name a fruit.", "input": "  \n", "output": "Apple."},
        {"instruction": "Name a tree.", "input": None, "output": "Oak."},
    ])
    r = load_records(path).records
    assert r[0].prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert r[0].responses == ("Red.",)
    assert r[1].prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize.\n\n### Input:\nLong text.\n\n### Response:\n")
    assert r[1].responses == ("Short.", "Brief.")
    assert r[2].prompt == ALPACA_PROMPT_WITH_INPUT.format(instruction="Summarize.", input="Other text.")
    assert r[2].responses == ("Shorter.",)
    assert r[3].prompt == ALPACA_PROMPT.format(instruction="Name a fruit.")  # blank input: no input section
    assert r[4].prompt == ALPACA_PROMPT.format(instruction="Name a tree.")
    assert [x.line for x in r] == [1, 2, 3, 4, 5]


def test_chat_format(tmp_path, bl_tok):
    path = write(tmp_path, [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
    ]}])
    ds = load_records(path, tokenizer=bl_tok)
    assert ds.format == "chat"
    assert ds.records[0].prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")
    assert ds.records[0].responses == ("Red.",)


def test_chat_needs_tokenizer_with_template(tmp_path, sp_tok):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(DataError, match=r"data\.jsonl:1: chat records need a tokenizer"):
        load_records(path, skip_invalid=True)  # not a record problem: never skipped
    with pytest.raises(DataError, match="no chat template"):
        load_records(path, tokenizer=sp_tok)


def test_auto_detect_is_per_file(tmp_path, bl_tok):
    a = write(tmp_path, [{"instruction": "Name a color.", "output": "Red."}], "a.jsonl")
    p = write(tmp_path, [{"prompt": "Color:", "output": " red"}], "p.jsonl")
    c = write(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
              "c.jsonl")
    assert [load_records(f, tokenizer=bl_tok).format for f in (a, p, c)] == ["alpaca", "prompt", "chat"]


def test_format_is_fixed_by_first_record(tmp_path):
    path = write(tmp_path, [{"instruction": "Name a color.", "output": "Red."}, {"prompt": "Color:", "output": " red"}])
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.line == 2 and e.value.field == "instruction"
    assert "detected as 'alpaca'" in str(e.value) and "looks like 'prompt'" in str(e.value)


def test_forced_format_mismatch(tmp_path):
    path = write(tmp_path, [{"instruction": "Name a color.", "output": "Red."}])
    with pytest.raises(DataError) as e:
        load_records(path, fmt="prompt")
    msg = str(e.value)
    assert msg.startswith(f"{path}:1: field 'prompt': missing")
    assert "forced with --format" in msg and "looks like 'alpaca'" in msg
    assert load_records(path, fmt="alpaca").format == "alpaca"
    with pytest.raises(ValueError, match="unknown data format 'jsonl'"):
        load_records(path, fmt="jsonl")


GOOD_PROMPT = {"prompt": "P", "output": "O"}
GOOD_ALPACA = {"instruction": "I", "output": "O"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}


def chat(*messages):
    return {"messages": list(messages)}


BAD = [  # (lines, line of the error, field, part of the message)
    ([GOOD_PROMPT, '{"prompt": "P", "output": }'], 2, None, "invalid JSON: Expecting value"),
    ([GOOD_PROMPT, "", '["P", "O"]'], 3, None, "expected a JSON object, got list"),
    (['{"text": "hello"}'], 1, None, "cannot detect the format"),
    ([GOOD_PROMPT, {"prompt": "P"}], 2, "output", "missing"),
    ([GOOD_PROMPT, {"prompt": 3, "output": "O"}], 2, "prompt", "expected a string, got int"),
    ([GOOD_PROMPT, {"prompt": "P", "output": 5}], 2, "output", "expected a string or a list of strings, got int"),
    ([GOOD_PROMPT, {"prompt": "P", "output": None}], 2, "output", "got null"),
    ([GOOD_PROMPT, {"prompt": "P", "output": " \n"}], 2, "output", "the response is empty"),
    ([GOOD_PROMPT, {"prompt": "P", "output": []}], 2, "output", "the list of responses is empty"),
    ([GOOD_PROMPT, {"prompt": "P", "output": ["a", 3]}], 2, "output[1]", "expected a string, got int"),
    ([GOOD_PROMPT, {"prompt": "P", "output": ["a", ""]}], 2, "output[1]", "the response is empty"),
    ([GOOD_ALPACA, {"output": "O"}], 2, "instruction", "missing"),
    ([GOOD_ALPACA, {"instruction": ["I"], "output": "O"}], 2, "instruction", "expected a string, got list"),
    ([GOOD_ALPACA, {"instruction": "I", "input": 1.5, "output": "O"}], 2, "input", "expected a string, got float"),
    ([GOOD_ALPACA, {"instruction": "I", "context": {}, "output": "O"}], 2, "context", "got object"),
    ([GOOD_ALPACA, {"instruction": "I"}], 2, "output", "missing (or its alias 'response')"),
    ([GOOD_ALPACA, {"instruction": "I", "response": ""}], 2, "response", "the response is empty"),
    ([GOOD_CHAT, {"messages": "hi"}], 2, "messages", "expected a list of messages, got string"),
    ([GOOD_CHAT, {"messages": []}], 2, "messages", "the list of messages is empty"),
    ([GOOD_CHAT, chat("hi", {"role": "assistant", "content": "A"})], 2, "messages[0]", "got string"),
    ([GOOD_CHAT, chat({"content": "U"}, {"role": "assistant", "content": "A"})], 2, "messages[0].role", "missing"),
    ([GOOD_CHAT, chat({"role": "user"}, {"role": "assistant", "content": "A"})], 2, "messages[0].content", "missing"),
    ([GOOD_CHAT, chat({"role": "user", "content": ["U"]}, {"role": "assistant", "content": "A"})], 2,
     "messages[0].content", "expected a string, got list"),
    ([GOOD_CHAT, chat({"role": "user", "content": "U"})], 2, "messages[0].role", "the last message must be"),
    ([GOOD_CHAT, chat({"role": "user", "content": "U"}, {"role": "assistant", "content": " "})], 2,
     "messages[1].content", "the response is empty"),
    ([GOOD_CHAT, chat({"role": "assistant", "content": "A"})], 2, "messages", "at least one message before"),
    ([GOOD_PROMPT, {**GOOD_PROMPT, "generated_by": "m"}], 2, "generated_by", "strings 'model' and 'weights_sha256'"),
    ([GOOD_PROMPT, {**GOOD_PROMPT, "generated_by": {"model": "m"}}], 2, "generated_by", 'got {"model": "m"}'),
]


@pytest.mark.parametrize("lines,line,field,fragment", BAD)
def test_bad_records(tmp_path, bl_tok, lines, line, field, fragment):
    path = write(tmp_path, lines, "bad.jsonl")
    with pytest.raises(DataError) as e:
        load_records(path, tokenizer=bl_tok)
    err = e.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    msg = str(err)
    where = f"{path}:{line}: " + (f"field '{field}': " if field else "")
    assert msg.startswith(where), msg
    assert fragment in msg
    assert msg.endswith("Fix the record, or pass --skip-invalid to skip invalid records.")


def test_unknown_keys_are_ignored_and_generated_by_is_collected(tmp_path, bl_tok):
    """Every format takes records with extra keys (those `mta generate` writes, say); the distinct
    "generated_by" values of a file are collected in first-seen order, None for a file without any."""
    extra = {"source_line": 7, "seed": 10, "note": {"any": ["thing"]}}
    a = {"model": "/m/student", "weights_sha256": "ab" * 32}
    b = {"model": "teacher", "weights_sha256": "cd" * 32}
    for good in (GOOD_PROMPT, GOOD_ALPACA, GOOD_CHAT):
        plain = load_records(write(tmp_path, [good]), tokenizer=bl_tok)
        ds = load_records(write(tmp_path, [{**good, **extra, "generated_by": a}, {**good, "generated_by": b},
                                           {**good, "generated_by": dict(reversed(a.items()))}, good]),
                          tokenizer=bl_tok)
        assert ds.records == [Record(r.prompt, r.responses, line) for r in plain.records for line in (1, 2, 3, 4)]
        assert ds.generated_by == [a, b] and plain.generated_by is None
    skipped = load_records(write(tmp_path, [GOOD_PROMPT, {"prompt": "P", "output": "", "generated_by": a}]),
                           skip_invalid=True)
    assert skipped.generated_by is None and len(skipped.skipped) == 1


def test_bad_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "P", "output": "O"}\n{"prompt": "caf\xe9", "output": "O"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_records(path)


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "P", "output": "O"}\r\n{"prompt": "Q", "output": "R"}\r\n')
    assert [r.prompt for r in load_records(path).records] == ["P", "Q"]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_records(tmp_path / "missing.jsonl")
    for content in ("", "\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty"):
            load_records(path)


def test_skip_invalid(tmp_path):
    path = write(tmp_path, [
        {"prompt": "A", "output": "1"},
        {"prompt": "B", "output": 2},
        "not json",
        {"prompt": "C", "output": ["3"]},
        {"prompt": "D", "output": ""},
    ])
    with pytest.raises(DataError, match=":2: field 'output'"):
        load_records(path)
    ds = load_records(path, skip_invalid=True)
    assert [r.prompt for r in ds.records] == ["A", "C"]
    assert [(e.line, e.field) for e in ds.skipped] == [(2, "output"), (3, None), (5, "output")]
    assert pickle.loads(pickle.dumps(ds)).skipped[0].line == 2


def test_skip_invalid_all_invalid(tmp_path):
    path = write(tmp_path, [{"prompt": "A", "output": 1}, "[]"])
    with pytest.raises(DataError) as e:
        load_records(path, skip_invalid=True)
    assert str(e.value).startswith(f"{path}: no valid records: all 2 are invalid; the first: {path}:1: field 'output'")
    assert "--skip-invalid" not in str(e.value)


def test_sha256(tmp_path):
    path = write(tmp_path, [GOOD_PROMPT, GOOD_PROMPT])
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_records(path).sha256 == expected


def test_examples_file():
    ds = load_records(EXAMPLES)
    assert ds.format == "alpaca" and ds.skipped == [] and len(ds.records) >= 40
    with_input = sum("### Input:\n" in r.prompt for r in ds.records)
    assert 0 < with_input < len(ds.records)


@pytest.mark.skipif(not DOLLY_DEV.exists(), reason="shared Dolly data not present")
def test_dolly_file():
    ds = load_records(DOLLY_DEV)
    assert ds.format == "prompt" and ds.skipped == [] and len(ds.records) > 100
    assert all(r.prompt.endswith("### Response:\n") for r in ds.records)
