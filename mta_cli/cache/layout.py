"""On-disk layout of an `mta` cache: array names, state encodings, and the root metadata.

A cache is a Zarr v3 group:

    <root>/zarr.json                 attrs["mta"]: self-describing metadata (see `CacheMeta`)
    <root>/head/weight [V, d]        the teacher's output head (+ head/bias [V]), stored exactly, and its
                                     final norm for the logit lens: head/norm_weight [d] (+ head/norm_bias [d])
    <root>/shards/00000/...          one group per shard, CSR ("ragged") arrays, no padding:
        text_bytes  uint8 [C]        utf-8 of every sample's text, concatenated; text_ptr int64 [n+1]
        prompt_chars int32 [n]       length of the prompt part of each text
        source_line int32 [n]        1-based line of the record in the data file
        input_ids   int32 [T]        teacher token ids, all samples concatenated; token_ptr int64 [n+1]
        offsets     int32 [T, 2]     char range of each token in its sample's text
        n_prompt_tokens int32 [n]    tokens [0, n_prompt) of a sample are prompt, the rest are targets
        states/<l>  [T, d]           teacher hidden states of layer l (bf16 bits as uint16, fp16, fp32, int8)
        states/<l>.scale float32 [T] per-token absmax scale, int8 only
        words / phrases int32 [K, 2] char spans; *_tokens int32 [K, 2] teacher token ranges;
        *_labels uint8 [K]; word_ptr / phrase_ptr int64 [n+1]
        topk_ids int32 [T, k], topk_logprobs float32 [T, k], topk_rest float32 [T]   (only with --top-k)
    A shard's group attrs get {"arrays": manifest, "complete": true, ...} only after a listing of the store
    shows every array of the manifest (shape, dtype, number of stored chunk objects) present; the head
    group gets the same. See `cache.integrity`.

The root metadata (`extraction.cache_metadata`): "config" decides the content and must match to resume;
"teacher", "tokenizer" and "data" describe it. data.generated_by is the list of distinct
{"model", "weights_sha256"} of data records written by `mta generate`, null for other data: the responses
are the teacher's own where weights_sha256 equals config.teacher.weights_sha256 (both fingerprints are of
the weights as loaded, so the same --dtype), another model's (a student's) otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

FORMAT_VERSION = 3  # 2: manifests (chunk presence), absolute teacher path; 3: the final norm (logit lens)
STATE_DTYPES = ("bf16", "fp16", "fp32", "int8")
BYTES_PER_VALUE = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}
INNER_CHUNK_ROWS = 4096  # rows decoded together when one sample is read at random


PER_SAMPLE_ARRAYS = {"prompt_chars": np.int32, "source_line": np.int32, "n_prompt_tokens": np.int32}
POINTER_ARRAYS = {"text_ptr": np.int64, "token_ptr": np.int64, "word_ptr": np.int64, "phrase_ptr": np.int64}
PER_TOKEN_ARRAYS = {"input_ids": (np.int32, ()), "offsets": (np.int32, (2,))}
PER_SPAN_ARRAYS = {"{kind}s": (np.int32, (2,)), "{kind}_tokens": (np.int32, (2,)), "{kind}_labels": (np.uint8, ())}
SPAN_KINDS = ("word", "phrase")


def shard_name(index: int) -> str:
    return f"shards/{index:05d}"


def stored_dtype(layer: int, last_layer: int, dtype: str, key_dtype: str | None) -> str:
    """The storage type of one layer: `dtype` for the last layer (it feeds the exact logits), `key_dtype` (when
    set) for the others."""
    return dtype if layer == last_layer else key_dtype or dtype


def layer_dtypes(config: dict, last_layer: int) -> dict[int, str]:
    """The storage type of each stored layer of a cache, from its config."""
    return {layer: stored_dtype(layer, last_layer, config["state_dtype"], config.get("key_dtype"))
            for layer in config["layers"]}


def promised_arrays(n_samples: int, n_tokens: int, hidden: int, dtypes: dict[int, str],
                    top_k: int) -> dict[str, tuple[np.dtype, tuple[int | None, ...]]]:
    """Every array a shard of `n_samples` samples and `n_tokens` tokens must hold: name -> (dtype, shape).

    A None dimension is ragged (text bytes, spans): its length comes from the shard's row pointers.
    """
    arrays = {name: (np.dtype(t), (n_samples,)) for name, t in PER_SAMPLE_ARRAYS.items()}
    arrays |= {name: (np.dtype(t), (n_samples + 1,)) for name, t in POINTER_ARRAYS.items()}
    arrays |= {name: (np.dtype(t), (n_tokens, *rest)) for name, (t, rest) in PER_TOKEN_ARRAYS.items()}
    arrays["text_bytes"] = (np.dtype(np.uint8), (None,))
    for kind in SPAN_KINDS:
        arrays |= {name.format(kind=kind): (np.dtype(t), (None, *rest)) for name, (t, rest) in PER_SPAN_ARRAYS.items()}
    for layer, dtype in dtypes.items():
        arrays[f"states/{layer}"] = (storage_dtype(dtype), (n_tokens, hidden))
        if dtype == "int8":
            arrays[f"states/{layer}.scale"] = (np.dtype(np.float32), (n_tokens,))
    if top_k:
        arrays |= {"topk_ids": (np.dtype(np.int32), (n_tokens, top_k)),
                   "topk_logprobs": (np.dtype(np.float32), (n_tokens, top_k)),
                   "topk_rest": (np.dtype(np.float32), (n_tokens,))}
    return arrays


def compressors(typesize: int) -> list:
    """Blosc zstd level 3 with byte shuffle (~0.75 of raw size on bf16 hidden states), then a CRC32C
    checksum per chunk so `mta cache verify` catches a silently altered chunk, not only a broken one."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=typesize), Crc32cCodec()]


def encode_states(h: torch.Tensor, dtype: str) -> dict[str, np.ndarray]:
    """Encode hidden states [T, d] for storage; returns {"": values} plus {".scale": [T]} for int8."""
    if dtype == "bf16":
        return {"": h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)}
    if dtype == "fp16":
        if torch.isinf(h.to(torch.float16)).any():
            raise OverflowError("hidden states exceed the fp16 range (65504); use --dtype bf16")
        return {"": h.to(torch.float16).numpy()}
    if dtype == "fp32":
        return {"": h.to(torch.float32).numpy()}
    if dtype == "int8":
        h = h.to(torch.float32)
        scale = h.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        q = torch.round(h / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"": q.numpy(), ".scale": scale.numpy()}
    raise ValueError(f"unknown state dtype {dtype!r}; choose one of {', '.join(STATE_DTYPES)}")


def decode_states(values: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """Inverse of `encode_states`: stored values [T, d] -> float32 tensor [T, d]."""
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16).float()
    if dtype == "int8":
        return torch.from_numpy(values).float() * torch.from_numpy(scale)[:, None]
    return torch.from_numpy(np.ascontiguousarray(values)).float()


def storage_dtype(dtype: str) -> np.dtype:
    return np.dtype({"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32, "int8": np.int8}[dtype])
