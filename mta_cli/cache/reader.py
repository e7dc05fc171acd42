"""Reading an `mta` cache: one sample by index, or whole shards in order (the fast path).

    reader = CacheReader("cache.zarr")
    sample = reader[0]                      # CachedSample: text, ids, spans, states {layer: [T, d]}
    for shard in reader.iter_shards():      # ShardData: every array of a shard, decoded once
        for sample in shard: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np
import torch

from mta_cli.cache.layout import decode_states, shard_name
from mta_cli.cache.store import CacheError, open_root
from mta_cli.losses.kd import LogitHead

RAGGED = {  # array name -> its row-pointer array
    "input_ids": "token_ptr", "offsets": "token_ptr", "text_bytes": "text_ptr",
    "words": "word_ptr", "word_tokens": "word_ptr", "word_labels": "word_ptr",
    "phrases": "phrase_ptr", "phrase_tokens": "phrase_ptr", "phrase_labels": "phrase_ptr",
    "topk_ids": "token_ptr", "topk_logprobs": "token_ptr", "topk_rest": "token_ptr",
}
PER_SAMPLE = ("prompt_chars", "source_line", "n_prompt_tokens")
POINTERS = ("token_ptr", "text_ptr", "word_ptr", "phrase_ptr")


@dataclass
class CachedSample:
    """Everything the cache holds for one sample (T teacher tokens, K spans)."""

    index: int
    text: str
    prompt_chars: int
    source_line: int
    input_ids: np.ndarray        # int32 [T]
    offsets: np.ndarray          # int32 [T, 2] char ranges into text
    n_prompt_tokens: int         # tokens [n_prompt_tokens, T) are training targets
    words: np.ndarray            # int32 [Kw, 2] char spans
    word_tokens: np.ndarray      # int32 [Kw, 2] teacher token ranges
    word_labels: np.ndarray      # uint8 [Kw]
    phrases: np.ndarray          # int32 [Kp, 2]
    phrase_tokens: np.ndarray    # int32 [Kp, 2]
    phrase_labels: np.ndarray    # uint8 [Kp]
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [T, d]
    topk_ids: np.ndarray | None = None        # int32 [T, k]
    topk_logprobs: np.ndarray | None = None   # float32 [T, k]
    topk_rest: np.ndarray | None = None       # float32 [T] probability mass outside the top k

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class ShardData:
    """All arrays of one shard as stored; `shard[j]` slices sample j and decodes its states."""

    def __init__(self, arrays: dict[str, np.ndarray], first_index: int, layers: list[int], state_dtype: str):
        self.arrays = arrays
        self.first_index = first_index
        self.layers = layers
        self.state_dtype = state_dtype

    def states(self, layer: int, t0: int, t1: int) -> torch.Tensor:
        """Decoded float32 states [t1 - t0, d] of one layer; decoding per sample keeps memory at storage size."""
        scale = self.arrays.get(f"states/{layer}.scale")
        return decode_states(self.arrays[f"states/{layer}"][t0:t1], self.state_dtype,
                             None if scale is None else scale[t0:t1])

    def __len__(self) -> int:
        return len(self.arrays["prompt_chars"])

    def __iter__(self) -> Iterator[CachedSample]:
        return (self[j] for j in range(len(self)))

    def __getitem__(self, j: int) -> CachedSample:
        a = self.arrays

        def rows(name: str) -> np.ndarray:
            ptr = a[RAGGED[name]]
            return a[name][ptr[j]:ptr[j + 1]]

        t0, t1 = a["token_ptr"][j], a["token_ptr"][j + 1]
        has_topk = "topk_ids" in a
        return CachedSample(
            index=self.first_index + j,
            text=bytes(rows("text_bytes")).decode("utf-8"),
            prompt_chars=int(a["prompt_chars"][j]),
            source_line=int(a["source_line"][j]),
            input_ids=rows("input_ids"),
            offsets=rows("offsets"),
            n_prompt_tokens=int(a["n_prompt_tokens"][j]),
            words=rows("words"), word_tokens=rows("word_tokens"), word_labels=rows("word_labels"),
            phrases=rows("phrases"), phrase_tokens=rows("phrase_tokens"), phrase_labels=rows("phrase_labels"),
            states={layer: self.states(layer, t0, t1) for layer in self.layers},
            topk_ids=rows("topk_ids") if has_topk else None,
            topk_logprobs=rows("topk_logprobs") if has_topk else None,
            topk_rest=rows("topk_rest") if has_topk else None,
        )


class CacheReader:
    """Read-only view of a cache at a local path or fsspec URL.

    Refuses a cache whose extraction has not finished unless `allow_incomplete` (then only its
    complete shards are visible).
    """

    def __init__(self, url: str, allow_incomplete: bool = False):
        self.url = str(url)
        self.root = open_root(self.url, mode="r")
        meta = self.root.attrs.get("mta")
        if meta is None:
            raise CacheError(f"{self.url} is not an mta cache (no 'mta' metadata in its zarr.json)")
        if not meta.get("complete") and not allow_incomplete:
            raise CacheError(f"{self.url}: extraction did not finish; re-run the same `mta extract` command to resume it")
        self.meta = meta
        self.layers: list[int] = list(meta["config"]["layers"])
        self.state_dtype: str = meta["config"]["state_dtype"]
        self.shard_indices = [i for i in range(meta["n_shards"]) if self._shard_complete(i)]
        self.shard_sizes = [int(self.root[shard_name(i)].attrs["n_samples"]) for i in self.shard_indices]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)

    def _shard_complete(self, index: int) -> bool:
        try:
            return bool(self.root[shard_name(index)].attrs.get("complete"))
        except KeyError:
            return False

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @cached_property
    def head(self) -> LogitHead:
        """The teacher's output head: weight [V, d] and bias [V] | None as float32, scale, softcap."""
        info = self.meta["teacher"]["head"]
        group = self.root["head"]
        weight = decode_states(group["weight"][...], info["dtype"])
        bias = decode_states(group["bias"][...][None], info["dtype"])[0] if "bias" in group else None
        return LogitHead(weight, bias, info["scale"], info["softcap"])

    def check_layers(self, layers: list[int] | None) -> list[int]:
        """`layers` (all stored layers when None), or a CacheError that lists what the cache holds."""
        if layers is None:
            return self.layers
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise CacheError(f"teacher layer(s) {missing} are not in the cache {self.url}; "
                             f"it holds layers {self.layers}. Re-extract with --layers, or choose from those.")
        return list(layers)

    def read_shard(self, position: int, layers: list[int] | None = None) -> ShardData:
        """Decode the `position`-th complete shard whole (sequential reads, the fast path)."""
        layers = self.check_layers(layers)
        group = self.root[shard_name(self.shard_indices[position])]
        arrays = {name: group[name][...] for name in group.array_keys()}
        for layer in layers:
            arrays[f"states/{layer}"] = group[f"states/{layer}"][...]
            if self.state_dtype == "int8":
                arrays[f"states/{layer}.scale"] = group[f"states/{layer}.scale"][...]
        return ShardData(arrays, int(self.shard_starts[position]), layers, self.state_dtype)

    def iter_shards(self, layers: list[int] | None = None) -> Iterator[ShardData]:
        for position in range(len(self.shard_indices)):
            yield self.read_shard(position, layers)

    def __getitem__(self, index: int) -> CachedSample:
        return self.sample(index)

    def sample(self, index: int, layers: list[int] | None = None) -> CachedSample:
        """Random access to one sample; reads only the chunks that hold it."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range; the cache holds {len(self)} samples")
        layers = self.check_layers(layers)
        position = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        j = index - int(self.shard_starts[position])
        group = self.root[shard_name(self.shard_indices[position])]
        pointers = {p: group[p][j:j + 2] for p in POINTERS}
        arrays: dict[str, np.ndarray] = {p: np.array([0, v[1] - v[0]]) for p, v in pointers.items()}
        for name in group.array_keys():
            if name in RAGGED:
                lo, hi = pointers[RAGGED[name]]
                arrays[name] = group[name][lo:hi]
            elif name in PER_SAMPLE:
                arrays[name] = group[name][j:j + 1]
        lo, hi = pointers["token_ptr"]
        for layer in layers:
            arrays[f"states/{layer}"] = group[f"states/{layer}"][lo:hi]
            if self.state_dtype == "int8":
                arrays[f"states/{layer}.scale"] = group[f"states/{layer}.scale"][lo:hi]
        return ShardData(arrays, index, layers, self.state_dtype)[0]
