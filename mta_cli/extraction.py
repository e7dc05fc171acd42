"""`mta extract`: run the teacher and spaCy once over a JSONL file and store what training needs.

Pipeline per shard (S samples): the teacher runs length-bucketed batches while a background thread
segments the same texts with spaCy, and a second background thread writes the previous shard; the
three meet only at the shard boundary, so the teacher never waits for parsing or I/O.
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from mta_cli import __version__, distributed
from mta_cli.cache.layout import BYTES_PER_VALUE, FORMAT_VERSION, STATE_DTYPES, encode_states, stored_dtype
from mta_cli.cache.store import CacheError, CacheWriter, check_output
from mta_cli.encode import Encoded, encode_record
from mta_cli.losses.schedule import default_teacher_layers
from mta_cli.models import (ModelSource, hidden_size, input_device, load_causal_lm, load_tokenizer, n_layers,
                            tokenizer_fingerprint, weights_fingerprint)
from mta_cli.options import check_choice, check_number, flag
from mta_cli.records import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, load_records
from mta_cli.segment import Segmenter, spans_to_token_ranges
from mta_cli.losses.kd import LogitHead
from mta_cli.losses.lens import FinalNorm, final_norm
from mta_cli.teacher import output_head, teacher_forward

# Compressed size / raw size of stored states, measured on SmolLM2-135M states (Blosc zstd 3 + shuffle).
COMPRESSION_ESTIMATE = {"bf16": 0.78, "fp16": 0.85, "fp32": 0.9, "int8": 0.85}
HEAD_COMPRESSION_ESTIMATE = 0.65  # SmolLM2's fp32 head: 113 MB raw, 71-75 MB stored


@dataclass
class ExtractConfig:
    """Every option of `mta extract` (see its --help)."""

    teacher: str
    data: str
    out: str
    format: str = "auto"
    layers: list[int] | None = None
    dtype: str = "bf16"
    key_dtype: str | None = None      # the layers other than the last; None: --dtype
    teacher_dtype: str = "fp32"
    device: str = "auto"
    device_map: str | None = None      # a teacher larger than one device: spread by accelerate (DEVICE_MAPS)
    max_memory: str | None = None      # with device_map: "0=20GiB,1=20GiB,cpu=64GiB"
    offload_folder: str | None = None  # with device_map: where weights that fit nowhere else go
    max_length: int = 512
    max_prompt_length: int = 256
    append_eos: bool = True
    batch_size: int = 8
    shard_size: int = 256
    top_k: int = 0
    spacy_model: str = "auto"
    words: str = "all"
    spacy_processes: int = 1
    skip_invalid: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    force: bool = False           # replace whatever is at `out` instead of resuming or refusing

    def __post_init__(self) -> None:
        from mta_cli.cache.integrity import LIMITS
        from mta_cli.records import FORMATS
        from mta_cli.segment import WORD_MODES

        check_number(self, "max_length", 2, LIMITS["max_length"], integer=True)
        check_number(self, "max_prompt_length", 1, self.max_length - 1, integer=True)
        check_number(self, "batch_size", 1, integer=True)
        check_number(self, "shard_size", 1, LIMITS["shard_size"], integer=True)
        check_number(self, "top_k", 0, LIMITS["top_k"], integer=True)
        check_number(self, "spacy_processes", 1, 256, integer=True)
        check_number(self, "seed", 0, 2**63 - 1, integer=True)
        check_choice(self, "dtype", STATE_DTYPES)
        check_choice(self, "key_dtype", (None, *STATE_DTYPES))
        check_choice(self, "teacher_dtype", ("fp32", "bf16", "fp16"))
        check_choice(self, "format", ("auto", *FORMATS))
        check_choice(self, "words", WORD_MODES)
        if self.layers is not None and any(isinstance(l, bool) or not isinstance(l, int) for l in self.layers):
            raise ValueError(f"--layers must be layer numbers, got {self.layers}")
        if self.device_map is None:
            given = [f for f in ("max_memory", "offload_folder") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(flag(f) for f in given)} only apply with --device-map")
        else:
            check_choice(self, "device_map", DEVICE_MAPS)
            if self.device != "auto":
                raise ValueError(f"--device-map places the teacher over the devices itself; drop --device {self.device}")
            if str(self.teacher).endswith(".gguf"):
                raise ValueError(f"--teacher {self.teacher}: --device-map needs a model folder or hub name (a .gguf "
                                 "file is de-quantised whole in memory); save it as an HF folder first")
            parse_max_memory(self.max_memory)

    @property
    def placement(self) -> dict | None:
        """accelerate's big-model loading options (`models.load_causal_lm`), or None for one device."""
        if self.device_map is None:
            return None
        return {"device_map": self.device_map, "max_memory": parse_max_memory(self.max_memory),
                "offload_folder": self.offload_folder}


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies


