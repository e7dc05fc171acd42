"""The online baseline: teacher forward and spaCy in the loop every step, as the research code does.

It produces the very `Batch` the cache would, from the same records, so the two paths can be
compared number for number (correctness) and second for second (what the cache saves).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mta_cli.cache.reader import CachedSample
from mta_cli.encode import Encoded, encode_record
from mta_cli.records import load_records
from mta_cli.segment import Segmenter, spans_to_token_ranges
from mta_cli.teacher import teacher_forward
from mta_cli.training.batches import Batch, bucketed_batches, collate


def live_samples(model, samples: list[Encoded], indices: list[int], segmenter: Segmenter, layers: list[int],
                 pad_id: int, device: torch.device) -> list[CachedSample]:
    """Run spaCy and the teacher on `samples` now; the result has the fields a cache read would have."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
        mask[row, :len(s.input_ids)] = 1
    states = teacher_forward(model, ids.to(device), mask.to(device), layers).states
    out = []
    segmentations = segmenter([s.text for s in samples], [s.prompt_chars for s in samples])
    for row, (s, seg, index) in enumerate(zip(samples, segmentations, indices)):
        n = len(s.input_ids)
        out.append(CachedSample(
            index=index, text=s.text, prompt_chars=s.prompt_chars, source_line=0, input_ids=s.input_ids,
            offsets=s.offsets, n_prompt_tokens=s.n_prompt_tokens,
            words=seg.words, word_tokens=spans_to_token_ranges(s.text, s.offsets, seg.words),
            word_labels=seg.word_labels, phrases=seg.phrases,
            phrase_tokens=spans_to_token_ranges(s.text, s.offsets, seg.phrases), phrase_labels=seg.phrase_labels,
            states={layer: states[layer][row, :n].float().cpu() for layer in layers},
        ))
    return out


class OnlineBatches:
    """Batches from a JSONL file with the teacher and spaCy run at every step."""

    def __init__(self, model, tokenizer, data: str, batch_size: int, layers: list[int], seed: int,
                 device: torch.device, max_length: int = 512, max_prompt_length: int = 256,
                 segmenter: Segmenter | None = None):
        self.model, self.batch_size, self.layers, self.seed, self.device = model, batch_size, layers, seed, device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        dataset = load_records(data, tokenizer=tokenizer)
        encoded = (encode_record(tokenizer, r, max_length, max_prompt_length) for r in dataset.records)
        self.samples = [e for e in encoded if e is not None]
        self.segmenter = segmenter or Segmenter()

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        lengths = np.array([len(s.input_ids) for s in self.samples])
        return bucketed_batches(np.arange(len(self.samples)), lengths, self.batch_size, rng)

    def batches_per_epoch(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        for batch in self.epoch_plan(epoch)[skip:]:
            samples = live_samples(self.model, [self.samples[i] for i in batch], batch, self.segmenter,
                                   self.layers, self.pad_id, self.device)
            yield collate(samples, self.pad_id)
