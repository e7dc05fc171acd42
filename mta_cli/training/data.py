"""Batches from a JSONL file, for training without a cache.

The records are read and checked once (`load_records`: a bad record stops the run with its file, line and
field) and encoded with the rule of `encode_record` (--max-length, --max-prompt-length); each epoch's order is
a seeded, length-bucketed plan that depends only on (seed, epoch, lengths), so a resumed run continues exactly.

With a `LiveTeacher` (the online baseline) spaCy and the teacher run on every batch, as the research code
does, and the batch is the very `Batch` the cache would give for the same records: the two paths can be
compared number for number (correctness) and second for second (what the cache saves). Without one (SFT on
--data alone) a batch holds tokens and labels only: no teacher forward, no spaCy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from mta_cli.cache.reader import CachedSample
from mta_cli.encode import Encoded, encode_record
from mta_cli.records import SKIP_HINT, DataError, load_records
from mta_cli.segment import Segmenter, spans_to_token_ranges
from mta_cli.teacher import teacher_forward
from mta_cli.training.batches import Batch, bucketed_batches, collate

NO_SPANS = np.zeros((0, 2), dtype=np.int32)
NO_LABELS = np.zeros(0, dtype=np.uint8)


def token_sample(sample: Encoded, index: int) -> CachedSample:
    """A sample with its tokens only (no spans, no teacher states): all that SFT reads."""
    return CachedSample(index=index, text=sample.text, prompt_chars=sample.prompt_chars, source_line=0,
                        input_ids=sample.input_ids, offsets=sample.offsets, n_prompt_tokens=sample.n_prompt_tokens,
                        words=NO_SPANS, word_tokens=NO_SPANS, word_labels=NO_LABELS, phrases=NO_SPANS,
                        phrase_tokens=NO_SPANS, phrase_labels=NO_LABELS)


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
        out.append(replace(
            token_sample(s, index),
            words=seg.words, word_tokens=spans_to_token_ranges(s.text, s.offsets, seg.words),
            word_labels=seg.word_labels, phrases=seg.phrases,
            phrase_tokens=spans_to_token_ranges(s.text, s.offsets, seg.phrases), phrase_labels=seg.phrase_labels,
            states={layer: states[layer][row, :n].float().cpu() for layer in layers},
        ))
    return out


@dataclass
class LiveTeacher:
    """The online baseline's teacher, run with spaCy on every batch; `layers` are the teacher layers kept."""

    model: torch.nn.Module
    layers: list[int]
    device: torch.device
    segmenter: Segmenter


class DataBatches:
    """Deterministic, resumable batches from a JSONL file, with or without a live teacher (module docstring).

    `dropped` counts the records left with no response token by the truncation rule."""

    def __init__(self, tokenizer, data: str, batch_size: int, seed: int, max_length: int = 512,
                 max_prompt_length: int = 256, teacher: LiveTeacher | None = None):
        self.batch_size, self.seed, self.teacher = batch_size, seed, teacher
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            records = load_records(data, tokenizer=tokenizer).records
        except DataError as e:  # train reads every record: there is no --skip-invalid to suggest
            if e.hint != SKIP_HINT:
                raise
            raise DataError(e.path, e.message, e.line, e.field, hint="Fix the record.") from None
        encoded = (encode_record(tokenizer, r, max_length, max_prompt_length) for r in records)
        self.samples = [e for e in encoded if e is not None]
        self.dropped = len(records) - len(self.samples)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        lengths = np.array([len(s.input_ids) for s in self.samples])
        return bucketed_batches(np.arange(len(self.samples)), lengths, self.batch_size, rng)

    def batches_per_epoch(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, skipping the first `skip` (resume)."""
        for batch in self.epoch_plan(epoch)[skip:]:
            chosen = [self.samples[i] for i in batch]
            if self.teacher is None:
                samples = [token_sample(s, i) for s, i in zip(chosen, batch)]
            else:
                t = self.teacher
                samples = live_samples(t.model, chosen, batch, t.segmenter, t.layers, self.pad_id, t.device)
            yield collate(samples, self.pad_id)
