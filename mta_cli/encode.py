"""Tokenize one record into prompt and response tokens, truncating to a token budget.

The rule, in order:

1. text = prompt + responses[0] is tokenized at once, with the tokenizer's special tokens, so that
   BPE merges across the prompt/response boundary are the same as when the model generates.
2. Special tokens the tokenizer adds before the text (e.g. BOS) are kept and count as prompt tokens.
   Special tokens it adds after the text (e.g. an EOS) count as response tokens.
3. A token of the text is a prompt token iff it ends at or before the end of the prompt; the others,
   including a token that straddles the boundary, are response tokens (training targets).
4. If the prompt has more than max_prompt_length tokens (added special tokens not counted), its earliest
   tokens are dropped: the end of the prompt, where the response header is, is kept. The text is cut
   at the start of the first kept token.
5. If append_eos, the tokenizer has an EOS token and the last token isn't EOS already, an EOS is
   appended as a response token, so the model learns to stop.
6. The sequence is cut on the right to max_length tokens; the text at the end of the last kept token.
7. If no response token is left, the record is dropped (encode_record returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mta_cli.records import Record


@dataclass(frozen=True)
class Encoded:
    """A tokenized record: tokens [0, n_prompt_tokens) are prompt, the rest response targets."""

    input_ids: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int32 [T, 2] char ranges into `text`; (0, 0) for a leading special token,
    #                      (len(text), len(text)) for a trailing one such as an appended EOS
    n_prompt_tokens: int
    text: str  # the (possibly truncated) text the offsets index into
    prompt_chars: int  # text[:prompt_chars] is the (end of the) prompt
    truncated: bool  # the prompt was cut on the left or the sequence on the right


def encode_record(tokenizer, record: Record, max_length: int = 512, max_prompt_length: int = 256,
                  append_eos: bool = True) -> Encoded | None:
    """Tokenize `record` with the rule of the module docstring; None when no response token fits."""
    if max_length < 1 or max_prompt_length < 0:
        raise ValueError(f"need max_length >= 1 and max_prompt_length >= 0, got {max_length} and {max_prompt_length}")
    text, prompt_chars = record.text, len(record.prompt)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)

    # tokens the tokenizer added around the text: special ids that cover no characters
    added = np.isin(ids, tokenizer.all_special_ids) & (offsets[:, 1] == 0)
    content = np.flatnonzero(~added)
    lead, tail = content[0], content[-1] + 1  # text tokens are [lead, tail)
    offsets[tail:] = len(text)
    in_response = offsets[lead:tail, 1] > prompt_chars
    if not in_response.any():
        return None
    n_prompt = lead + int(np.argmax(in_response))  # the first token that ends past the prompt

    drop = n_prompt - lead - max_prompt_length
    if drop > 0:
        cut = offsets[lead + drop, 0]
        ids = np.concatenate([ids[:lead], ids[lead + drop:]])
        offsets = np.concatenate([offsets[:lead], offsets[lead + drop:] - cut])
        text, prompt_chars = text[cut:], prompt_chars - cut
        n_prompt, tail = n_prompt - drop, tail - drop

    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and ids[-1] != eos:
        ids = np.append(ids, np.int32(eos))
        offsets = np.concatenate([offsets, np.array([[len(text), len(text)]], dtype=np.int32)])

    cut_right = len(ids) > max_length
    if cut_right:
        ids, offsets = ids[:max_length], offsets[:max_length]
        if max_length < tail:
            text = text[:offsets[-1, 1]]
    if n_prompt >= len(ids):
        return None
    return Encoded(ids, offsets, int(n_prompt), text, prompt_chars, bool(drop > 0 or cut_right))
