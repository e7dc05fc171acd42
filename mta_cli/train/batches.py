"""Training batches: collated from cached samples (offline) or from a live teacher (online).

Both paths build the same `Batch` from `CachedSample`s, so the losses cannot tell them apart; this
is what the offline == online tests rely on.

Offline order: each epoch, shards are visited in a seeded random order, `window` shards at a time;
the window's samples are shuffled, sorted by length in runs of 32 batches (length bucketing:
little padding), cut into batches, and the batches shuffled. The plan depends only on (seed,
epoch, shard sizes), so a resumed run continues exactly where it stopped. A background thread
reads and decodes the next window while the current one trains.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mta_cli.cache.reader import CachedSample, CacheReader, ShardData
from mta_cli.cache.layout import shard_name

BUCKET_BATCHES = 32  # batches per length-sorted run


@dataclass
class Batch:
    """A right-padded batch of B samples, T tokens (teacher and student share the token grid)."""

    input_ids: torch.Tensor        # int64 [B, T]
    attention_mask: torch.Tensor   # int64 [B, T]
    labels: torch.Tensor           # int64 [B, T]: next-token target at t (= input_ids[t+1]) or -100
    teacher_states: dict[int, torch.Tensor]   # layer -> float32 [B, T, dT]
    spans: list[dict[str, torch.Tensor]]      # per sample {"word": [Kw, 2], "phrase": [Kp, 2]} token ranges
    sample_indices: list[int]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     {k: v.to(device, non_blocking=True) for k, v in self.teacher_states.items()},
                     [{k: v.to(device) for k, v in s.items()} for s in self.spans], self.sample_indices)


def collate(samples: list[CachedSample], pad_id: int) -> Batch:
    """Pad samples to the longest; labels mark response tokens (those at or after n_prompt_tokens)."""
    width = max(s.n_tokens for s in samples)
    batch = len(samples)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    layers = list(samples[0].states)
    dims = {layer: samples[0].states[layer].shape[-1] for layer in layers}
    states = {layer: torch.zeros((batch, width, dims[layer])) for layer in layers}
    for row, s in enumerate(samples):
        n = s.n_tokens
        ids[row, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
        mask[row, :n] = 1
        start = max(s.n_prompt_tokens - 1, 0)  # position t predicts token t + 1
        labels[row, start:n - 1] = ids[row, start + 1:n]
        for layer in layers:
            states[layer][row, :n] = s.states[layer]
    spans = [{"word": torch.from_numpy(s.word_tokens.astype(np.int64)),
              "phrase": torch.from_numpy(s.phrase_tokens.astype(np.int64))} for s in samples]
    return Batch(ids, mask, labels, states, spans, [s.index for s in samples])


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


class CacheBatches:
    """Deterministic, resumable, prefetching batches from a cache (see module docstring)."""

    def __init__(self, reader: CacheReader, batch_size: int, layers: list[int], seed: int, pad_id: int,
                 window: int = 2, prefetch: bool = True):
        self.reader, self.batch_size, self.layers = reader, batch_size, layers
        self.seed, self.pad_id, self.window, self.prefetch = seed, pad_id, max(1, window), prefetch
        reader._check_layers(layers)
        self.lengths = [np.diff(reader.root[shard_name(i)]["token_ptr"][...]) for i in reader.shard_indices]

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
                samples = [self._sample(shards, i) for i in batch]
                yield collate(samples, self.pad_id)

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
