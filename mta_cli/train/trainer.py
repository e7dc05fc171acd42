"""`mta train`: the training loop, offline from a cache or online with a live teacher.

AdamW (student and projectors with their own learning rates), linear warmup then cosine decay,
gradient clipping and accumulation, bf16 autocast and gradient checkpointing on CUDA, safetensors
checkpoints every N steps with exact resume, metrics as JSONL, the student saved in HF format.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mta_cli import __version__
from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.losses import default_key_layers
from mta_cli.models import hidden_size, load_causal_lm, load_tokenizer, n_layers, resolve_device, tokenizer_fingerprint
from mta_cli.student import build_student
from mta_cli.teacher import output_head
from mta_cli.train.batches import CacheBatches
from mta_cli.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mta_cli.train.objective import Objective, ObjectiveConfig
from mta_cli.train.online import OnlineBatches


@dataclass
class TrainConfig:
    """Every option of `mta train` (see its --help)."""

    out: str
    cache: str | None = None
    teacher: str | None = None          # online baseline: live teacher ...
    data: str | None = None             # ... on this JSONL file
    student: str | None = None
    init_from_teacher: bool = False
    keep_layers: int | None = None
    student_config: str | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    student_layers: list[int] | None = None
    teacher_layers: list[int] | None = None
    word_layers: int = 1
    lr: float = 1e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    device: str = "auto"
    max_length: int = 512
    max_prompt_length: int = 256
    trust_remote_code: bool = False


@dataclass
class TrainSummary:
    out: str
    steps: int
    epochs: int
    final: dict
    seconds: float
    seconds_per_step: float
    tokens_per_second: float
    resumed_from: str | None


def key_layers(config: TrainConfig, n_student: int, n_teacher: int, available: list[int]) -> list[tuple[int, int, str]]:
    """The (student layer, teacher layer, granularity) schedule: method.md §6 defaults, CLI overrides."""
    if config.student_layers:
        students = sorted(config.student_layers)
        teachers = sorted(config.teacher_layers) if config.teacher_layers else \
            [l * n_teacher // n_student for l in students]
        if len(teachers) != len(students):
            raise ValueError(f"--teacher-layers {teachers} and --student-layers {students} must have the same length")
        n_word = min(config.word_layers, len(students))
        schedule = [(s, t, "word" if i < n_word else "phrase") for i, (s, t) in enumerate(zip(students, teachers))]
    else:
        schedule = default_key_layers(n_student, n_teacher, m=min(3, n_student))
        if config.teacher_layers:
            if len(config.teacher_layers) != len(schedule):
                raise ValueError(f"--teacher-layers needs {len(schedule)} layers for the default student layers "
                                 f"{[s for s, _, _ in schedule]}; or give --student-layers too")
            schedule = [(s, t, g) for (s, _, g), t in zip(schedule, sorted(config.teacher_layers))]
    bad = [s for s, _, _ in schedule if not 1 <= s <= n_student]
    if bad:
        raise ValueError(f"student layer(s) {bad} out of range 1..{n_student}")
    missing = [t for _, t, _ in schedule if t not in available]
    if missing:
        raise CacheError(f"teacher layer(s) {missing} of the key-layer schedule {schedule} are not available: "
                         f"the cache holds layers {available}. Pass --teacher-layers from those, "
                         f"or re-extract with --layers.")
    return schedule


class Source:
    """Where batches and the teacher's facts come from: a cache (offline) or a live teacher (online)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        if config.cache:
            self.reader = CacheReader(config.cache)
            meta = self.reader.meta
            self.teacher_spec = meta["teacher"]["source"]
            self.n_teacher = meta["teacher"]["n_layers"]
            self.teacher_dim = meta["teacher"]["hidden_size"]
            self.available = self.reader.layers
            self.tokenizer_sha = meta["config"]["tokenizer_sha256"]
            self.head = self.reader.head.to(device)
            self.teacher_model = None
        else:
            if not (config.teacher and config.data):
                raise ValueError("give --cache, or --teacher and --data for the online baseline")
            self.teacher_spec = config.teacher
            self.teacher_model = load_causal_lm(config.teacher, "fp32", str(device), config.trust_remote_code)
            self.n_teacher = n_layers(self.teacher_model)
            self.teacher_dim = hidden_size(self.teacher_model)
            self.available = list(range(self.n_teacher + 1))
            self.head = output_head(self.teacher_model)
            self.tokenizer_sha = None

    def batches(self, tokenizer, layers: list[int], own_tokenizer: bool):
        c = self.config
        if c.cache:
            teacher_pad = self.reader.meta["tokenizer"]["pad_token_id"] or 0
            return CacheBatches(self.reader, c.batch_size, layers, c.seed, teacher_pad,
                                student_tokenizer=tokenizer if own_tokenizer else None)
        return OnlineBatches(self.teacher_model, tokenizer, c.data, c.batch_size, layers, c.seed, self.device,
                             c.max_length, c.max_prompt_length)


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class Run:
    """Everything a training loop needs, built (and restored from a checkpoint) by `prepare`."""

    student: torch.nn.Module
    tokenizer: object
    objective: Objective
    batches: CacheBatches | OnlineBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    position: dict            # {"step", "epoch", "batch"}: where the loop starts
    resumed_from: str | None


