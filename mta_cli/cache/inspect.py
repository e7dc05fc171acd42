"""`mta cache info | verify [--repair] | show`: what a cache holds, whether it is sound, and one sample's spans."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import numpy as np
import zarr
from rich.text import Text

from mta_cli.cache.integrity import CacheIntegrityError, survey
from mta_cli.cache.layout import layer_dtypes, shard_name
from mta_cli.cache.reader import POINTERS, RAGGED, CacheReader
from mta_cli.cache.store import CacheError, open_root


def _arrays(group: zarr.Group):
    for _, array in group.arrays():
        yield array
    for _, sub in group.groups():
        yield from _arrays(sub)


def info(url: str) -> dict:
    """Summary figures of a cache (JSON-able); damaged or unfinished shards are left out of the counts."""
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
    for index in reader.shard_indices:
        arrays = reader.root[shard_name(index)].attrs["arrays"]
        n_words += arrays["words"]["shape"][0]
        n_phrases += arrays["phrases"]["shape"][0]
    n_samples, n_tokens = len(reader), sum(reader.shard_tokens)
    teacher = meta["teacher"]
    return {
        "path": reader.url,
        "complete": bool(meta.get("complete")),
        "faults": len(reader.survey.faults()),
        "samples": n_samples,
        "tokens": n_tokens,
        "shards": f"{len(reader.shard_indices)}/{meta['n_shards']}",
        "layers": reader.layers,
        "state_dtype": reader.state_dtype,
        "key_dtype": meta["config"].get("key_dtype") or reader.state_dtype,  # the layers other than the last
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


@dataclass
class Verification:
    """The outcome of `verify`: every fault, and which groups hold one (what `repair` resets)."""

    faults: list[str]
    damaged_shards: list[int] = field(default_factory=list)
    damaged_head: bool = False


def verify(url: str) -> list[str]:
    """Every fault found in the cache, as precise messages; empty when the cache is sound."""
    return check(url).faults


def check(url: str) -> Verification:
    """The cheap survey of `integrity`, then every chunk of every sound shard and of the head decoded:
    checksums, row pointers, token ranges, NaN / inf."""
    try:
        root = open_root(url, mode="r")
        found = survey(root, url)
    except CacheError as e:
        return Verification([str(e)])
    except CacheIntegrityError as e:
        return Verification([f"{url}: {e}"])
    meta = found.meta
    config, teacher = meta["config"], meta["teacher"]
    d, vocab = teacher["hidden_size"], teacher["vocab_size"]
    damaged = {s.index for s in found.shards if not s.sound}
    for shard in found.sound_shards:
        group = root[shard_name(shard.index)]
        try:
            shard.faults += _verify_shard(group, config, d, vocab, layer_dtypes(config, teacher["n_layers"]))
        except Exception as e:  # noqa: BLE001 - a truncated or altered chunk fails to decode
            shard.faults.append(f"unreadable ({type(e).__name__}: {e})")
        if shard.faults:
            damaged.add(shard.index)
    if not found.head_faults:
        for name in root["head"].attrs["arrays"]:
            try:
                values = root["head"][name][...]
            except Exception as e:  # noqa: BLE001 - as above
                found.head_faults.append(f"{name}: unreadable ({type(e).__name__}: {e})")
                continue
            if not _finite(values, meta["teacher"]["head"]["dtype"]):
                found.head_faults.append(f"{name}: contains NaN or inf")
    faults = found.faults()
    if found.sound_shards and len(found.sound_shards) == meta["n_shards"] and not damaged:
        tokens = sum(s.n_tokens for s in found.shards)
        if tokens != meta["n_tokens"]:
            faults.append(f"shards hold {tokens} tokens, metadata says {meta['n_tokens']}")
    return Verification(faults, sorted(damaged), bool(found.head_faults))


def repair(url: str) -> Verification:
    """Remove the completion marks of every damaged or unfinished shard (and of a damaged head) so that
    re-running the same `mta extract` rewrites exactly those. A shard whose own metadata is unreadable is
    removed whole. Returns what `check` found before the repair."""
    found = check(url)
    if not found.damaged_shards and not found.damaged_head:
        return found
    root = open_root(url, mode="a")
    for index in found.damaged_shards:
        name = shard_name(index)
        try:
            root[name].attrs["complete"] = False
        except (ValueError, KeyError, OSError):  # its zarr.json is unreadable: nothing in it is trusted
            del root[name]
    if found.damaged_head:
        try:
            root["head"].attrs["complete"] = False
        except (ValueError, KeyError, OSError):
            del root["head"]
    root.attrs["mta"] = {**root.attrs["mta"], "complete": False}
    return found


def extract_command(url: str) -> str:
    """The `mta extract` command that made the cache at `url` (from its stored settings), to re-run after a
    repair; options left at their defaults are omitted."""
    from mta_cli.extraction import ExtractConfig

    stored = open_root(url, mode="r").attrs["mta"].get("extract_config") or {}
    defaults = ExtractConfig(teacher="", data="", out="")
    parts = ["mta extract"]
    for key, value in stored.items():
        if key in ("teacher", "data", "out") or value != getattr(defaults, key, value):
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag)
            elif isinstance(value, list):
                parts += [flag, ",".join(map(str, value))]
            else:
                parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _verify_shard(group: zarr.Group, config: dict, d: int, vocab: int, dtypes: dict[int, str]) -> list[str]:
    """Decode every array of a shard and check its contents (the manifest was checked by the survey)."""
    a, faults = {}, []
    for name in group.attrs["arrays"]:
        try:
            a[name] = group[name][...]
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
    for layer, dtype in dtypes.items():
        if not _finite(a[f"states/{layer}"], dtype):
            faults.append(f"states/{layer}: contains NaN or inf")
        scale = a.get(f"states/{layer}.scale")
        if scale is not None and not np.isfinite(scale).all():
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
