"""`mta generate`: a model's responses to the prompts of a data file, written as records `mta extract` reads.

Offline rounds of DistiLLM / DistiLLM-2 need a model's own responses (the student of the previous round, or the
teacher) to the training prompts: generate them once, extract the teacher on them once, train. The output is
JSONL in the "prompt" format, one record per (prompt, seed), seed-major; within a seed, in the order the batches
run (`Sampler.batches`: longest prompt first, so the responses are those `mta eval` samples for the same model,
data, seed, batch size and max new tokens):

    {"prompt": the exact prompt text, "output": the response, "source_line": the record's line in the data file,
     "seed": the seed, "generated_by": {"model": absolute path or hub name, "weights_sha256": fingerprint}}

A response that comes out empty (EOS first, or only white space) is not written, since extract refuses empty
responses; it is counted. Records are appended and flushed one by one, and the settings that decide them are kept
beside the output (`<out>.settings.json`): a re-run with the same settings resumes after the last whole record (a
torn last line is dropped) and writes the same file, byte for byte, as an uninterrupted run; a re-run with other
settings is refused with the differences listed (`force` starts over).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mta_cli import __version__
from mta_cli.cache.store import config_differences
from mta_cli.evaluation import Sampler
from mta_cli.models import ModelSource, load_causal_lm, load_tokenizer, resolve_device, weights_fingerprint
from mta_cli.options import check_choice, check_number
from mta_cli.outputs import check_file
from mta_cli.records import FORMATS, load_records


@dataclass
class GenerateConfig:
    """Every option of `mta generate` (see its --help)."""

    model: str
    data: str
    out: str
    seeds: list[int] = field(default_factory=lambda: [10])
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    max_records: int | None = None    # only the first N valid records of the file
    format: str = "auto"
    skip_invalid: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    force: bool = False               # start over instead of resuming (or refusing) an existing output

    def __post_init__(self) -> None:
        seeds = self.seeds if isinstance(self.seeds, (list, tuple)) else None
        if not seeds or len(set(seeds)) != len(seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in seeds):
            raise ValueError(f"--seeds must be one or more distinct non-negative integers, got {self.seeds!r}")
        self.seeds = list(seeds)
        check_number(self, "max_new_tokens", 1, integer=True)
        check_number(self, "temperature", 0, low_open=True)
        check_number(self, "top_p", 0, 1, low_open=True)
        check_number(self, "batch_size", 1, integer=True)
        check_number(self, "max_records", 1, integer=True, optional=True)
        check_choice(self, "format", ("auto", *FORMATS))
        check_choice(self, "dtype", ("fp32", "bf16", "fp16"))


@dataclass
class GenerateSummary:
    """What a generation did; printed by the CLI (as JSON with --json). records + empty_responses = prompts x
    seeds once the file is complete."""

    out: str
    prompts: int
    seeds: list[int]
    records: int                      # records in the file now
    records_written: int              # of which appended by this run (the rest were kept from an earlier one)
    empty_responses: int              # (prompt, seed) pairs whose response came out empty: not written
    skipped_invalid: int              # invalid data records skipped under --skip-invalid
    tokens_generated: int             # tokens of the responses written by this run, EOS not counted
    seconds: float
    tokens_per_second: float          # tokens_generated / wall time of the sampling loop


def settings_path(out: str | Path) -> Path:
    """The settings file kept beside the output: `gen.jsonl` -> `gen.jsonl.settings.json`."""
    return Path(f"{out}.settings.json")


class Output:
    """The output JSONL and its settings file: what an earlier run left, checked against this run's settings."""

    def __init__(self, config: GenerateConfig):
        self.path, self.settings_path = Path(config.out), settings_path(config.out)
        for path in (self.path, self.settings_path):
            check_file(path, "--out")
        if self.path.exists() and Path(config.data).exists() and self.path.samefile(config.data):
            raise ValueError(f"--out {config.out} is the --data file; choose another --out")
        data = b"" if config.force or not self.path.exists() else self.path.read_bytes()
        whole = data.rpartition(b"\n")[0] if data.strip() else b""  # a last line without its newline: torn by a kill
        self.kept_bytes = len(whole) + 1 if whole else 0
        self.lines = whole.split(b"\n") if whole else []
        self.stored = self._stored_settings() if data.strip() else None

    def _stored_settings(self) -> dict:
        try:
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))["settings"]
        except FileNotFoundError:
            raise ValueError(f"--out {self.path} exists and has no {self.settings_path.name} beside it (it was not "
                             "written by mta generate); choose another --out, or pass --force to replace it") from None
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not an object with settings
            stored = None
        if not isinstance(stored, dict):
            raise ValueError(f"{self.settings_path} is not a settings file of mta generate; pass --force to start "
                             f"{self.path} over")
        return stored

    def check(self, settings: dict) -> None:
        """Refuse to add to records that were generated with other settings (the keys of `settings` only)."""
        if self.stored is None:
            return
        diffs = config_differences({k: self.stored.get(k) for k in settings}, settings, held=self.settings_path.name)
        if diffs:
            raise ValueError(f"{self.path} was generated with other settings; refusing to mix them.\n  "
                             + "\n  ".join(diffs) + "\nRe-run with the same options, use another --out, or pass "
                             "--force to start over.")

    def resume_position(self, plan: list[tuple[int, int]]) -> tuple[int, int]:
        """(position in `plan` after the last record kept, records kept). `plan` lists (source_line, seed) in the
        order records are written; the kept records must follow it (the pairs in between came out empty)."""
        position = {pair: p for p, pair in enumerate(plan)}
        last = -1
        for n, raw in enumerate(self.lines, start=1):
            try:
                record = json.loads(raw)
                p = position[(record["source_line"], record["seed"])]
            except (ValueError, KeyError, TypeError):
                p = None
            if p is None or p <= last:
                raise ValueError(f"{self.path}:{n}: not the record that comes next with these settings (the file "
                                 "was changed); pass --force to start over")
            last = p
        return last + 1, len(self.lines)

    def open(self, settings: dict, data_path: str):
        """Write the settings (atomically), drop a torn last line, and open the output for appending."""
        partial = self.settings_path.with_name(self.settings_path.name + ".partial")
        partial.write_text(json.dumps({"mta_version": __version__, "data": data_path, "settings": settings},
                                      indent=2) + "\n", encoding="utf-8")
        os.replace(partial, self.settings_path)
        f = open(self.path, "ab")
        f.truncate(self.kept_bytes)
        return f


