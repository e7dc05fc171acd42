"""Training batches: collated from cached samples (offline) or from a live teacher (online).

Both paths build the same `Batch` from `CachedSample`s, so the losses cannot tell them apart; this
is what the offline == online tests rely on.

Offline order: each epoch, shards are visited in a seeded random order, `window` shards at a time
(at least 2, and enough full shards to hold a whole batch: a batch never spans two windows, so only
the last batch of a window may be smaller than --batch-size); the window's samples are shuffled,
sorted by length in runs of 32 batches (length bucketing: little padding), cut into batches, and the
batches shuffled. The plan depends only on (seed,
epoch, shard sizes), so a resumed run continues exactly where it stopped. A background thread
reads and decodes the next window while the current one trains. Under torchrun every rank follows the
same plan, reads the same windows and collates only its share of each global batch (`rank_share`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mta_cli.cache.reader import CachedSample, CacheReader, ShardData
from mta_cli.encode import Encoded, encode_record
from mta_cli.records import Record
from mta_cli.segment import spans_to_token_ranges

BUCKET_BATCHES = 32  # batches per length-sorted run


@dataclass
class Batch:
    """A right-padded batch of B samples on the student's token grid (T tokens).

    With the teacher's tokenizer the teacher shares that grid. With another tokenizer the teacher's
    states sit on their own grid (T' tokens): `teacher_mask` and `teacher_spans` describe it, and
    `spans` are the same char spans mapped onto the student's tokens.
    """

    input_ids: torch.Tensor        # int64 [B, T]
    attention_mask: torch.Tensor   # int64 [B, T]
    labels: torch.Tensor           # int64 [B, T]: next-token target at t (= input_ids[t+1]) or -100
    teacher_states: dict[int, torch.Tensor]   # layer -> float32 [B, T', dT]
    spans: list[dict[str, torch.Tensor]]      # per sample {"word": [Kw, 2], "phrase": [Kp, 2]} token ranges
    sample_indices: list[int]
    teacher_mask: torch.Tensor | None = None              # int64 [B, T'], other tokenizer only
    teacher_spans: list[dict[str, torch.Tensor]] | None = None
    topk: dict[str, torch.Tensor] | None = None  # cache with --top-k: ids [B, T, k], logprobs [B, T, k], rest [B, T]
    role: str = "dataset"   # whose responses: "dataset", "teacher" or "student" (see training.mixing)
    source: int = 0         # which of the run's caches the batch comes from
    weight: float = 1.0     # 0: a stand-in, for a rank whose share of a global batch is empty (it must step too)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        def spans_to(spans):
            return None if spans is None else [{k: v.to(device) for k, v in s.items()} for s in spans]

        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     {k: v.to(device, non_blocking=True) for k, v in self.teacher_states.items()},
                     spans_to(self.spans), self.sample_indices,
                     None if self.teacher_mask is None else self.teacher_mask.to(device), spans_to(self.teacher_spans),
                     None if self.topk is None else {k: v.to(device) for k, v in self.topk.items()}, self.role,
                     self.source, self.weight)


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> right-padded ids [B, T] and attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[i, :len(r)] = 1
    return ids, mask


def _labels(ids: torch.Tensor, lengths: list[int], n_prompt: list[int]) -> torch.Tensor:
    """-100 except where position t predicts a response token (t + 1 >= n_prompt)."""
    labels = torch.full_like(ids, -100)
    for row, (n, p) in enumerate(zip(lengths, n_prompt)):
        start = max(p - 1, 0)
        labels[row, start:n - 1] = ids[row, start + 1:n]
    return labels


def _span_tensors(word_ranges: np.ndarray, phrase_ranges: np.ndarray) -> dict[str, torch.Tensor]:
    return {"word": torch.from_numpy(word_ranges.astype(np.int64)),
            "phrase": torch.from_numpy(phrase_ranges.astype(np.int64))}


def collate(samples: list[CachedSample], pad_id: int, student_tokenizer=None, max_length: int = 4096) -> Batch:
    """Pad samples into a Batch; with `student_tokenizer` the texts are re-tokenized for the student
    and the char spans mapped onto its tokens (the teacher keeps its own grid)."""
    teacher_ids, teacher_mask = _pad([s.input_ids for s in samples], pad_id)
    states = {layer: torch.zeros((len(samples), teacher_ids.shape[1], samples[0].states[layer].shape[-1]))
              for layer in samples[0].states}
    for row, s in enumerate(samples):
        for layer in states:
            states[layer][row, :s.n_tokens] = s.states[layer]
    teacher_spans = [_span_tensors(s.word_tokens, s.phrase_tokens) for s in samples]
    indices = [s.index for s in samples]
    if student_tokenizer is None:
        labels = _labels(teacher_ids, [s.n_tokens for s in samples], [s.n_prompt_tokens for s in samples])
        return Batch(teacher_ids, teacher_mask, labels, states, teacher_spans, indices, topk=_topk(samples))
    encoded = [retokenize(s, student_tokenizer, max_length) for s in samples]
    ids, mask = _pad([e.input_ids for e in encoded], student_tokenizer.pad_token_id or 0)
    labels = _labels(ids, [len(e.input_ids) for e in encoded], [e.n_prompt_tokens for e in encoded])
    spans = [_span_tensors(spans_to_token_ranges(e.text, e.offsets, s.words),
                           spans_to_token_ranges(e.text, e.offsets, s.phrases)) for s, e in zip(samples, encoded)]
    return Batch(ids, mask, labels, states, spans, indices, teacher_mask, teacher_spans)


def _topk(samples: list[CachedSample]) -> dict[str, torch.Tensor] | None:
    """The cached sparse teacher log-probs, padded like the tokens (None when the cache has none)."""
    if samples[0].topk_ids is None:
        return None
    width, k = max(s.n_tokens for s in samples), samples[0].topk_ids.shape[1]
    topk = {"ids": torch.zeros((len(samples), width, k), dtype=torch.long),
            "logprobs": torch.zeros((len(samples), width, k)), "rest": torch.zeros((len(samples), width))}
    for row, s in enumerate(samples):
        topk["ids"][row, :s.n_tokens] = torch.from_numpy(s.topk_ids.astype(np.int64))
        topk["logprobs"][row, :s.n_tokens] = torch.from_numpy(s.topk_logprobs)
        topk["rest"][row, :s.n_tokens] = torch.from_numpy(s.topk_rest)
    return topk


def retokenize(sample: CachedSample, tokenizer, max_length: int) -> Encoded:
    """The cached text tokenized for a student with its own tokenizer (same prompt/response split)."""
    record = Record(prompt=sample.text[:sample.prompt_chars], responses=(sample.text[sample.prompt_chars:],),
                    line=sample.source_line)
    encoded = encode_record(tokenizer, record, max_length=max_length, max_prompt_length=max_length - 1)
    if encoded is None or encoded.text != sample.text:
        raise ValueError(f"sample {sample.index}: the student's tokenizer cannot represent the cached text "
                         f"within {max_length} tokens")
    return encoded


def bucketed_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[list[int]]:
    """Shuffle, sort runs of BUCKET_BATCHES batches by length, cut into batches, shuffle the batches."""
    perm = rng.permutation(len(indices))
    indices, lengths = indices[perm], lengths[perm]
    run = batch_size * BUCKET_BATCHES
    batches = []
    for r in range(0, len(indices), run):
        part = indices[r:r + run][np.argsort(lengths[r:r + run], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def rank_share(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """Rank `rank`'s contiguous share of a global batch of sample indices (the shares differ in size by one at
    most) and its weight: 1, or 0 with the batch's first sample as a stand-in when the share is empty (a
    global batch smaller than the number of ranks; every rank must take part in each step)."""
    share = batch[len(batch) * rank // world:len(batch) * (rank + 1) // world]
    return (share, 1.0) if share else (batch[:1], 0.0)


class CacheBatches:
    """Deterministic, resumable, prefetching batches from a cache (see module docstring); `part` = (rank, world)
    collates only that rank's share of each batch."""

    def __init__(self, reader: CacheReader, batch_size: int, layers: list[int], seed: int, pad_id: int,
                 window: int = 2, prefetch: bool = True, student_tokenizer=None, part: tuple[int, int] = (0, 1)):
        self.reader, self.batch_size, self.layers = reader, batch_size, layers
        self.student_tokenizer, self.part = student_tokenizer, part
        self.seed, self.pad_id, self.prefetch = seed, pad_id, prefetch
        reader.check_layers(layers)
        self.lengths = [reader.sample_lengths(p) for p in range(len(reader.shard_indices))]
        shard_size = max((len(l) for l in self.lengths), default=1)
        self.window = max(1, window, -(-batch_size // shard_size))

    def epoch_plan(self, epoch: int) -> list[tuple[list[int], list[list[int]]]]:
        """[(shard positions of a window, batches of global sample indices)] for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        plan = []
        for w in range(0, len(order), self.window):
            positions = order[w:w + self.window]
            indices = np.concatenate([self.reader.shard_starts[p] + np.arange(len(self.lengths[p]))
                                      for p in positions])
            lengths = np.concatenate([self.lengths[p] for p in positions])
            plan.append((positions, bucketed_batches(indices, lengths, self.batch_size, rng)))
        return plan

    def batches_per_epoch(self) -> int:
        return sum(len(b) for _, b in self.epoch_plan(0))

    def _load_window(self, positions: list[int]) -> dict[int, ShardData]:
        return {p: self.reader.read_shard(p, self.layers) for p in positions}

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, skipping the first `skip` (resume); shards are read one window ahead."""
        plan = self.epoch_plan(epoch)
        todo, seen = [], 0
        for positions, batches in plan:
            if seen + len(batches) > skip:
                todo.append((positions, batches[max(0, skip - seen):]))
            seen += len(batches)
        windows = self._windows_in_background(todo) if self.prefetch else \
            ((self._load_window(p), b) for p, b in todo)
        for shards, batches in windows:
            for batch in batches:
                share, weight = rank_share(batch, *self.part)
                collated = collate([self._sample(shards, i) for i in share], self.pad_id, self.student_tokenizer)
                collated.weight = weight
                yield collated

    def _sample(self, shards: dict[int, ShardData], index: int) -> CachedSample:
        for shard in shards.values():
            if shard.first_index <= index < shard.first_index + len(shard):
                return shard[index - shard.first_index]
        raise IndexError(index)

    def _windows_in_background(self, todo):
        """Yield (shards, batches) per window while a thread loads the next window."""
        ready: queue.Queue = queue.Queue(maxsize=1)

        def load() -> None:
            try:
                for positions, batches in todo:
                    ready.put((self._load_window(positions), batches))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                ready.put(e)
            ready.put(None)

        threading.Thread(target=load, daemon=True, name="mta-loader").start()
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
