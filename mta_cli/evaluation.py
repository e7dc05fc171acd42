"""Evaluation of instruction-following models: the protocol of method.md §8.

For every model and data file: sample one response per prompt for each seed (temperature 1, top-p 1 by
default), score it with ROUGE-L F x100 (max over references), average over records per seed, then report
mean and std over seeds; plus the teacher-forced NLL / perplexity of the first reference. With a baseline,
every other model gets paired differences against it with bootstrap intervals (`mta_cli.paired`). Everything
is a plain function; the CLI (`mta eval`) and any progress display sit on top.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from rich.table import Table

from mta_cli import __version__
from mta_cli.cache.reader import CacheReader
from mta_cli.encode import encode_record
from mta_cli.labels import model_labels
from mta_cli.losses.kd import auto_chunk_size
from mta_cli.models import ModelSource, load_causal_lm, load_tokenizer, resolve_device
from mta_cli.paired import Bootstrap, paired_comparison
from mta_cli.records import load_records
from mta_cli.teacher import output_head
from mta_cli.trajectory import trajectory_diagnostics

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
GREEDY = "greedy"  # the key of the single pass of greedy decoding where seeds would be


class EvalError(ValueError):
    """Evaluation cannot run as asked; the message names the file or setting and what to do."""


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of `prediction`, the max over `references` (rouge-score, Porter stemming)."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


# ---------------------------------------------------------------------------------------------- generation


class Sampler:
    """Seeded, batched response sampling from one model: what `generate` and `mta generate` share.

    Sampling is pure (no top-k, no repetition penalty) at `temperature` / `top_p`; `greedy` ignores seeds.
    A prompt longer than the model's max positions minus `max_new_tokens` is truncated from the left (a
    leading BOS kept), so that its end, which asks for the response, survives. A response stops at the
    tokenizer's EOS or any EOS of the model's generation config.
    """

    def __init__(self, model, tokenizer, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.limit = _prompt_limit(model, max_new_tokens)
        configured = model.generation_config.eos_token_id
        ids = [tokenizer.eos_token_id] + (configured if isinstance(configured, list) else [configured])
        self.eos = sorted({i for i in ids if i is not None})
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.decoding = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                                  top_p=top_p, top_k=0, repetition_penalty=1.0)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, left-truncated to the room the model has (see the class docstring)."""
        return _prompt_ids(self.tokenizer, prompt, self.limit)

    @staticmethod
    def batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
        """Prompt indices in batches of `batch_size`, longest prompt first (ties in prompt order): little padding."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def sample(self, encoded: list[list[int]], seed: int, batch_index: int) -> list[list[int]]:
        """The new token ids of each prompt of one batch, cut before the first EOS.

        The prompts are left-padded into one [B, width] batch. `model.generate` draws from torch's global RNG,
        so it is reseeded from (seed, batch_index) inside `torch.random.fork_rng` (the caller's RNG state is
        left untouched): the same prompts, seed and batch index give the same tokens on the same device.
        """
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        device = self.model.device
        with torch.random.fork_rng(), torch.inference_mode():
            torch.manual_seed(_batch_seed(seed, batch_index))
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                                      **self.decoding)
        return [_cut_at_eos(new, self.eos) for new in out[:, width:].tolist()]

    def decode(self, ids: list[int]) -> str:
        """A response's text, special tokens skipped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _prompt_limit(model, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit before `max_new_tokens` new ones; None when the model has no position limit."""
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is None:
        return None
    if max_new_tokens >= max_positions:
        raise EvalError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model has "
                        f"{max_positions} positions; lower --max-new-tokens")
    return max_positions - max_new_tokens


