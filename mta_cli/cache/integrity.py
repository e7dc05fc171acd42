"""What a cache promises, and whether the store holds it: the cheap checks behind the reader, `verify` and
`verify --repair`.

Zarr reads an absent chunk as its fill value, so a deleted chunk file would read back as zeros and train
silently. The writer therefore records, per shard and for the head, a manifest of every array (shape,
dtype, number of stored chunk objects) and marks the group complete only after a listing of the store
shows them all (`confirm_written`). `survey` checks a whole cache against its metadata with one listing
of the store and the metadata of each shard: nothing large is read or allocated, so absurd declared
sizes are refused before anything is decoded. Decoding every chunk (checksums, NaN, row pointers) is
`inspect.verify`'s deeper pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import zarr
from zarr.core.sync import sync

from mta_cli.cache.layout import (FORMAT_VERSION, INNER_CHUNK_ROWS, STATE_DTYPES, layer_dtypes, promised_arrays,
                                  shard_name)

# Bounds on declared sizes: far beyond any real model, small enough that nothing absurd is allocated.
LIMITS = {"n_layers": 4096, "hidden_size": 1 << 17, "vocab_size": 1 << 23, "max_length": 1 << 20,
          "shard_size": 1 << 20, "top_k": 1 << 16}
REPAIR_HINT = "run `mta cache verify --repair {url}`, then re-run the same `mta extract` command to rewrite it"


class CacheIntegrityError(RuntimeError):
    """Raised by `survey` when the root metadata cannot describe a usable cache."""


def store_keys(group: zarr.Group) -> set[str]:
    """Every key stored under `group`, relative to it (one listing of the store)."""
    prefix = f"{group.path}/" if group.path else ""

    async def collect() -> list[str]:
        return [key async for key in group.store.list_prefix(prefix)]

    return {key[len(prefix):] for key in sync(collect())}


def chunk_objects(keys: set[str], array_path: str) -> int:
    """How many chunk objects (shard files, with the sharding codec) are stored for the array at `array_path`."""
    prefix = f"{array_path}/c/"
    return sum(key.startswith(prefix) for key in keys)


def manifest(group: zarr.Group, names: list[str], keys: set[str]) -> dict[str, dict]:
    """The manifest of arrays `names` of `group` as stored now: {name: {"shape", "dtype", "chunks"}}."""
    entries = {}
    for name in names:
        array = group[name]
        entries[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "chunks": chunk_objects(keys, name)}
    return entries


def expected_chunk_objects(shape: tuple[int, ...]) -> int:
    """Chunk objects the writer stores for an array of `shape`: one file (a chunk, or a shard of inner
    chunks), none for an empty array."""
    return 1 if shape and shape[0] > 0 and all(d > 0 for d in shape) else 0


def confirm_written(group: zarr.Group, names: list[str]) -> dict[str, dict]:
    """The manifest of a group just written, after checking that the store holds every chunk it should.

    Raises OSError when something is missing (a failed or concurrent write): the group must then not be
    marked complete."""
    keys = store_keys(group)
    entries = manifest(group, names, keys)
    for name, entry in entries.items():
        if f"{name}/zarr.json" not in keys or entry["chunks"] != expected_chunk_objects(tuple(entry["shape"])):
            raise OSError(f"{group.path}/{name}: {entry['chunks']} chunk object(s) stored after writing, "
                          f"expected {expected_chunk_objects(tuple(entry['shape']))}")
    return entries


def manifest_faults(entries: dict | None, keys: set[str], promised: dict[str, tuple]) -> list[str]:
    """Faults of one group against the arrays it promises: not in the manifest, wrong dtype or shape, a
    chunk object or an array's metadata missing from the store."""
    if not isinstance(entries, dict):
        return ["no array manifest (written by an older mta, or damaged)"]
    faults = []
    for name, (dtype, shape) in promised.items():
        entry = entries.get(name)
        if not isinstance(entry, dict):
            faults.append(f"{name}: missing from the manifest")
            continue
        recorded = tuple(entry.get("shape", ()))
        if entry.get("dtype") != str(dtype) or len(recorded) != len(shape) or any(
                want is not None and got != want for got, want in zip(recorded, shape)):
            faults.append(f"{name}: manifest says {entry.get('dtype')}{list(recorded)}, "
                          f"expected {dtype}{[('*' if d is None else d) for d in shape]}")
            continue
        if f"{name}/zarr.json" not in keys:
            faults.append(f"{name}: missing (no array metadata)")
            continue
        stored = chunk_objects(keys, name)
        if stored != entry.get("chunks"):
            faults.append(f"{name}: {stored} of {entry.get('chunks')} chunk object(s) present")
    return faults