def parse_max_memory(text: str | None) -> dict | None:
    """"0=20GiB,1=20GiB,cpu=64GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}: the most each device may hold of
    the teacher (a GPU by index, cpu or mps); a ValueError that says what is wrong otherwise."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    limits: dict = {}
    for part in text.split(","):
        device, sep, size = (x.strip() for x in part.partition("="))
        try:
            if not sep or convert_file_size_to_int(size) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB "
                             f"(got {part.strip()!r})") from None
        if device.isdigit():
            if int(device) >= torch.cuda.device_count():
                raise ValueError(f"--max-memory {text!r}: GPU {device} is not there (this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s))")
            limits[int(device)] = size
        elif device in ("cpu", "mps"):
            limits[device] = size
        else:
            raise ValueError(f"--max-memory {text!r}: {device!r} is no device; use a GPU index, cpu or mps")
    return limits


@dataclass
class ExtractSummary:
    """What an extraction did; printed by the CLI (as JSON with --json)."""

    out: str
    samples: int
    tokens: int
    shards: int
    shards_reused: int
    skipped_invalid: int
    dropped_no_response: int
    truncated: int
    layers: list[int]
    seconds: float
    tokens_per_second: float          # extraction throughput: tokens / wall time of the shard loop
    teacher_seconds: float            # teacher forward time, summed over the ranks
    bytes_written: int                # compressed bytes on disk of the shards written by this run
    ranks: int = 1                    # processes that extracted (torchrun --nproc-per-node)


@dataclass
class Plan:
    """Validated records, tokenized and cut into shards; everything a dry run needs."""

    tokenizer: object
    dataset: object
    samples: list[Encoded]
    source_lines: list[int]
    dropped: int
    truncated: int

    @property
    def n_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)


def plan(config: ExtractConfig) -> Plan:
    """Load, validate and tokenize the data. Raises DataError before anything is written."""
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    dataset = load_records(config.data, fmt=config.format, tokenizer=tokenizer, skip_invalid=config.skip_invalid)
    samples, lines, dropped = [], [], 0
    for record in dataset.records:
        encoded = encode_record(tokenizer, record, config.max_length, config.max_prompt_length, config.append_eos)
        if encoded is None:
            dropped += 1
            continue
        samples.append(encoded)
        lines.append(record.line)
    if not samples:
        raise ValueError(f"{config.data}: no record leaves room for a response within --max-length {config.max_length}")
    return Plan(tokenizer, dataset, samples, lines, dropped, sum(s.truncated for s in samples))


def estimate_bytes(config: ExtractConfig, n_tokens: int, n_teacher_layers: int, d: int, vocab: int,
                   head_bytes: int | None = None) -> dict:
    """Estimated cache size: per-token figures and totals, raw and after compression.

    The head counts as stored: `head_bytes` when it is already written, else its raw size in the teacher's
    precision times the compression measured on SmolLM2's head (0.63 in fp32)."""
    layers = sorted(set(config.layers or default_teacher_layers(n_teacher_layers)) | {n_teacher_layers})
    dtypes = [stored_dtype(layer, n_teacher_layers, config.dtype, config.key_dtype) for layer in layers]
    raw = [d * BYTES_PER_VALUE[dtype] + (4 if dtype == "int8" else 0) for dtype in dtypes]  # per layer and token
    state_raw = sum(raw)
    token_raw = state_raw + 12 + (8 * config.top_k + 4 if config.top_k else 0)  # ids, offsets, top-k
    per_token = sum(r * COMPRESSION_ESTIMATE[dtype] for r, dtype in zip(raw, dtypes)) + 12 * 0.5 + \
        (8 * config.top_k + 4 if config.top_k else 0)
    head = head_bytes if head_bytes is not None else int(
        vocab * d * (2 if config.teacher_dtype in ("bf16", "fp16") else 4) * HEAD_COMPRESSION_ESTIMATE)
    return {"tokens": n_tokens, "layers": layers, "raw_bytes_per_token": token_raw,
            "est_bytes_per_token": per_token, "head_bytes": head, "est_total_bytes": int(per_token * n_tokens + head)}


