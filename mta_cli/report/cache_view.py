"""One cached sample as HTML (`mta cache show --html`, and caches given to `mta report`): the text with its
noun and verb phrases underlined in colour, its words boxed, the prompt in grey, and every teacher token
shaded by its importance weight at one cached layer (method.md §2, the weights that pool spans in DSA and
weigh tokens in Hid). Hovering a token shows its index and weight."""

from __future__ import annotations

from html import escape

import numpy as np
import torch

from mta_cli.cache.reader import CacheReader
from mta_cli.losses import importance_weights
from mta_cli.segment import PHRASE_LABELS

SHADE = (255, 150, 0)  # orange; opacity = weight / the sample's largest weight

STYLE = """
.sample { white-space: pre-wrap; line-height: 2.1; font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 14px; border: 1px solid #ddd; border-radius: 6px; padding: 14px 16px; background: #fff; }
.sample .prompt { color: #777; }
.sample .np { border-bottom: 3px solid #2f6fdb; padding-bottom: 1px; }
.sample .vp { border-bottom: 3px solid #27a243; padding-bottom: 1px; }
.sample .w { outline: 1px solid rgba(0, 0, 0, 0.28); outline-offset: -1px; border-radius: 2px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 22px; align-items: center; font-size: 13px; margin: 8px 0; }
.legend .scale { display: inline-block; width: 120px; height: 12px; vertical-align: middle; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba(255,150,0,0), rgba(255,150,0,1)); }
"""


def default_layer(reader: CacheReader) -> int:
    """The lowest cached layer: the word layer of `mta train`'s default schedule."""
    return min(reader.layers)


def sample_view(url: str, index: int = 0, layer: int | None = None) -> tuple[str, str]:
    """(heading, HTML fragment) of sample `index` of the cache at `url`, shaded by the importance weights of
    teacher layer `layer` (default: the lowest cached layer)."""
    reader = CacheReader(url, allow_incomplete=True)
    layer = default_layer(reader) if layer is None else reader.check_layers([layer])[0]
    sample = reader.sample(index, [layer])
    states = sample.states[layer][None]
    weights = importance_weights(states, torch.ones(states.shape[:2], dtype=torch.bool))[0].numpy()
    heading = f"Cache sample {index} of {url}"
    summary = (f"<p>Source line {sample.source_line}; {sample.n_tokens} teacher tokens, {len(sample.words)} words, "
               f"{len(sample.phrases)} phrases. Shading: importance weight of each teacher token at layer {layer} "
               f"(the largest, {weights.max():.4f}, fully shaded; weights sum to 1 over the sample).</p>")
    return heading, summary + _legend() + _marked_text(sample, weights)


def _legend() -> str:
    return ('<div class="legend"><span><span class="np">noun phrase</span></span>'
            '<span><span class="vp">verb phrase</span></span><span><span class="w">word</span></span>'
            '<span class="prompt" style="color:#777">prompt</span> <span>response</span>'
            '<span>importance weight: 0 <span class="scale"></span> max</span></div>')


def _owner(n_chars: int, spans: np.ndarray) -> np.ndarray:
    """For every character, the index of the span [start, end) that covers it, -1 where none does."""
    owner = np.full(n_chars + 1, -1)
    for k, (start, end) in enumerate(spans):
        owner[int(start):int(end)] = k
    return owner


def _marked_text(sample, weights: np.ndarray) -> str:
    """The text cut wherever a token, word, phrase or the prompt begins or ends; phrases enclose words,
    words enclose token pieces, each piece shaded by its token's weight."""
    text, n = sample.text, len(sample.text)
    tokens = _owner(n, sample.offsets)
    words = _owner(n, sample.words)
    phrases = _owner(n, sample.phrases)
    cuts = sorted({0, n, sample.prompt_chars, *sample.offsets.ravel().tolist(), *sample.words.ravel().tolist(),
                   *sample.phrases.ravel().tolist()})
    top = float(weights.max()) or 1.0
    html, open_phrase, open_word = ['<div class="sample">'], -1, -1
    for start, end in zip(cuts, cuts[1:]):
        if not 0 <= start < end <= n:
            continue
        phrase, word, token = int(phrases[start]), int(words[start]), int(tokens[start])
        if open_word >= 0 and (word != open_word or phrase != open_phrase):
            html.append("</span>")
            open_word = -1
        if phrase != open_phrase:
            if open_phrase >= 0:
                html.append("</span>")
            if phrase >= 0:
                label = PHRASE_LABELS[int(sample.phrase_labels[phrase])]
                html.append(f'<span class="{label.lower()}" title="{label} {phrase}">')
            open_phrase = phrase
        if word >= 0 and word != open_word:
            html.append('<span class="w">')
            open_word = word
        piece = escape(text[start:end])
        classes = "prompt" if start < sample.prompt_chars else "response"
        if token >= 0:
            w = float(weights[token])
            shade = f"rgba({SHADE[0]},{SHADE[1]},{SHADE[2]},{w / top:.3f})"
            html.append(f'<span class="{classes}" style="background:{shade}" title="token {token}: '
                        f'w = {w:.4f}">{piece}</span>')
        else:
            html.append(f'<span class="{classes}">{piece}</span>')
    html.append("</span>" * ((open_word >= 0) + (open_phrase >= 0)) + "</div>")
    return "".join(html)
