"""Reading an `mta` cache: one sample by index, or whole shards in order (the fast path).

    reader = CacheReader("cache.zarr")
    sample = reader[0]                      # CachedSample: text, ids, spans, states {layer: [T, d]}
    for shard in reader.iter_shards():      # ShardData: every array of a shard, decoded once
        for sample in shard: ...
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
import zarr

from mta_cli.cache.layout import decode_states, layer_dtypes, shard_name
from mta_cli.cache.integrity import REPAIR_HINT, CacheIntegrityError, manifest_faults, store_keys, survey
from mta_cli.cache.store import CacheError, open_root
from mta_cli.losses.kd import LogitHead
from mta_cli.losses.lens import FinalNorm

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

    def __init__(self, arrays: dict[str, np.ndarray], first_index: int, layers: list[int], dtypes: dict[int, str]):
        self.arrays = arrays
        self.first_index = first_index
        self.layers = layers
        self.dtypes = dtypes

    def states(self, layer: int, t0: int, t1: int) -> torch.Tensor:
        """Decoded float32 states [t1 - t0, d] of one layer; decoding per sample keeps memory at storage size."""
        scale = self.arrays.get(f"states/{layer}.scale")
        return decode_states(self.arrays[f"states/{layer}"][t0:t1], self.dtypes[layer],
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

    Opening it checks the cache against its metadata (`integrity.survey`: format version, declared sizes,
    every promised shard present, complete and holding every array and chunk of its manifest, the head
    likewise) and refuses a damaged or unfinished cache with the fault and the remedy. With
    `allow_incomplete` (inspection) only the sound complete shards are visible instead.
    """

    def __init__(self, url: str, allow_incomplete: bool = False):
        self.url = str(url)
        self.root = open_root(self.url, mode="r")
        try:
            found = survey(self.root, self.url)
        except CacheIntegrityError as e:
            raise CacheError(f"{self.url}: {e}") from None
        meta = found.meta
        if not allow_incomplete:
            faults = found.faults()
            if not meta.get("complete"):
                raise CacheError(f"{self.url}: extraction did not finish; re-run the same `mta extract` command "
                                 "to resume it")
            if faults:
                listed = "\n  ".join(faults[:5]) + (f"\n  ... and {len(faults) - 5} more" if len(faults) > 5 else "")
                raise CacheError(f"{self.url} is damaged:\n  {listed}\nTo fix it, "
                                 + REPAIR_HINT.format(url=self.url) + ".")
        self.meta = meta
        self.survey = found
        self.layers: list[int] = list(meta["config"]["layers"])
        self.state_dtype: str = meta["config"]["state_dtype"]
        self.layer_dtypes = layer_dtypes(meta["config"], meta["teacher"]["n_layers"])
        sound = found.sound_shards
        self.shard_indices = [s.index for s in sound]
        self.shard_sizes = [s.n_samples for s in sound]
        self.shard_tokens = [s.n_tokens for s in sound]
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @cached_property
    def head(self) -> LogitHead:
        """The teacher's output head: weight [V, d] and bias [V] | None as float32, scale, softcap."""
        info = self.meta["teacher"]["head"]
        group = self._checked_group("head")
        weight = decode_states(self._read(group, "weight"), info["dtype"])
        bias = decode_states(self._read(group, "bias")[None], info["dtype"])[0] if info["has_bias"] else None
        return LogitHead(weight, bias, info["scale"], info["softcap"])

    @cached_property
    def final_norm(self) -> FinalNorm | None:
        """The teacher's final norm for the logit lens (float32 tensors), or None when the extraction could not
        reproduce it (an unknown norm form)."""
        info = self.meta["teacher"]["head"]
        if not info.get("norm"):
            return None
        group = self._checked_group("head")
        weight = decode_states(self._read(group, "norm_weight")[None], info["dtype"])[0]
        bias = decode_states(self._read(group, "norm_bias")[None], info["dtype"])[0] if info["norm"]["has_bias"] \
            else None
        return FinalNorm(info["norm"]["kind"], weight, bias, info["norm"]["eps"])

    def _checked_group(self, name: str) -> zarr.Group:
        """The group `name` after checking that the store still holds every chunk of its manifest
        (an absent chunk would read as zeros)."""
        group = self.root[name]
        faults = manifest_faults(group.attrs.get("arrays"), store_keys(group),
                                 {k: (np.dtype(v["dtype"]), tuple(v["shape"])) for k, v in
                                  (group.attrs.get("arrays") or {}).items()})
        if faults:
            raise CacheError(f"{self.url}: {name}: {faults[0]}; the cache is damaged. To fix it, "
                             + REPAIR_HINT.format(url=self.url) + ".")
        return group

    def _read(self, group: zarr.Group, name: str, selection=Ellipsis) -> np.ndarray:
        """group[name][selection], or a CacheError naming the shard, the array and the remedy."""
        try:
            return group[name][selection]
        except Exception as e:  # noqa: BLE001 - checksum mismatch, truncated chunk, codec error: all one fault
            raise CacheError(f"{self.url}: {group.path}/{name}: unreadable ({type(e).__name__}: {e}); the cache is "
                             "damaged. To fix it, " + REPAIR_HINT.format(url=self.url) + ".") from None

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
        """Decode the `position`-th complete shard whole (sequential reads, the fast path). Its arrays are read
        concurrently: from object storage each costs its own requests, whose latencies then overlap."""
        layers = self.check_layers(layers)
        group = self._checked_group(shard_name(self.shard_indices[position]))
        names = list(group.array_keys()) + self._state_arrays(layers)
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            arrays = dict(zip(names, pool.map(lambda name: self._read(group, name), names)))
        return ShardData(arrays, int(self.shard_starts[position]), layers, self.layer_dtypes)

    def sample_lengths(self, position: int) -> np.ndarray:
        """Token counts [n] of the samples of the `position`-th complete shard (its row pointer only)."""
        group = self.root[shard_name(self.shard_indices[position])]
        return np.diff(self._read(group, "token_ptr"))

    def _state_arrays(self, layers: list[int]) -> list[str]:
        return [name for layer in layers for name in
                [f"states/{layer}"] + ([f"states/{layer}.scale"] if self.layer_dtypes[layer] == "int8" else [])]

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
        group = self._checked_group(shard_name(self.shard_indices[position]))
        pointers = {p: self._read(group, p, slice(j, j + 2)) for p in POINTERS}
        arrays: dict[str, np.ndarray] = {p: np.array([0, v[1] - v[0]]) for p, v in pointers.items()}
        for name in group.array_keys():
            if name in RAGGED:
                lo, hi = pointers[RAGGED[name]]
                arrays[name] = self._read(group, name, slice(lo, hi))
            elif name in PER_SAMPLE:
                arrays[name] = self._read(group, name, slice(j, j + 1))
        lo, hi = pointers["token_ptr"]
        for name in self._state_arrays(layers):
            arrays[name] = self._read(group, name, slice(lo, hi))
        return ShardData(arrays, index, layers, self.layer_dtypes)[0]