def generate_records(config: GenerateConfig, progress: Callable[[str, dict], None] | None = None) -> GenerateSummary:
    """Write (or resume) `config.out`: the responses of `config.model` to the prompts of `config.data` (module
    docstring).

    The output, the options and the data are checked before the model is loaded; the settings of an existing
    output before it too, the model's fingerprint after. `progress(event, info)` is called with ("status",
    {message}) while loading, ("start", {total, done}) in (prompt, seed) pairs, and ("batch", {pairs, records,
    tokens}) after each batch's records are written; the library prints nothing.
    """
    report = progress or (lambda event, info: None)
    started = time.perf_counter()
    output = Output(config)
    source = ModelSource.parse(config.model)
    device = resolve_device(config.device)
    report("status", {"message": f"reading {config.data}"})
    tokenizer = load_tokenizer(config.model)  # chat prompts are rendered with the model's own template
    dataset = load_records(config.data, fmt=config.format, tokenizer=tokenizer, skip_invalid=config.skip_invalid)
    records = dataset.records[:config.max_records] if config.max_records else dataset.records
    settings = {"model": source.location, "data_sha256": dataset.sha256, "format": dataset.format,
                "skip_invalid": config.skip_invalid, "max_records": config.max_records, "seeds": config.seeds,
                "max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
                "batch_size": config.batch_size, "dtype": config.dtype, "device": device.type}
    output.check(settings)
    report("status", {"message": f"loading {source.display} ({config.dtype}, {device})"})
    model = load_causal_lm(config.model, dtype=config.dtype, device=str(device))
    generated_by = {"model": source.location, "weights_sha256": weights_fingerprint(model)}
    settings["weights_sha256"] = generated_by["weights_sha256"]
    output.check(settings)

    sampler = Sampler(model, tokenizer, temperature=config.temperature, top_p=config.top_p,
                      max_new_tokens=config.max_new_tokens)
    encoded = [sampler.encode(r.prompt) for r in records]
    batches = sampler.batches(encoded, config.batch_size)
    plan = [(records[i].line, seed) for seed in config.seeds for idx in batches for i in idx]
    resume, kept = output.resume_position(plan)
    report("start", {"total": len(plan), "done": resume})
    written = empty = tokens = 0
    loop_started = time.perf_counter()
    with output.open(settings, config.data) as f:
        position = 0
        for seed in config.seeds:
            for b, idx in enumerate(batches):
                first, position = position, position + len(idx)
                if position <= resume:
                    continue
                new = sampler.sample([encoded[i] for i in idx], seed, b)
                counts = {"pairs": position - max(first, resume), "records": 0, "tokens": 0}
                for p, i, ids in zip(range(first, position), idx, new):
                    if p < resume:
                        continue
                    text = sampler.decode(ids)
                    if not text.strip():
                        empty += 1
                        continue
                    record = {"prompt": records[i].prompt, "output": text, "source_line": records[i].line,
                              "seed": seed, "generated_by": generated_by}
                    f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                    f.flush()
                    counts["records"] += 1
                    counts["tokens"] += len(ids)
                written += counts["records"]
                tokens += counts["tokens"]
                report("batch", counts)
    loop_seconds = time.perf_counter() - loop_started
    return GenerateSummary(
        out=str(config.out), prompts=len(records), seeds=config.seeds, records=kept + written,
        records_written=written, empty_responses=resume - kept + empty, skipped_invalid=len(dataset.skipped),
        tokens_generated=tokens, seconds=time.perf_counter() - started,
        tokens_per_second=tokens / loop_seconds if tokens else 0.0)
