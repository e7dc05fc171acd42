from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors

from mta_cli.encode import encode_record
from mta_cli.records import Record, load_records
from tests import tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "instructions.jsonl"

# prompts and responses made of the tiny tokenizers' training text, so that no token is <unk>
HEADER = "### Instruction:\nName three primary colors.\n\n### Response:\n"
RESPONSE = "Red, blue and yellow are the primary colors."
LONG_PROMPT = "Tell me about the history of the Roman Empire and its famous emperors. " * 8 + "\n\n### Response:\n"


def lead_count(tok, enc):
    """Number of leading special tokens the tokenizer added (offset (0, 0))."""
    n = 0
    while n < len(enc.input_ids) and enc.input_ids[n] in tok.all_special_ids and tuple(enc.offsets[n]) == (0, 0):
        n += 1
    return n


def assert_offsets(tok, enc):
    """Each text token's offsets select the characters it decodes to (up to a leading space marker)."""
    lead = lead_count(tok, enc)
    assert enc.input_ids.dtype == np.int32 and enc.offsets.dtype == np.int32
    assert enc.offsets.shape == (len(enc.input_ids), 2)
    assert (np.diff(enc.offsets[lead:, 0]) >= 0).all() and (enc.offsets[:, 0] <= enc.offsets[:, 1]).all()
    assert 0 <= enc.offsets.min() and enc.offsets.max() <= len(enc.text)
    for i, (s, e) in enumerate(enc.offsets[lead:].tolist(), start=lead):
        if s == e == len(enc.text):  # appended EOS
            assert i == len(enc.input_ids) - 1 and enc.input_ids[i] == tok.eos_token_id
            continue
        piece = tok.decode([int(enc.input_ids[i])])
        if piece == "":  # a lone "▁" prepended to the first word: it shares that word's first character
            continue
        assert enc.text[s:e].lstrip(" ") == piece.lstrip(" "), (i, s, e)


def assert_split(tok, enc):
    """Prompt tokens end within the prompt chars, response tokens past them."""
    n, lead = enc.n_prompt_tokens, lead_count(tok, enc)
    assert 0 <= enc.prompt_chars < len(enc.text)
    assert (enc.offsets[lead:n, 1] <= enc.prompt_chars).all()
    assert (enc.offsets[n:, 1] > enc.prompt_chars).all()
    assert n < len(enc.input_ids)


def test_split_byte_level(bl_tok):
    record = Record(HEADER, (RESPONSE,), 1)
    enc = encode_record(bl_tok, record)
    n = enc.n_prompt_tokens
    assert enc.text == record.text and enc.prompt_chars == len(HEADER) and not enc.truncated
    assert bl_tok.decode(enc.input_ids[:n]) == HEADER
    assert bl_tok.decode(enc.input_ids[n:-1]) == RESPONSE
    assert enc.offsets[n - 1, 1] == enc.offsets[n, 0] == len(HEADER)  # the boundary falls between tokens
    # one tokenization of the whole text: the same ids as the tokenizer gives, plus the EOS
    assert enc.input_ids[:-1].tolist() == bl_tok(record.text)["input_ids"]
    assert enc.input_ids[-1] == bl_tok.eos_token_id and enc.offsets[-1].tolist() == [len(enc.text)] * 2
    assert_offsets(bl_tok, enc)
    assert_split(bl_tok, enc)


def test_split_sentencepiece_keeps_bos(sp_tok):
    prompt, response = "Name three primary colors. Answer:", " Red, blue and yellow."
    enc = encode_record(sp_tok, Record(prompt, (response,), 1))
    n = enc.n_prompt_tokens
    assert enc.input_ids[0] == sp_tok.bos_token_id and enc.offsets[0].tolist() == [0, 0]
    assert sp_tok.decode(enc.input_ids[1:n]) == prompt
    assert sp_tok.decode(enc.input_ids[n:-1]) == response.lstrip(" ")  # the decoder drops the first "▁"
    s, e = enc.offsets[n]
    assert s == len(prompt) and enc.text[s:e] == " R"
    assert enc.input_ids[-1] == sp_tok.eos_token_id
    assert_offsets(sp_tok, enc)
    assert_split(sp_tok, enc)