def _prompt_ids(tokenizer, prompt: str, limit: int | None) -> list[int]:
    """Token ids of a prompt, left-truncated to `limit` (keeping a leading BOS) so that its end, which asks
    for the response, survives."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    if limit is None or len(ids) <= limit:
        return ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos:
        return [bos] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def _batch_seed(seed: int, batch_index: int) -> int:
    """A seed for one batch, derived from (seed, batch index) without overlap between nearby seeds."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def _cut_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def generate(model, tokenizer, prompts: list[str], seed: int, greedy: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 8,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """One response per prompt, in the order of `prompts` (`Sampler`: batched longest first, each batch
    seeded from (seed, batch index)): the same seed, prompts and batch size give the same outputs on the
    same device. `on_batch(n)` is called after each batch of n prompts.
    """
    if not prompts:
        return []
    sampler = Sampler(model, tokenizer, greedy, temperature, top_p, max_new_tokens)
    encoded = [sampler.encode(p) for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    for b, idx in enumerate(sampler.batches(encoded, batch_size)):
        for i, new in zip(idx, sampler.sample([encoded[i] for i in idx], seed, b)):
            outputs[i] = sampler.decode(new)
        if on_batch:
            on_batch(len(idx))
    return outputs


# ---------------------------------------------------------------------------------------------- likelihood


class ReferenceNLL(NamedTuple):
    """What `reference_nll` measures: the token-level mean NLL (nats), its perplexity, and each record's own
    mean token NLL (None for a record skipped for having no response token)."""

    nll: float
    ppl: float
    per_record: list[float | None]


def reference_nll(model, tokenizer, records: Sequence, batch_size: int = 8, max_length: int = 512,
                  max_prompt_length: int = 256, on_batch: Callable[[int], None] | None = None) -> ReferenceNLL:
    """The NLL of the first reference given the prompt, teacher-forced, over all records and per record.

    `nll` is the mean over all response tokens of all records (a token-level mean, not a mean of per-record
    means), the EOS token appended to each response counted as a target; ppl = exp(nll). `per_record[i]` is
    the mean over record i's own response tokens, from the same forward pass (the unit of paired comparisons).
    Records are encoded like training samples (`encode_record`: at most `max_prompt_length` prompt and
    `max_length` total tokens; a record with no response token left is skipped).
    """
    encoded = ((i, encode_record(tokenizer, r, max_length, max_prompt_length, append_eos=True))
               for i, r in enumerate(records))
    encs = sorted(((i, e) for i, e in encoded if e is not None), key=lambda item: len(item[1].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    scorer = ResponseScorer(model)
    total, count = 0.0, 0
    per_record: list[float | None] = [None] * len(records)
    with torch.inference_mode():
        for start in range(0, len(encs), batch_size):
            batch = encs[start:start + batch_size]
            width = max(len(e.input_ids) for _, e in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]: position t is a response token
            for row, (_, e) in enumerate(batch):
                n = len(e.input_ids)
                ids[row, :n] = torch.as_tensor(e.input_ids, dtype=torch.long)
                mask[row, :n] = 1
                target[row, max(e.n_prompt_tokens, 1):n] = True  # token 0 has nothing to be predicted from
            ids, mask, target = ids.to(device), mask.to(device), target.to(device)
            token_nll = torch.zeros(target.shape, dtype=torch.float64, device=device)  # [B, T]: at the target
            token_nll[target] = scorer(ids, mask, target)
            sums, counts = token_nll.sum(1).tolist(), target.sum(1).tolist()  # per row [B]
            for (i, _), row_sum, row_count in zip(batch, sums, counts):
                per_record[i] = row_sum / row_count if row_count else None
            total += sum(sums)
            count += sum(counts)
            if on_batch:
                on_batch(len(batch))
    if count == 0:
        raise ValueError("no response tokens to score: every response is empty or truncated away")
    mean = total / count
    return ReferenceNLL(mean, math.exp(mean), per_record)


class ResponseScorer:
    """The NLL of the response tokens of a batch, computing logits at those positions only.

    The full [B, T, V] logits of a batch of 16 x 256 with a 49k vocabulary are 800 MB, most of them for prompt
    and padding positions: instead the last hidden states of the positions that predict a response token go
    through the model's output head (`output_head`) a chunk at a time. The first batch checks that head against
    the model's own logits; a model whose head cannot be reproduced is scored from its full logits instead.
    """

    def __init__(self, model):
        self.model = model
        self.head = output_head(model)
        self.chunk_size = auto_chunk_size(self.head.weight.shape[0])
        self.exact_head: bool | None = None  # decided on the first batch

    def __call__(self, ids: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        """ids, mask, target [B, T] (target: the response tokens, never position 0) -> NLL per target [N] float64."""
        predicting = target[:, 1:]  # [B, T-1]: the position before each target
        labels = ids[:, 1:][predicting]  # [N]
        if self.exact_head is False:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1][predicting]  # [N, V]
            return F.cross_entropy(logits.float(), labels, reduction="none").double()
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                         logits_to_keep=1)
        last = out.hidden_states[-1]  # [B, T, d]
        if self.exact_head is None:
            own, ours = out.logits[:, -1].float(), self.head(last[:, -1]).float()  # [B, V]
            self.exact_head = torch.allclose(ours, own, rtol=1e-3, atol=1e-3 * own.abs().max().item())
            if not self.exact_head:
                return self(ids, mask, target)
        hidden = last[:, :-1][predicting]  # [N, d]
        return torch.cat([F.cross_entropy(self.head(hidden[i:i + self.chunk_size]).float(),
                                          labels[i:i + self.chunk_size], reduction="none").double()
                          for i in range(0, len(labels), self.chunk_size)])


# ---------------------------------------------------------------------------------------------- report


@dataclass
class FileResult:
    """Figures of one model on one data file. `rougeL_per_seed` maps str(seed) (or "greedy") to the mean
    ROUGE-L over records; `rougeL_std` is the population std (ddof=0) over seeds, 0 for one seed.
    `rougeL_per_record` (per seed key, in record order) and `nll_per_record` (each record's mean token NLL,
    None for a record with no response token) are what paired comparisons resample. The three NLL fields
    are None when the NLL pass was skipped."""

    file: str
    sha256: str
    n_records: int
    rougeL_mean: float
    rougeL_std: float
    rougeL_per_seed: dict[str, float]
    rougeL_per_record: dict[str, list[float]]
    nll: float | None                      # None for every NLL figure when evaluated with nll=False
    ppl: float | None
    nll_per_record: list[float | None] | None
    wall_s: float


@dataclass
class ModelResult:
    model: str                             # as given (path, .gguf file or hub name)
    load_s: float
    files: list[FileResult]
    trajectory: list[dict] | None = None   # per key-layer pair: dsa, cka (with --cache)
    paired: dict | None = None             # against the baseline (`paired.paired_comparison`); None for it
    name: str = ""                         # short label: NAME of --model NAME=PATH, else folder or file name

    @property
    def label(self) -> str:
        return self.name or self.model

    def average(self) -> dict:
        """Figures averaged over files: ROUGE-L per seed averaged over files, then mean and population std
        over seeds (so the mean is the mean of the file means); NLL the mean of file NLLs, ppl = exp of it
        (both None without the NLL pass)."""
        keys = self.files[0].rougeL_per_seed.keys()
        per_seed = {k: statistics.fmean(f.rougeL_per_seed[k] for f in self.files) for k in keys}
        nll = None if any(f.nll is None for f in self.files) else statistics.fmean(f.nll for f in self.files)
        return {"rougeL_mean": statistics.fmean(per_seed.values()), "rougeL_std": statistics.pstdev(per_seed.values()),
                "rougeL_per_seed": per_seed, "nll": nll, "ppl": None if nll is None else math.exp(nll),
                "wall_s": sum(f.wall_s for f in self.files)}


@dataclass
class EvalReport:
    """All figures of an `evaluate` run (`to_json`) and every generation (`write_generations`, JSONL)."""

    settings: dict
    models: list[ModelResult]
    generations: list[dict] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {
            "mta_version": __version__,
            "settings": self.settings,
            "models": [{"model": m.model, "name": m.label, "load_s": m.load_s, "files": [asdict(f) for f in m.files],
                        "average": m.average(), "trajectory": m.trajectory, "paired": m.paired}
                       for m in self.models],
        }

    def write_generations(self, path: str | Path) -> None:
        """One JSON object per line: model, file, seed (null when greedy), line, prompt, prediction,
        references, rougeL."""
        with open(path, "w", encoding="utf-8") as f:
            for row in self.generations:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _file_labels(files: list[str]) -> list[str]:
    """Short column names: file names, or the paths as given where two files share a name."""
    names = [Path(f).name for f in files]
    return [n if names.count(n) == 1 else f for n, f in zip(names, files)]


PAIRED_COLUMNS = (("ΔROUGE-L [95% CI]", "rougeL", 2), ("ΔNLL/prompt [95% CI]", "nll", 3))


def render_table(report: EvalReport) -> Table:
    """One row per model; a "mean ± std" ROUGE-L cell per data file, their average, and NLL / ppl averaged
    over files (unless the NLL pass was skipped). With a baseline, a column per paired figure (averaged over
    files): difference [95% CI]."""
    s = report.settings
    with_nll = s["nll"]
    decoding = ("greedy" if s["greedy"] else
                f"T={s['temperature']:g}, top-p={s['top_p']:g}, seeds {','.join(map(str, s['seeds']))}")
    caption = None
    if s["baseline"] is not None:
        caption = (f"Δ: model - {s['baseline']}, mean paired difference averaged over files; 95% percentile "
                   f"bootstrap over prompts (a prompt's seeds kept together), {s['bootstrap_samples']} resamples, "
                   f"seed {s['bootstrap_seed']}. NLL/prompt: each prompt's mean token NLL, prompts weighted equally")
    table = Table(title=f"ROUGE-L F x100 ({decoding}; mean ± std over seeds)", caption=caption)
    table.add_column("model", overflow="fold")
    files = [f.file for f in report.models[0].files] if report.models else []
    for label in _file_labels(files):
        table.add_column(label, justify="right")
    for name in ("avg", "NLL", "ppl") if with_nll else ("avg",):
        table.add_column(name, justify="right")
    paired_columns = [c for c in PAIRED_COLUMNS if with_nll or c[1] != "nll"] if s["baseline"] is not None else []
    for header, _, _ in paired_columns:
        table.add_column(header, justify="right")
    for m in report.models:
        avg = m.average()
        cells = [f"{f.rougeL_mean:.2f} ± {f.rougeL_std:.2f}" for f in m.files]
        deltas = [_paired_cell(m.paired, name, digits) for _, name, digits in paired_columns]
        nll_cells = [f"{avg['nll']:.3f}", f"{avg['ppl']:.2f}"] if with_nll else []
        table.add_row(m.label, *cells, f"{avg['rougeL_mean']:.2f} ± {avg['rougeL_std']:.2f}", *nll_cells, *deltas)
    return table


def _paired_cell(paired: dict | None, name: str, digits: int) -> str:
    """"+0.27 [-0.10, +0.65]" from the averaged paired figures; "baseline" for the baseline's own row."""
    if paired is None:
        return "baseline"
    average = paired["average"]
    lo, hi = average[f"{name}_ci95"]
    return f"{average[f'{name}_delta']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