def resolve_layers(requested: list[int] | None, n_teacher_layers: int) -> list[int]:
    layers = requested or default_teacher_layers(n_teacher_layers)
    bad = [l for l in layers if not 0 <= l <= n_teacher_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: the teacher has layers 0..{n_teacher_layers}")
    return sorted(set(layers) | {n_teacher_layers})


def checked_lens(model, head: LogitHead, input_ids: torch.Tensor) -> FinalNorm | None:
    """Refuse a teacher whose logits the stored head does not reproduce (unknown head type); return its final
    norm for the logit lens, checked on a real intermediate state (None when no known form reproduces it)."""
    with torch.inference_mode():
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        recomputed = head(out.hidden_states[-1].to(head.weight.device))
    if not torch.allclose(recomputed.float().cpu(), out.logits.float().cpu(), rtol=1e-3, atol=1e-3):
        raise CacheError("the teacher's logits are not reproduced by its output head (unsupported head type); "
                         "please report the model architecture")
    return final_norm(model, probe=out.hidden_states[len(out.hidden_states) // 2][0])


def shard_arrays(samples: list[Encoded], lines: list[int], segmentations: list, states: list[dict],
                 topk: list[dict] | None) -> dict[str, np.ndarray]:
    """Concatenate one shard's per-sample pieces into CSR arrays (see cache.layout)."""

    def ptr(lengths) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cat(parts, dtype, width=None) -> np.ndarray:
        shape = (0, width) if width else (0,)
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

    texts = [s.text.encode("utf-8") for s in samples]
    arrays = {
        "text_bytes": np.frombuffer(b"".join(texts), dtype=np.uint8).copy(),
        "text_ptr": ptr([len(t) for t in texts]),
        "prompt_chars": np.array([s.prompt_chars for s in samples], np.int32),
        "source_line": np.array(lines, np.int32),
        "token_ptr": ptr([len(s.input_ids) for s in samples]),
        "input_ids": cat([s.input_ids for s in samples], np.int32),
        "offsets": cat([s.offsets for s in samples], np.int32, 2),
        "n_prompt_tokens": np.array([s.n_prompt_tokens for s in samples], np.int32),
    }
    for kind, plural in (("word", "words"), ("phrase", "phrases")):
        spans = [getattr(seg, plural) for seg in segmentations]
        arrays[plural] = cat(spans, np.int32, 2)
        arrays[f"{kind}_tokens"] = cat(
            [spans_to_token_ranges(s.text, s.offsets, sp) for s, sp in zip(samples, spans)], np.int32, 2)
        arrays[f"{kind}_labels"] = cat([getattr(seg, f"{kind}_labels") for seg in segmentations], np.uint8)
        arrays[f"{kind}_ptr"] = ptr([len(sp) for sp in spans])
    for key in states[0]:
        arrays[f"states/{key[0]}{key[1]}"] = np.concatenate([s[key] for s in states])
    if topk:
        for name in ("topk_ids", "topk_logprobs", "topk_rest"):
            arrays[name] = np.concatenate([t[name] for t in topk])
    return arrays


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (stable sort: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def run_teacher(model, samples: list[Encoded], config: ExtractConfig, layers: list[int], head: LogitHead,
                pad_id: int, device: torch.device, on_batch: Callable[[int, int], None]):
    """Teacher states of every sample of a shard, encoded for storage, in sample order."""
    states: list[dict] = [None] * len(samples)
    topk: list[dict] | None = [None] * len(samples) if config.top_k else None
    for batch in length_batches([len(s.input_ids) for s in samples], config.batch_size):
        width = max(len(samples[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(samples[i].input_ids)
            ids[row, :n] = torch.from_numpy(samples[i].input_ids.astype(np.int64))
            mask[row, :n] = 1
        out = teacher_forward(model, ids.to(device), mask.to(device), layers, head, config.top_k)
        for row, i in enumerate(batch):
            n = len(samples[i].input_ids)
            encoded = {}
            for layer, h in out.states.items():
                dtype = stored_dtype(layer, layers[-1], config.dtype, config.key_dtype)
                for suffix, values in encode_states(h[row, :n].cpu(), dtype).items():
                    encoded[(layer, suffix)] = values
            states[i] = encoded
            if topk is not None:
                topk[i] = {"topk_ids": out.topk_ids[row, :n].cpu().numpy(),
                           "topk_logprobs": out.topk_logprobs[row, :n].float().cpu().numpy(),
                           "topk_rest": out.topk_rest[row, :n].float().cpu().numpy()}
        on_batch(len(batch), int(mask.sum()))
    return states, topk


def cache_metadata(config: ExtractConfig, the_plan: Plan, model, layers: list[int], segmenter: Segmenter) -> dict:
    src = ModelSource.parse(config.teacher)
    text_config = model.config.get_text_config()
    tok = the_plan.tokenizer
    content = {  # decides the cache's content: must match to resume
        "teacher": {"weights_sha256": weights_fingerprint(model), "dtype": config.teacher_dtype},
        "tokenizer_sha256": tokenizer_fingerprint(tok),
        "layers": layers,
        "state_dtype": config.dtype,
        "key_dtype": config.key_dtype or config.dtype,
        "top_k": config.top_k,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "append_eos": config.append_eos,
        "shard_size": config.shard_size,
        "segmentation": segmenter.settings,
        "data": {"sha256": the_plan.dataset.sha256, "format": the_plan.dataset.format,
                 "skip_invalid": config.skip_invalid, "template": prompt_template(the_plan.dataset.format, tok)},
    }
    return {
        "format_version": FORMAT_VERSION,
        "tool": f"mta-cli {__version__}",
        "config": content,
        "teacher": {
            "source": src.display,
            "path": src.location,  # absolute (or a hub name): a moved or copied cache still finds its teacher
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "model_type": text_config.model_type,
            "n_layers": n_layers(model),
            "hidden_size": hidden_size(model),
            "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
            "config": model.config.to_dict(),
        },
        "tokenizer": {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                      "pad_token_id": tok.pad_token_id, "chat_template": getattr(tok, "chat_template", None)},
        "data": {"path": str(config.data), "records": len(the_plan.dataset.records),
                 "skipped_invalid": len(the_plan.dataset.skipped), "dropped_no_response": the_plan.dropped,
                 "truncated": the_plan.truncated, "generated_by": the_plan.dataset.generated_by},
        "n_samples": len(the_plan.samples),
        "n_shards": -(-len(the_plan.samples) // config.shard_size),
        "n_tokens": the_plan.n_tokens,
        "extract_config": asdict(config),
    }


def prompt_template(data_format: str, tokenizer) -> str | dict:
    """How prompts were made: the Alpaca templates, the tokenizer's chat template, or the data's own."""
    if data_format == "alpaca":
        return {"with_input": ALPACA_PROMPT_WITH_INPUT, "without_input": ALPACA_PROMPT}
    if data_format == "chat":
        return {"chat_template": tokenizer.chat_template}
    return "prompts templated in the data file"


def head_arrays(head: LogitHead, norm: FinalNorm | None, teacher_dtype: str) -> dict[str, np.ndarray]:
    """The head and the final norm (for the logit lens) stored in the teacher's compute precision, bit for bit."""
    dtype = teacher_dtype if teacher_dtype in ("bf16", "fp16") else "fp32"
    vectors = {"bias": head.bias} | ({"norm_weight": norm.weight, "norm_bias": norm.bias} if norm else {})
    arrays = {"weight": encode_states(head.weight.cpu(), dtype)[""]}
    for name, vector in vectors.items():
        if vector is not None:
            arrays[name] = encode_states(vector.cpu()[None], dtype)[""][0]
    return arrays


def head_metadata(head: LogitHead, norm: FinalNorm | None, teacher_dtype: str) -> dict:
    """What `CacheReader.head` and `CacheReader.final_norm` need besides the arrays."""
    return {"dtype": teacher_dtype if teacher_dtype in ("bf16", "fp16") else "fp32", "scale": head.scale,
            "softcap": head.softcap, "has_bias": head.bias is not None,
            "norm": {"kind": norm.kind, "eps": norm.eps, "has_bias": norm.bias is not None} if norm else None}


def extract(config: ExtractConfig, progress: Callable[[str, dict], None] | None = None) -> ExtractSummary:
    """Run the teacher and spaCy over `config.data` once and write (or resume) the cache at `config.out`.

    `progress(event, info)` is called with ("status", {message}) while loading, ("start", {samples, tokens,
    reused_shards}), ("batch", {samples, tokens, bytes}) and ("shard", {index, samples, bytes}) so a CLI can
    draw a progress bar; the library prints nothing. The output is checked before the teacher is loaded;
    the cache is locked while it is written (one extraction per cache at a time).

    Under torchrun every rank runs this: rank 0 holds the lock, writes the root metadata and the head, and
    alone reports progress (of all ranks: others' work arrives at each shard round); the shards to write
    are dealt out round-robin (the k-th to rank k % world). Which samples form a shard depends on the data
    and options only, so the cache is the same whatever the number of ranks, and a run stopped under N
    ranks resumes under M. The cache is marked complete once every rank has written its shards.
    """
    started = time.perf_counter()
    ranks = distributed.launched()
    if ranks.distributed and config.device_map:
        raise ValueError("--device-map spreads one teacher over the devices of one process; under torchrun every "
                         "rank takes one device: use one or the other")
    device = distributed.rank_device(config.device, ranks)
    check_output(config.out, config.force)
    with distributed.process_group(device) as ranks, ExitStack() as stack:
        report = progress if progress is not None and ranks.main else (lambda event, info: None)
        torch.manual_seed(config.seed)
        with distributed.together(ranks):
            report("status", {"message": f"reading {config.data} and tokenizing with the teacher's tokenizer"})
            the_plan = plan(config)
            named = "" if config.spacy_model == "auto" else f" ({config.spacy_model})"
            report("status", {"message": f"loading spaCy{named}"})
            segmenter = Segmenter(config.spacy_model, words=config.words, n_process=config.spacy_processes)
            where = f"device map {config.device_map}" if config.device_map else device
            report("status", {"message": f"loading the teacher {config.teacher} ({config.teacher_dtype}, {where})"})
            model = load_causal_lm(config.teacher, config.teacher_dtype, str(device), config.trust_remote_code,
                                   config.placement)
            device = input_device(model)
            layers = resolve_layers(config.layers, n_layers(model))
            head = output_head(model)
            probe = torch.from_numpy(the_plan.samples[0].input_ids[None].astype(np.int64)).to(device)
            norm = checked_lens(model, head, probe)
            report("status", {"message": "fingerprinting the teacher's weights"})
            meta = cache_metadata(config, the_plan, model, layers, segmenter)
            meta["teacher"]["head"] = head_metadata(head, norm, config.teacher_dtype)
            if ranks.main:
                writer = stack.enter_context(CacheWriter(config.out, meta, force=config.force))
        try:
            with distributed.together(ranks):
                if ranks.main:
                    writer.write_head(head_arrays(head, norm, config.teacher_dtype))
                else:
                    writer = stack.enter_context(CacheWriter(config.out, meta, join=True))
            todo = distributed.broadcast(ranks, [k for k in range(meta["n_shards"]) if not writer.shard_complete(k)]
                                         if ranks.main else None)
            summary = _write_shards(config, the_plan, model, layers, head, segmenter, device, meta, writer, report,
                                    ranks, todo)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise CacheError(disk_full_message(config, the_plan, model, writer)) from None
            raise
        summary.seconds = time.perf_counter() - started
        if ranks.main:
            timing = {"seconds": summary.seconds, "tokens_per_second": summary.tokens_per_second}
            if summary.shards_reused == summary.shards:  # nothing extracted now: keep the figures of the run that did
                timing = writer.root.attrs["mta"].get("extraction", timing)
            writer.finish({"extraction": timing})
    return summary


def disk_full_message(config: ExtractConfig, the_plan: Plan, model, writer: CacheWriter) -> str:
    """What a full disk needs: the whole cache's estimated size (head as stored), and that re-running resumes."""
    head_bytes = writer.stored_bytes("head") if writer.complete("head") else None
    estimate = estimate_bytes(config, the_plan.n_tokens, n_layers(model), hidden_size(model),
                              int(model.get_output_embeddings().weight.shape[0]), head_bytes)
    return (f"{config.out}: the disk is full. The whole cache needs about {estimate['est_total_bytes'] / 2**30:,.2f} "
            f"GiB ({estimate['est_bytes_per_token']:,.0f} bytes/token x {the_plan.n_tokens:,} tokens + the head); "
            "complete shards are kept: free space, then re-run the same command to resume")


def _write_shards(config: ExtractConfig, the_plan: Plan, model, layers: list[int], head: LogitHead,
                  segmenter: Segmenter, device: torch.device, meta: dict, writer: CacheWriter,
                  report: Callable[[str, dict], None], ranks: distributed.Ranks, todo: list[int]) -> ExtractSummary:
    """The shard loop (module docstring): teacher batches, spaCy and writes overlapped; returns the summary.

    This rank writes shards todo[rank], todo[rank + world], ...: one per round, the ranks meeting after each
    round (`distributed.together`) to stop together on a failure and to add up their progress. A last round
    waits for the last write, so every rank's shards are complete when this returns."""
    size = config.shard_size
    shards = {k: list(range(k * size, min((k + 1) * size, len(the_plan.samples)))) for k in range(meta["n_shards"])}
    mine = todo[ranks.rank::ranks.world]
    reused = len(shards) - len(todo)
    report("start", {"samples": sum(len(shards[k]) for k in todo), "reused_shards": reused,
                     "tokens": sum(len(the_plan.samples[i].input_ids) for k in todo for i in shards[k])})

    counters = {"tokens": 0, "samples": 0, "bytes": 0, "teacher_seconds": 0.0}
    totals = {"bytes": 0}  # the other ranks' bytes, as of the last round
    pad_id = the_plan.tokenizer.pad_token_id if the_plan.tokenizer.pad_token_id is not None else 0
    with ThreadPoolExecutor(1, thread_name_prefix="mta-spacy") as parse_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="mta-write") as write_pool:
        def parse_async(idx: list[int]) -> Future:
            return parse_pool.submit(lambda: list(segmenter([the_plan.samples[i].text for i in idx],
                                                            [the_plan.samples[i].prompt_chars for i in idx])))

        def on_batch(n_samples: int, n_tokens: int) -> None:
            counters["tokens"] += n_tokens
            counters["samples"] += n_samples
            report("batch", {"samples": n_samples, "tokens": n_tokens, "bytes": totals["bytes"] + counters["bytes"]})

        loop_started = time.perf_counter()
        pending_write: Future | None = None
        next_parse = parse_async(shards[mine[0]]) if mine else None
        for position in range(-(-len(todo) // ranks.world) + 1):
            reported = dict(counters)
            with distributed.together(ranks) as round_:
                if position < len(mine):
                    k, idx = mine[position], shards[mine[position]]
                    parse = next_parse
                    if position + 1 < len(mine):
                        next_parse = parse_async(shards[mine[position + 1]])
                    samples = [the_plan.samples[i] for i in idx]
                    t0 = time.perf_counter()
                    states, topk = run_teacher(model, samples, config, layers, head, pad_id, device, on_batch)
                    counters["teacher_seconds"] += time.perf_counter() - t0
                    arrays = shard_arrays(samples, [the_plan.source_lines[i] for i in idx], parse.result(), states,
                                          topk)
                    if pending_write is not None:
                        pending_write.result()
                    attrs = {"n_samples": len(samples), "n_tokens": int(arrays["token_ptr"][-1]),
                             "first_sample": idx[0]}
                    pending_write = write_pool.submit(write_and_count, writer, k, arrays, attrs, counters, totals,
                                                      report)
                elif pending_write is not None:
                    pending_write.result()
                    pending_write = None
                round_.value = {key: counters[key] - reported[key] for key in ("tokens", "samples", "bytes")}
            others = [value for rank, value in enumerate(round_.values) if rank != ranks.rank]
            totals["bytes"] += sum(v["bytes"] for v in others)
            if others and any(v["tokens"] for v in others):
                report("batch", {"samples": sum(v["samples"] for v in others),
                                 "tokens": sum(v["tokens"] for v in others),
                                 "bytes": totals["bytes"] + counters["bytes"]})
        loop_seconds = time.perf_counter() - loop_started

    figures = {"tokens": counters["tokens"], "bytes": counters["bytes"], "teacher_seconds": counters["teacher_seconds"]}
    with distributed.together(ranks) as final:
        final.value = figures
    tokens = sum(v["tokens"] for v in final.values)
    return ExtractSummary(
        out=str(config.out), samples=len(the_plan.samples), tokens=the_plan.n_tokens, shards=len(shards),
        shards_reused=reused, skipped_invalid=len(the_plan.dataset.skipped), dropped_no_response=the_plan.dropped,
        truncated=the_plan.truncated, layers=layers, seconds=0.0,
        tokens_per_second=tokens / loop_seconds if tokens else 0.0,
        teacher_seconds=sum(v["teacher_seconds"] for v in final.values),
        bytes_written=sum(v["bytes"] for v in final.values), ranks=ranks.world,
    )


def write_and_count(writer: CacheWriter, k: int, arrays: dict, attrs: dict, counters: dict, totals: dict,
                    report) -> None:
    """Write shard k, count its bytes in this rank's `counters`, and report the job's bytes so far (this rank's
    and, from `totals`, the other ranks' as of the last round)."""
    counters["bytes"] += writer.write_shard(k, arrays, attrs)
    report("shard", {"index": k, "samples": attrs["n_samples"], "bytes": totals["bytes"] + counters["bytes"]})