def test_token_straddling_the_boundary_is_a_response_token(sp_tok):
    # the tiny sentencepiece tokenizer does not split at "\n": "▁Response:\nRed," crosses the boundary
    enc = encode_record(sp_tok, Record(HEADER, (RESPONSE,), 1))
    s, e = enc.offsets[enc.n_prompt_tokens]
    assert s < len(HEADER) < e and enc.text[s:e] == " Response:\nRed,"
    assert enc.offsets[enc.n_prompt_tokens - 1, 1] <= len(HEADER)
    assert_split(sp_tok, enc)


@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
def test_left_truncation_keeps_prompt_end(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    record = Record(LONG_PROMPT, (RESPONSE,), 1)
    full = encode_record(tok, record, max_prompt_length=1000)
    enc = encode_record(tok, record, max_prompt_length=6)
    lead = lead_count(tok, enc)
    assert lead == (1 if tok_name == "sp_tok" else 0) and lead_count(tok, full) == lead
    assert not full.truncated and enc.truncated
    assert enc.n_prompt_tokens - lead == 6
    # the earliest prompt tokens are dropped, everything else is kept as it was
    kept = len(enc.input_ids) - lead
    assert enc.input_ids[:lead].tolist() == full.input_ids[:lead].tolist()
    assert enc.input_ids[lead:].tolist() == full.input_ids[-kept:].tolist()
    assert record.text.endswith(enc.text) and enc.text.endswith(RESPONSE)
    assert enc.prompt_chars == len(enc.text) - len(RESPONSE)
    assert "### Response:\n" in enc.text[:enc.prompt_chars]
    assert (enc.offsets[lead:] == full.offsets[-kept:] - (len(full.text) - len(enc.text))).all()
    assert_offsets(tok, enc)
    assert_split(tok, enc)


@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
def test_right_truncation(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    record = Record(HEADER, (RESPONSE,), 1)
    full = encode_record(tok, record)
    enc = encode_record(tok, record, max_length=len(full.input_ids) - 3)
    assert enc.truncated and len(enc.input_ids) == len(full.input_ids) - 3
    assert enc.input_ids.tolist() == full.input_ids[:-3].tolist()
    assert enc.input_ids[-1] != tok.eos_token_id
    assert enc.n_prompt_tokens == full.n_prompt_tokens and enc.prompt_chars == full.prompt_chars
    assert enc.text == record.text[:enc.offsets[-1, 1]] and len(enc.text) < len(record.text)
    assert_offsets(tok, enc)
    assert_split(tok, enc)
    # cutting only the appended EOS keeps the text
    no_eos = encode_record(tok, record, max_length=len(full.input_ids) - 1)
    assert no_eos.truncated and no_eos.text == record.text
    assert no_eos.input_ids.tolist() == full.input_ids[:-1].tolist()


def test_both_truncations(bl_tok):
    enc = encode_record(bl_tok, Record(LONG_PROMPT, (RESPONSE,), 1), max_length=10, max_prompt_length=4)
    assert len(enc.input_ids) == 10 and enc.n_prompt_tokens == 4 and enc.truncated
    assert enc.text == "esponse:\nRed, blue and"  # prompt "es" "ponse" ":" "\n", response "Red" "," " b" "lu" "e" " and"
    assert_offsets(bl_tok, enc)
    assert_split(bl_tok, enc)


def test_eos(bl_tok):
    record = Record(HEADER, (RESPONSE,), 1)
    with_eos = encode_record(bl_tok, record)
    without = encode_record(bl_tok, record, append_eos=False)
    assert with_eos.input_ids[:-1].tolist() == without.input_ids.tolist()
    assert bl_tok.eos_token_id not in without.input_ids.tolist() and not without.truncated
    # a response that already ends with EOS gets no second one
    ends = encode_record(bl_tok, Record(HEADER, (RESPONSE + "<|im_end|>",), 1))
    assert ends.input_ids.tolist() == with_eos.input_ids.tolist()
    assert ends.offsets[-1].tolist() == [len(RESPONSE) + len(HEADER), len(ends.text)]


def test_eos_added_by_the_tokenizer():
    tok = tiny.sentencepiece_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    prompt, response = "Name three primary colors. Answer:", " Red, blue and yellow."
    enc = encode_record(tok, Record(prompt, (response,), 1))
    ids = enc.input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert enc.offsets[-1].tolist() == [len(enc.text)] * 2  # (0, 0) from the tokenizer, moved to the end
    assert tok.decode(ids[enc.n_prompt_tokens:-1]) == response.lstrip(" ")
    assert_offsets(tok, enc)
    assert_split(tok, enc)


@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
def test_none_when_no_room_for_the_response(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    record = Record(HEADER, (RESPONSE,), 1)
    n = encode_record(tok, record).n_prompt_tokens
    assert encode_record(tok, record, max_length=n) is None
    assert encode_record(tok, record, max_length=1) is None
    one = encode_record(tok, record, max_length=n + 1)
    assert one.n_prompt_tokens == n and len(one.input_ids) == n + 1 and one.truncated


def test_chat_record(tmp_path, bl_tok):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Name three primary colors."}, '
                    f'{{"role": "assistant", "content": "{RESPONSE}"}}]}}\n')
    record = load_records(path, tokenizer=bl_tok).records[0]
    enc = encode_record(bl_tok, record)
    n = enc.n_prompt_tokens
    assert bl_tok.decode(enc.input_ids[:n]) == record.prompt
    assert record.prompt.endswith("<|im_start|>assistant\n")
    assert bl_tok.decode(enc.input_ids[n:]) == RESPONSE + "<|im_end|>"  # stops like the template's turn end
    assert_offsets(bl_tok, enc)


def test_bad_arguments(bl_tok):
    record = Record(HEADER, (RESPONSE,), 1)
    with pytest.raises(ValueError, match="max_length >= 1"):
        encode_record(bl_tok, record, max_length=0)
    with pytest.raises(ValueError, match="max_prompt_length >= 0"):
        encode_record(bl_tok, record, max_prompt_length=-1)


# (100, 120): a prompt budget above the total one; the examples' prompts have 38 to 305 tokens, so records with
# a short prompt keep a response (with (30, 40) none did, and the loop checked nothing)
@pytest.mark.parametrize("max_length,max_prompt_length", [(512, 256), (48, 20), (100, 120), (12, 0)])
@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
def test_invariants_on_examples(request, tok_name, max_length, max_prompt_length):
    tok = request.getfixturevalue(tok_name)
    records = load_records(EXAMPLES).records
    kept = 0
    for record in records:
        enc = encode_record(tok, record, max_length=max_length, max_prompt_length=max_prompt_length)
        if enc is None:
            continue
        kept += 1
        lead = lead_count(tok, enc)
        assert len(enc.input_ids) <= max_length
        assert enc.n_prompt_tokens - lead <= max_prompt_length
        start = len(record.prompt) - enc.prompt_chars  # where the left cut was
        assert record.text[start:start + len(enc.text)] == enc.text
        assert enc.truncated == (start > 0 or enc.text != record.text or enc.input_ids[-1] != tok.eos_token_id)
        assert_split(tok, enc)
        if tok_name == "bl_tok":  # the tiny sentencepiece vocab maps unseen characters to <unk>
            assert_offsets(tok, enc)
    assert kept > 0  # the invariants were checked on records, not on an empty loop