# ---------------------------------------------------------------------------------------------- evaluate


def render_trajectory(report: EvalReport) -> Table:
    """One row per model and key-layer pair: DSA distance (lower is better) and linear CKA (higher)."""
    table = Table(title="Trajectory alignment with the cached teacher (DSA ↓, linear CKA ↑)")
    for name in ("model", "student layer", "teacher layer", "granularity", "DSA", "CKA"):
        table.add_column(name, justify="left" if name in ("model", "granularity") else "right")
    for m in report.models:
        for row in m.trajectory or []:
            table.add_row(m.label, str(row["student_layer"]), str(row["teacher_layer"]), row["granularity"],
                          f"{row['dsa']:.4f}", f"{row['cka']:.3f}")
    return table


def with_baseline(models: list[str], baseline: str) -> tuple[list[str], int]:
    """The models to evaluate and the baseline's index among them: the first --model that names the same model
    (folder, file or hub name, however spelled), else the baseline is added in front."""
    where = ModelSource.parse(baseline).location
    for index, spec in enumerate(models):
        if ModelSource.parse(spec).location == where:
            return list(models), index
    return [baseline, *models], 0


def _check_inputs(models: list[str], data_files: list[str], seeds: Sequence[int], greedy: bool,
                  baseline: str | None) -> None:
    if not models:
        raise EvalError("no model given: pass at least one --model")
    if not data_files:
        raise EvalError("no data file given: pass at least one --data")
    for _, spec in model_labels(models):
        ModelSource.parse(spec)  # raises for a missing .gguf file
    if baseline is not None:
        if len(models) < 2:
            raise EvalError(f"--baseline {baseline}: nothing to compare with it; pass at least one other --model")
        if len(set(data_files)) != len(data_files):
            raise EvalError("--baseline compares per data file: give each --data file once")
    if not greedy:
        if not seeds:
            raise EvalError("no seeds given: pass --seeds 10,20,... or use --greedy")
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise EvalError(f"seeds must be distinct non-negative integers, got {list(seeds)}")