def array_faults(group: zarr.Group, entries: dict[str, dict]) -> list[str]:
    """Faults of the arrays' own metadata against the manifest: an edited shape, dtype or chunk shape is
    caught here, before any chunk is decoded."""
    faults = []
    try:
        arrays = {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    except (ValueError, KeyError, TypeError, OSError) as e:  # an unreadable zarr.json among them
        return [f"array metadata unreadable ({type(e).__name__}: {e})"]
    for name, entry in entries.items():
        array = arrays.get(name)
        if array is None:
            continue  # reported by manifest_faults
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            faults.append(f"{name}: metadata says {array.dtype}{list(array.shape)}, "
                          f"the manifest {entry['dtype']}{entry['shape']}")
        elif array.chunks[0] > max(INNER_CHUNK_ROWS, 1) or (
                array.shards is not None and array.shards[0] > max(array.shape[0], 1) + INNER_CHUNK_ROWS):
            faults.append(f"{name}: chunk shape {list(array.chunks)} is not one mta writes")
    return faults


@dataclass
class ShardInfo:
    """What the survey learned of one shard from its metadata."""

    index: int
    n_samples: int = 0
    n_tokens: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.faults


@dataclass
class Survey:
    """A cache checked against its metadata: `shards` for the promised shards found on disk, in index order."""

    url: str
    meta: dict
    shards: list[ShardInfo]
    missing: list[int]           # promised shard indices with no group on disk (at most MAX_LISTED, see n_missing)
    n_missing: int
    head_faults: list[str]
    stray: list[str]             # shard groups on disk that the metadata does not promise

    @property
    def sound_shards(self) -> list[ShardInfo]:
        return [s for s in self.shards if s.sound]

    def faults(self) -> list[str]:
        """Every fault, as `where: what` lines (the cache's own completion mark included)."""
        found = [] if self.meta.get("complete") else ["cache not marked complete: extraction did not finish "
                                                      "(re-run it to resume)"]
        found += [f"head: {f}" for f in self.head_faults]
        listed = [ShardInfo(i, faults=["missing"]) for i in self.missing]
        found += [f"{shard_name(s.index)}: {f}" for s in sorted(self.shards + listed, key=lambda s: s.index)
                  for f in s.faults]
        if self.n_missing > len(self.missing):
            found.append(f"... and {self.n_missing - len(self.missing)} more shard(s) missing")
        found += [f"{name}: not part of this cache (its metadata promises {self.meta['n_shards']} shards)"
                  for name in self.stray]
        return found


MAX_LISTED = 20  # missing shards named one by one; more are counted


def _require(meta: dict, path: str, kind: type, low: int | None = None, high: int | None = None):
    """meta[a][b]... for path "a.b", checked for type and range; CacheIntegrityError names the field."""
    value = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CacheIntegrityError(f"field {path!r} is missing")
        value = value[part]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CacheIntegrityError(f"field {path!r} must be an integer, got {json.dumps(value)[:40]}")
    if kind is not int and not isinstance(value, kind):
        raise CacheIntegrityError(f"field {path!r} has the wrong type ({type(value).__name__})")
    if low is not None and not low <= value <= high:
        raise CacheIntegrityError(f"field {path!r} is {value}, outside {low}..{high}")
    return value


def check_metadata(meta: dict) -> None:
    """The root metadata is complete, consistent and within LIMITS; raises CacheIntegrityError naming the field."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheIntegrityError(f"cache format {version} was written by another mta version; this mta reads "
                                  f"format {FORMAT_VERSION}. Re-extract it with this version")
    n_layers = _require(meta, "teacher.n_layers", int, 1, LIMITS["n_layers"])
    _require(meta, "teacher.hidden_size", int, 1, LIMITS["hidden_size"])
    vocab = _require(meta, "teacher.vocab_size", int, 1, LIMITS["vocab_size"])
    _require(meta, "teacher.head", dict)
    if _require(meta, "config.state_dtype", str) not in STATE_DTYPES:
        raise CacheIntegrityError(f"field 'config.state_dtype' is {meta['config']['state_dtype']!r}, "
                                  f"not one of {', '.join(STATE_DTYPES)}")
    if meta["config"].get("key_dtype") not in (None, *STATE_DTYPES):
        raise CacheIntegrityError(f"field 'config.key_dtype' is {meta['config']['key_dtype']!r}, "
                                  f"not one of {', '.join(STATE_DTYPES)}")
    layers = _require(meta, "config.layers", list)
    if not layers or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l <= n_layers for l in layers) \
            or layers != sorted(set(layers)) or layers[-1] != n_layers:
        raise CacheIntegrityError(f"field 'config.layers' is {layers}: expected ascending distinct layers "
                                  f"in 0..{n_layers} ending with the last layer {n_layers}")
    _require(meta, "config.top_k", int, 0, min(vocab, LIMITS["top_k"]))
    max_length = _require(meta, "config.max_length", int, 2, LIMITS["max_length"])
    shard_size = _require(meta, "config.shard_size", int, 1, LIMITS["shard_size"])
    n_samples = _require(meta, "n_samples", int, 1, 1 << 40)
    n_shards = _require(meta, "n_shards", int, 1, 1 << 40)
    if n_shards != -(-n_samples // shard_size):
        raise CacheIntegrityError(f"field 'n_shards' is {n_shards}, but {n_samples} samples in shards of "
                                  f"{shard_size} make {-(-n_samples // shard_size)}")
    _require(meta, "n_tokens", int, n_samples, n_samples * max_length)


def _check_shard(group: zarr.Group, keys: set[str], index: int, expected_samples: int, meta: dict,
                 deep_metadata: bool) -> ShardInfo:
    info = ShardInfo(index)
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        info.faults.append("not marked complete")
        return info
    n_samples, n_tokens = attrs.get("n_samples"), attrs.get("n_tokens")
    max_length = meta["config"]["max_length"]
    if n_samples != expected_samples or not isinstance(n_tokens, int) or \
            not n_samples <= n_tokens <= n_samples * max_length:
        info.faults.append(f"shard metadata declares {n_samples} samples and {n_tokens} tokens; expected "
                           f"{expected_samples} samples of at most {max_length} tokens each")
        return info
    info.n_samples, info.n_tokens = n_samples, n_tokens
    config = meta["config"]
    promised = promised_arrays(n_samples, n_tokens, meta["teacher"]["hidden_size"],
                               layer_dtypes(config, meta["teacher"]["n_layers"]), config["top_k"])
    entries = attrs.get("arrays")
    info.faults += manifest_faults(entries, keys, promised)
    if not info.faults and deep_metadata:
        info.faults += array_faults(group, {name: entries[name] for name in promised})
    return info


def _head_faults(root: zarr.Group, keys: set[str], meta: dict, deep_metadata: bool) -> list[str]:
    from mta_cli.cache.layout import storage_dtype

    if "head/zarr.json" not in keys:
        return ["missing"]
    try:
        attrs = dict(root["head"].attrs)
    except (ValueError, KeyError, OSError) as e:
        return [f"metadata unreadable ({type(e).__name__}: {e})"]
    if not attrs.get("complete"):
        return ["not marked complete"]
    teacher = meta["teacher"]
    head = teacher["head"]
    dtype = storage_dtype(head.get("dtype", "fp32")) if head.get("dtype") in STATE_DTYPES else None
    if dtype is None:
        return [f"head dtype {head.get('dtype')!r} is not one of {', '.join(STATE_DTYPES)}"]
    promised = {"weight": (dtype, (teacher["vocab_size"], teacher["hidden_size"]))}
    if head.get("has_bias"):
        promised["bias"] = (dtype, (teacher["vocab_size"],))
    norm = head.get("norm")
    if isinstance(norm, dict):
        promised["norm_weight"] = (dtype, (teacher["hidden_size"],))
        if norm.get("has_bias"):
            promised["norm_bias"] = (dtype, (teacher["hidden_size"],))
    head_keys = {k[len("head/"):] for k in keys if k.startswith("head/")}
    faults = manifest_faults(attrs.get("arrays"), head_keys, promised)
    if not faults and deep_metadata:
        faults += array_faults(root["head"], {name: attrs["arrays"][name] for name in promised})
    return faults


def survey(root: zarr.Group, url: str, deep_metadata: bool = True) -> Survey:
    """Check a cache against its metadata without decoding any chunk (see the module docstring).

    Raises CacheIntegrityError when the root metadata is missing, damaged or inconsistent. `deep_metadata`
    also reads every array's own metadata (shapes, dtypes, chunk shapes) against the manifests. The work
    is bounded by what is on disk, whatever shard count the metadata declares.
    """
    meta = root.attrs.get("mta")
    if not isinstance(meta, dict):
        raise CacheIntegrityError("no 'mta' metadata in its zarr.json: not an mta cache")
    check_metadata(meta)
    keys = store_keys(root)
    on_disk = sorted({key.split("/")[1] for key in keys if key.startswith("shards/") and key.count("/") == 2
                      and key.endswith("/zarr.json")})
    n_shards, size, n_samples = meta["n_shards"], meta["config"]["shard_size"], meta["n_samples"]
    present = [int(n) for n in on_disk if n.isdigit() and shard_name(int(n)) == f"shards/{n}" and int(n) < n_shards]
    stray = [f"shards/{n}" for n in on_disk if not (n.isdigit() and int(n) < n_shards and
                                                   shard_name(int(n)) == f"shards/{n}")]
    shards = []
    for index in present:
        name = shard_name(index)
        try:
            group = root[name]
        except (ValueError, KeyError, OSError) as e:  # an empty or cut-short zarr.json
            shards.append(ShardInfo(index, faults=[f"metadata unreadable ({type(e).__name__}: {e})"]))
            continue
        shard_keys = {k[len(name) + 1:] for k in keys if k.startswith(name + "/")}
        expected = min(size, n_samples - index * size)
        shards.append(_check_shard(group, shard_keys, index, expected, meta, deep_metadata))
    present_set = set(present)
    missing = []
    for index in range(n_shards):
        if len(missing) == MAX_LISTED:
            break
        if index not in present_set:
            missing.append(index)
    return Survey(url, meta, shards, missing, n_shards - len(present), _head_faults(root, keys, meta, deep_metadata),
                  stray)
