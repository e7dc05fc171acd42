"""`mta cache info | verify | show`: what a cache holds, whether it is sound, and one sample's spans."""

from __future__ import annotations

import numpy as np
import zarr
from rich.text import Text

from mta_cli.cache.layout import storage_dtype
from mta_cli.cache.reader import POINTERS, RAGGED, CacheReader
from mta_cli.cache.store import CacheError, open_root
from mta_cli.cache.layout import shard_name


def _arrays(group: zarr.Group):
    for _, array in group.arrays():
        yield array
    for _, sub in group.groups():
        yield from _arrays(sub)


def info(url: str) -> dict:
    """Summary figures of a cache (JSON-able)."""
    reader = CacheReader(url, allow_incomplete=True)
    meta = reader.meta
    stored = raw = shard_stored = 0
    for array in _arrays(reader.root):
        size = array.nbytes_stored()
        stored += size
        if array.path.startswith("shards/"):
            shard_stored += size
            raw += array.nbytes
    n_words = n_phrases = 0
    for position in range(len(reader.shard_indices)):
        group = reader.root[shard_name(reader.shard_indices[position])]
        n_words += group["words"].shape[0]
        n_phrases += group["phrases"].shape[0]
    n_samples, n_tokens = len(reader), int(sum(
        reader.root[shard_name(i)].attrs["n_tokens"] for i in reader.shard_indices))
    teacher = meta["teacher"]
    return {
        "path": reader.url,
        "complete": bool(meta.get("complete")),
        "samples": n_samples,
        "tokens": n_tokens,
        "shards": f"{len(reader.shard_indices)}/{meta['n_shards']}",
        "layers": reader.layers,
        "state_dtype": reader.state_dtype,
        "top_k": meta["config"]["top_k"],
        "teacher": teacher["source"],
        "teacher_architecture": teacher["architecture"],
        "teacher_layers": teacher["n_layers"],
        "hidden_size": teacher["hidden_size"],
        "vocab_size": teacher["vocab_size"],
        "bytes_on_disk": stored,
        "bytes_per_token": shard_stored / max(n_tokens, 1),
        "compression_ratio": shard_stored / max(raw, 1),
        "head_bytes": stored - shard_stored,
        "words_per_sample": n_words / max(n_samples, 1),
        "phrases_per_sample": n_phrases / max(n_samples, 1),
        "tool": meta["tool"],
    }


def verify(url: str) -> list[str]:
    """Every fault found in the cache, as precise messages; empty when the cache is sound."""
    try:
        root = open_root(url, mode="r")
    except CacheError as e:
        return [str(e)]
    meta = root.attrs.get("mta")
    if meta is None:
        return [f"{url}: no 'mta' metadata; not an mta cache"]
    faults = []
    if not meta.get("complete"):
        faults.append("cache not marked complete: extraction did not finish (re-run it to resume)")
    teacher, config = meta["teacher"], meta["config"]
    d, vocab = teacher["hidden_size"], teacher["vocab_size"]
    expected_dtype = storage_dtype(config["state_dtype"])
    try:
        weight = root["head/weight"]
        if weight.shape != (vocab, d):
            faults.append(f"head/weight: shape {weight.shape}, expected {(vocab, d)}")
        weight[...]
    except Exception as e:  # noqa: BLE001 - any read failure is a fault to report
        faults.append(f"head/weight: unreadable ({type(e).__name__}: {e})")
    samples = tokens = 0
    for k in range(meta["n_shards"]):
        name = shard_name(k)
        if name not in root:
            faults.append(f"{name}: missing")
            continue
        group = root[name]
        if not group.attrs.get("complete"):
            faults.append(f"{name}: not marked complete")
            continue
        try:
            faults += [f"{name}: {f}" for f in _verify_shard(group, config, d, vocab, expected_dtype)]
        except Exception as e:  # noqa: BLE001 - a truncated or altered chunk fails to decode
            faults.append(f"{name}: unreadable ({type(e).__name__}: {e})")
        samples += int(group.attrs["n_samples"])
        tokens += int(group.attrs["n_tokens"])
    if samples != meta["n_samples"]:
        faults.append(f"shards hold {samples} samples, metadata says {meta['n_samples']}")
    if tokens != meta["n_tokens"]:
        faults.append(f"shards hold {tokens} tokens, metadata says {meta['n_tokens']}")
    return faults