def evaluate(models: list[str], data_files: list[str], seeds: Sequence[int] = DEFAULT_SEEDS, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 8,
             max_records: int | None = None, max_length: int = 512, max_prompt_length: int = 256,
             device: str = "auto", dtype: str = "fp32", progress=None, cache: str | None = None,
             cache_samples: int = 64, skip_invalid: bool = False, baseline: str | None = None,
             bootstrap_samples: int = 10_000, bootstrap_seed: int = 0, nll: bool = True) -> EvalReport:
    """Evaluate every model on every data file (method.md §8) and return all figures and generations.

    Each model is loaded once and freed before the next. Per file: one generation pass per seed (a single
    greedy pass when `greedy`, seeds ignored), ROUGE-L per record (max over references), its mean over
    records per seed, then mean and population std (ddof=0) over seeds; and the NLL / ppl of the first
    reference (`reference_nll`; skipped with `nll=False`, which leaves every NLL figure None). A model given
    as `NAME=PATH` is labelled NAME, else by its folder or file name. `progress` is an optional
    `rich.progress.Progress` to report to.
    With `cache`, each model also gets trajectory diagnostics (DSA, CKA per key-layer pair) against the
    teacher states of the cache's first `cache_samples` samples. `skip_invalid` skips invalid records
    instead of refusing the file.
    With `baseline` (one of `models`, matched by location however spelled, or evaluated first when absent),
    every other model's `paired` figures are its differences from the baseline with 95% bootstrap intervals
    over prompts (`mta_cli.paired`: `bootstrap_samples` replicates from `bootstrap_seed`).
    """
    bootstrap = Bootstrap(bootstrap_samples, bootstrap_seed)
    baseline_index = None
    if baseline is not None:
        models, baseline_index = with_baseline(models, baseline)
    _check_inputs(models, data_files, seeds, greedy, baseline)
    reader = CacheReader(cache) if cache else None  # a damaged cache is refused now, not after generating
    runs: list[int | None] = [None] if greedy else list(seeds)
    settings = {"greedy": greedy, "seeds": None if greedy else list(seeds), "temperature": temperature,
                "top_p": top_p, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "max_records": max_records, "max_length": max_length, "max_prompt_length": max_prompt_length,
                "device": str(resolve_device(device)), "dtype": dtype, "std": "population (ddof=0) over seeds",
                "baseline": None if baseline is None else ModelSource.parse(models[baseline_index]).display,
                "bootstrap_samples": bootstrap.bootstrap_samples, "bootstrap_seed": bootstrap.bootstrap_seed,
                "nll": nll}
    report = EvalReport(settings=settings, models=[])
    datasets = {}  # path -> Dataset; chat files are re-rendered with each model's chat template
    for label, spec in model_labels(models):
        name = ModelSource.parse(spec).display
        t0 = time.perf_counter()
        loading = progress.add_task(f"loading {label}", total=None) if progress else None
        tokenizer = load_tokenizer(spec)
        for path in data_files:  # read (and so validate) every file before the slow model load
            if path not in datasets or datasets[path].format == "chat":
                datasets[path] = load_records(path, tokenizer=tokenizer, skip_invalid=skip_invalid)
        model = load_causal_lm(spec, dtype=dtype, device=device)
        if progress:
            progress.remove_task(loading)
        result = ModelResult(model=name, load_s=time.perf_counter() - t0, files=[], name=label)
        for path in data_files:
            dataset = datasets[path]
            records = dataset.records[:max_records] if max_records else dataset.records
            advance = None
            if progress:
                task = progress.add_task(f"{label} · {Path(path).name}", total=len(records) * (len(runs) + nll))
                advance = partial(progress.advance, task)
            t0 = time.perf_counter()
            prompts = [r.prompt for r in records]
            per_record: dict[str, list[float]] = {}
            for seed in runs:
                predictions = generate(model, tokenizer, prompts, seed=0 if seed is None else seed, greedy=greedy,
                                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, on_batch=advance)
                scores = [rouge_l(p, r.responses) for p, r in zip(predictions, records)]
                per_record[GREEDY if seed is None else str(seed)] = scores
                report.generations += [
                    {"model": name, "file": path, "seed": seed, "line": r.line, "prompt": r.prompt,
                     "prediction": p, "references": list(r.responses), "rougeL": s}
                    for r, p, s in zip(records, predictions, scores)]
            scored = reference_nll(model, tokenizer, records, batch_size=batch_size, max_length=max_length,
                                   max_prompt_length=max_prompt_length, on_batch=advance) if nll else None
            per_seed = {key: statistics.fmean(scores) for key, scores in per_record.items()}
            result.files.append(FileResult(
                file=path, sha256=dataset.sha256, n_records=len(records),
                rougeL_mean=statistics.fmean(per_seed.values()), rougeL_std=statistics.pstdev(per_seed.values()),
                rougeL_per_seed=per_seed, rougeL_per_record=per_record,
                nll=scored.nll if scored else None, ppl=scored.ppl if scored else None,
                nll_per_record=scored.per_record if scored else None, wall_s=time.perf_counter() - t0))
        if reader is not None:
            result.trajectory = trajectory_diagnostics(model, tokenizer, reader, cache_samples, batch_size,
                                                       resolve_device(device))
        report.models.append(result)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if baseline_index is not None:
        base = report.models[baseline_index]
        for index, result in enumerate(report.models):
            if index != baseline_index:
                result.paired = paired_comparison(result.files, base.files, base.model, bootstrap)
    return report