def prepare(config: TrainConfig, device: torch.device) -> Run:
    """Build student, objective, batches, optimizer and schedule; restore the last checkpoint on --resume."""
    torch.manual_seed(config.seed)
    source = Source(config, device)
    if config.objective.topk and (source.teacher_model is not None or not source.reader.meta["config"]["top_k"]):
        raise ValueError("--topk trains from the sparse teacher log-probs of a cache extracted with --top-k K; "
                         "this source has none")
    tokenizer = load_tokenizer(config.student or source.teacher_spec, config.trust_remote_code)
    own_tokenizer = bool(source.tokenizer_sha) and tokenizer_fingerprint(tokenizer) != source.tokenizer_sha
    if own_tokenizer and config.objective.loss != "sft":
        raise ValueError(f"the student's tokenizer differs from the teacher's: --loss {config.objective.loss} "
                         "compares distributions token by token and needs identical token positions. Use --loss "
                         "sft (with --mta: DSA and Hid on spans), or a student with the teacher's tokenizer.")
    student = build_student(config.student, source.teacher_spec if config.init_from_teacher else None,
                            config.keep_layers, config.student_config, config.seed, config.trust_remote_code)
    student.to(device).train()
    if device.type == "cuda":
        student.gradient_checkpointing_enable()

    objective_config = config.objective
    if objective_config.mta:
        objective_config.key_layers = key_layers(config, n_layers(student), source.n_teacher, source.available)
    layers = sorted({source.n_teacher} | set(objective_config.teacher_layers))
    objective = Objective(objective_config, source.head, source.n_teacher, hidden_size(student),
                          source.teacher_dim).to(device)
    batches = source.batches(tokenizer, layers, own_tokenizer)

    # whole accumulations only: a trailing partial one is never stepped (the loop ends with the epochs)
    total_steps = config.max_steps or max(1, batches.batches_per_epoch() * config.epochs // config.grad_accum)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in student.parameters() if p.requires_grad], "lr": config.lr},
        {"params": list(objective.parameters()), "lr": config.projector_lr},
    ], weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(int(config.warmup_ratio * total_steps), total_steps))
    position, resumed_from = {"step": 0, "epoch": 0, "batch": 0}, None
    if config.resume and (checkpoint := latest_checkpoint(Path(config.out))):
        position = load_checkpoint(checkpoint, student, objective, optimizer, scheduler)
        resumed_from = str(checkpoint)
    return Run(student, tokenizer, objective, batches, optimizer, scheduler, total_steps, position, resumed_from)


def keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old lines (and a torn last line)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step))


def train(config: TrainConfig, progress: Callable[[str, dict], None] | None = None) -> TrainSummary:
    """Train a student; returns a summary. `progress(event, info)` gets ("start", {...}) and ("step", {...})."""
    report = progress or (lambda event, info: None)
    started = time.perf_counter()
    device = resolve_device(config.device)
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    run = prepare(config, device)
    student, objective, optimizer, scheduler = run.student, run.objective, run.optimizer, run.scheduler
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, config)
    report("start", {"total_steps": run.total_steps, "step": run.position["step"],
                     "batches_per_epoch": run.batches.batches_per_epoch(),
                     "key_layers": objective.config.key_layers})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    keep_metrics_until(out / "metrics.jsonl", run.position["step"])
    step, last, step_tokens, micro, step_losses = run.position["step"], {}, 0, 0, {}
    train_seconds, train_tokens = 0.0, 0
    epochs = range(run.position["epoch"], 10**9 if config.max_steps else config.epochs)
    with (out / "metrics.jsonl").open("a") as metrics:
        step_started = time.perf_counter()
        for epoch in epochs:
            if step >= run.total_steps:
                break
            skip = run.position["batch"] if epoch == run.position["epoch"] else 0
            for batch_index, batch in enumerate(run.batches.iterate(epoch, skip), start=skip):
                with autocast:
                    losses = objective(student, batch.to(device))
                (losses["loss"] / config.grad_accum).backward()
                step_tokens += batch.n_tokens
                step_losses = {k: step_losses.get(k, 0) + v.detach() / config.grad_accum for k, v in losses.items()}
                micro += 1
                if micro % config.grad_accum:
                    continue
                torch.nn.utils.clip_grad_norm_(list(student.parameters()) + list(objective.parameters()),
                                               config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - step_started
                train_seconds, train_tokens = train_seconds + seconds, train_tokens + step_tokens
                last = {"step": step, "epoch": epoch, "lr": lr, **{k: v.item() for k, v in step_losses.items()},
                        "tokens": step_tokens, "step_seconds": seconds, "tokens_per_second": step_tokens / seconds}
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                report("step", last)
                step_tokens, step_losses = 0, {}
                if config.checkpoint_every and (step % config.checkpoint_every == 0 or step >= run.total_steps):
                    save_checkpoint(out / "checkpoints" / f"step-{step:06d}", student, objective, optimizer,
                                    scheduler, {"step": step, "epoch": epoch, "batch": batch_index + 1})
                step_started = time.perf_counter()
                if step >= run.total_steps:
                    break
    save_student(out, student, run.tokenizer, config)
    return TrainSummary(out=str(out), steps=step, epochs=config.epochs, final=last,
                        seconds=time.perf_counter() - started, seconds_per_step=train_seconds / max(step, 1),
                        tokens_per_second=train_tokens / max(train_seconds, 1e-9), resumed_from=run.resumed_from)


def run_config(config: TrainConfig) -> dict:
    return {"tool": f"mta-cli {__version__}", **asdict(config)}


def write_run_config(out: Path, config: TrainConfig) -> None:
    (out / "training_config.json").write_text(json.dumps(run_config(config), indent=1) + "\n")


def save_student(out: Path, student, tokenizer, config: TrainConfig) -> None:
    """The final student in HF format (safetensors + tokenizer), with the training configuration."""
    student.config.mta_training = run_config(config)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