def _verify_shard(group: zarr.Group, config: dict, d: int, vocab: int, expected_dtype) -> list[str]:
    a, faults = {}, []
    for name, array in group.arrays():
        try:
            a[name] = array[...]
        except Exception as e:  # noqa: BLE001 - a truncated or altered chunk fails to decode: name the array
            faults.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    if faults:
        return faults
    n, n_tokens = int(group.attrs["n_samples"]), int(group.attrs["n_tokens"])
    for p in POINTERS:
        ptr = a[p]
        if len(ptr) != n + 1 or ptr[0] != 0 or np.any(np.diff(ptr) < 0):
            faults.append(f"{p}: not a valid row pointer for {n} samples")
    for name, p in RAGGED.items():
        if name in a and len(a[name]) != a[p][-1]:
            faults.append(f"{name}: {len(a[name])} rows, {p} says {a[p][-1]}")
    if a["token_ptr"][-1] != n_tokens:
        faults.append(f"token_ptr ends at {a['token_ptr'][-1]}, shard attrs say {n_tokens} tokens")
    if faults:
        return faults
    if np.any((a["input_ids"] < 0) | (a["input_ids"] >= vocab)):
        faults.append("input_ids: token id outside the vocabulary")
    text_len = np.repeat(np.diff(a["text_ptr"]), np.diff(a["token_ptr"]))  # bytes >= chars: a loose bound
    if np.any(a["offsets"] < 0) or np.any(a["offsets"][:, 1] > text_len) or np.any(a["offsets"][:, 0] > a["offsets"][:, 1]):
        faults.append("offsets: a token's char range lies outside its text")
    tokens_per_sample = np.diff(a["token_ptr"])
    for kind in ("word", "phrase"):
        ranges, ptr = a[f"{kind}_tokens"], a[f"{kind}_ptr"]
        limit = np.repeat(tokens_per_sample, np.diff(ptr))
        if np.any(ranges[:, 0] > ranges[:, 1]) or np.any(ranges[:, 1] > limit):
            faults.append(f"{kind}_tokens: a span's token range lies outside its sample")
    if np.any(a["n_prompt_tokens"] >= tokens_per_sample):
        faults.append("n_prompt_tokens: a sample has no response token")
    states = group["states"]
    for layer in config["layers"]:
        key = str(layer)
        if key not in states:
            faults.append(f"states/{layer}: missing")
            continue
        try:
            values = states[key][...]
            scale = states[f"{key}.scale"][...] if config["state_dtype"] == "int8" else None
        except Exception as e:  # noqa: BLE001 - as above
            faults.append(f"states/{layer}: unreadable ({type(e).__name__}: {e})")
            continue
        if values.shape != (n_tokens, d) or values.dtype != expected_dtype:
            faults.append(f"states/{layer}: {values.dtype}{list(values.shape)}, expected {expected_dtype}{[n_tokens, d]}")
            continue
        if not _finite(values, config["state_dtype"]):
            faults.append(f"states/{layer}: contains NaN or inf")
        if scale is not None and scale.shape != (n_tokens,):
            faults.append(f"states/{layer}.scale: shape {list(scale.shape)}, expected [{n_tokens}]")
        elif scale is not None and not np.isfinite(scale).all():
            faults.append(f"states/{layer}.scale: contains NaN or inf")
    return faults


def _finite(values: np.ndarray, dtype: str) -> bool:
    if dtype == "bf16":
        return not np.any((values & 0x7F80) == 0x7F80)  # exponent all ones: inf or NaN
    if dtype == "int8":
        return True
    return bool(np.isfinite(values).all())


PHRASE_STYLES = {"NP": "on dark_blue", "VP": "on dark_green"}


def show(url: str, index: int) -> Text:
    """One sample's text with phrases highlighted (NP blue, VP green) and words underlined."""
    from mta_cli.segment import PHRASE_LABELS

    sample = CacheReader(url, allow_incomplete=True)[index]
    text = Text(sample.text)
    for (s, e) in sample.words:
        text.stylize("underline", int(s), int(e))
    for (s, e), label in zip(sample.phrases, sample.phrase_labels):
        text.stylize(PHRASE_STYLES[PHRASE_LABELS[label]], int(s), int(e))
    text.stylize("dim", 0, sample.prompt_chars)
    return text
