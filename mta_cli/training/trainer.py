"""`mta train`: the training loop, offline from a cache, online with a live teacher, or on data alone (SFT).

AdamW (student and projectors with their own learning rates), linear warmup then cosine decay,
gradient clipping and accumulation, bf16 autocast and gradient checkpointing on CUDA, safetensors
checkpoints every N steps with exact resume, metrics as JSONL (and to TensorBoard or W&B with
`report_to`), the student saved in HF format. Under torchrun the ranks train data-parallel
(`training.parallel`: DDP, or FSDP2 with --fsdp); rank 0 writes the run folder and reports.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mta_cli import distributed
from mta_cli.cache.reader import CacheReader
from mta_cli.distributed import Ranks
from mta_cli.host_memory import keep_freed_memory
from mta_cli.models import hidden_size, n_layers, tokenizer_fingerprint
from mta_cli.options import check_choice, check_number
from mta_cli.student import build_student
from mta_cli.training.batches import CacheBatches
from mta_cli.training.checkpoint import drop_old_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from mta_cli.training.data import DataBatches
from mta_cli.training.mixing import MixedBatches, StudentDataSchedule, cache_role
from mta_cli.training.loggers import MetricsLoggers, check_reporters
from mta_cli.training.objective import Objective, ObjectiveConfig
from mta_cli.training.parallel import (Distilled, clip_gradients, full_model_state, mean_over_ranks, sharded,
                                      total_over_ranks, wrap)
from mta_cli.training.recipes import recipe
from mta_cli.training.run_folder import (check_run_folder, defaults, holds_run, run_config, start_over,
                                         write_run_config)
from mta_cli.training.source import Source, key_layers, same_teacher, source_kind


class TrainingDiverged(ValueError):
    """The loss or the gradients went non-finite; nothing was saved after the last good checkpoint."""


# The options of DistiLLM's adaptive share of student-generated data (--student-data adaptive).
ADAPTIVE_OPTIONS = ("dev_cache", "eval_every", "student_data_init", "student_data_step", "student_data_eps")


@dataclass
class TrainConfig:
    """Every option of `mta train` (see its --help)."""

    out: str
    cache: str | list[str] | None = None    # one cache, or several as "PATH" / "PATH:WEIGHT" (equal shares by default)
    teacher: str | None = None          # online baseline: live teacher ... (with sft alone: init / tokenizer only)
    data: str | None = None             # ... on this JSONL file (see `source.source_kind`)
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
    batch_size: int = 8                 # the global batch: under torchrun each rank takes its share of it
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2          # the newest checkpoints kept on disk (0: all)
    resume: bool = False
    device: str = "auto"
    fsdp: bool = False                  # under torchrun: shard the student with FSDP2 instead of DDP
    max_length: int = 512
    max_prompt_length: int = 256
    trust_remote_code: bool = False
    recipe: str | None = None           # the named recipe the options came from (recorded, see `from_recipe`)
    student_data: str = "fixed"         # "adaptive": DistiLLM's share of student-generated data (training.mixing)
    dev_cache: str | None = None        # adaptive: the dev data whose loss drives the share
    eval_every: int = 0                 # adaptive: optimizer steps between dev losses
    student_data_init: float = 0.0      # adaptive: the share at the start (DistiLLM: 0)
    student_data_step: float = 0.1      # adaptive: the rise when the dev loss grew
    student_data_eps: float = 0.1       # adaptive: the growth of the dev loss that counts
    report_to: list[str] = field(default_factory=list)  # also log metrics to: tensorboard, wandb

    @classmethod
    def from_recipe(cls, name: str, objective: dict | None = None, **options) -> "TrainConfig":
        """A config with recipe `name`'s settings (`training.recipes`), overridden by `objective` (ObjectiveConfig
        fields) and `options` (TrainConfig fields)."""
        settings = recipe(name)
        return cls(objective=ObjectiveConfig(**settings["objective"] | (objective or {})),
                   **settings["train"] | options, recipe=name)

    @property
    def cache_specs(self) -> list[str]:
        return [] if not self.cache else [self.cache] if isinstance(self.cache, str) else list(self.cache)

    def __post_init__(self) -> None:
        check_reporters(self.report_to)
        check_number(self, "lr", 0)
        check_number(self, "projector_lr", 0)
        check_number(self, "weight_decay", 0)
        check_number(self, "warmup_ratio", 0, 1)
        check_number(self, "max_grad_norm", 0, low_open=True)
        check_number(self, "grad_accum", 1, integer=True)
        check_number(self, "epochs", 1, integer=True)
        check_number(self, "max_steps", 1, integer=True, optional=True)
        check_number(self, "batch_size", 1, integer=True)
        check_number(self, "seed", 0, 2**63 - 1, integer=True)
        check_number(self, "checkpoint_every", 0, integer=True)
        check_number(self, "keep_checkpoints", 0, integer=True)
        check_number(self, "keep_layers", 1, integer=True, optional=True)
        check_number(self, "word_layers", 0, integer=True)
        check_number(self, "max_length", 2, 1 << 20, integer=True)
        check_number(self, "max_prompt_length", 1, self.max_length - 1, integer=True)
        if self.recipe is not None:
            recipe(self.recipe)
        check_choice(self, "student_data", ("fixed", "adaptive"))
        check_number(self, "eval_every", 0, integer=True)
        check_number(self, "student_data_init", 0, 1)
        check_number(self, "student_data_step", 0, 1)
        check_number(self, "student_data_eps", 0)
        if self.student_data == "adaptive" and not (self.cache and self.dev_cache and self.eval_every):
            raise ValueError("--student-data adaptive needs --cache (dataset and student-generated caches), "
                             "--dev-cache and --eval-every N")
        if self.student_data != "adaptive":
            default = defaults(self)
            given = [f"--{name.replace('_', '-')}" for name in ADAPTIVE_OPTIONS if getattr(self, name) != default[name]]
            if given:
                raise ValueError(f"{', '.join(given)}: only used by --student-data adaptive (DistiLLM's adaptive share "
                                 "of student-generated data); add it, or drop them")
        if not self.objective.uses_key_layers:
            given = [f for f, v in (("--student-layers", self.student_layers), ("--teacher-layers", self.teacher_layers),
                                    ("--word-layers", self.word_layers != 1)) if v]
            if given:
                raise ValueError(f"{', '.join(given)} choose the key layers of MTA and FDD; add --mta (or use --loss "
                                 "fdd), or drop them")
        source_kind(self)


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
    key_layers: list = field(default_factory=list)
    key_layers_from: str = ""
    ranks: int = 1


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
    model: torch.nn.Module    # `Distilled(student, objective)`, wrapped for this job (`parallel.wrap`)
    ranks: Ranks
    batches: MixedBatches | DataBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    position: dict            # {"step", "epoch", "batch"}: where the loop starts
    resumed_from: str | None
    key_layers_from: str
    notes: list[str]
    schedule: StudentDataSchedule | None = None   # --student-data adaptive
    dev_batches: list | None = None
    base_weights: list[float] | None = None


def prepare(config: TrainConfig, device: torch.device,
            report: Callable[[str, dict], None] = lambda event, info: None, ranks: Ranks = Ranks()) -> Run:
    """Build student, objective, batches, optimizer and schedule; restore the last checkpoint on --resume.

    Under torchrun every rank builds the same (the ranks stop together if one cannot), then the model is
    wrapped for data parallelism and each rank's batches are its shares of the global ones."""
    torch.manual_seed(config.seed)
    with distributed.together(ranks):
        student, tokenizer, objective, source, layers, origin = build(config, device, report)
        batches = source.batches(tokenizer, layers, own_tokenizer(source, tokenizer), (ranks.rank, ranks.world))
        total_steps = plan_steps(config, batches.batches_per_epoch())
    model = wrap(Distilled(student, objective), ranks, config.fsdp)
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": config.lr},
              {"params": list(objective.parameters()), "lr": config.projector_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay,
                                  fused=fused_adamw(groups, device, config.fsdp))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(int(config.warmup_ratio * total_steps), total_steps))
    position, resumed_from = {"step": 0, "epoch": 0, "batch": 0}, None
    if config.resume and (checkpoint := latest_checkpoint(Path(config.out))):
        position = load_checkpoint(checkpoint, model, optimizer, scheduler, ranks)
        resumed_from = str(checkpoint)
        if isinstance(batches, MixedBatches):
            if "batches" in position:
                batches.load_state_dict(position["batches"])
            else:
                batches.seek(position["epoch"], position["batch"])
    run = Run(student, tokenizer, objective, model, ranks, batches, optimizer, scheduler, total_steps, position,
              resumed_from, origin, source.notes)
    if config.student_data == "adaptive":
        start_schedule(run, config, source, layers, device)
    return run


def fused_adamw(groups: list[dict], device: torch.device, fsdp: bool) -> bool:
    """Whether AdamW can run as torch's fused kernel: one pass over each tensor instead of a dozen. On CPU
    torch's default is the per-tensor loop, 5-8x slower (0.15-0.25 s against 0.03 s a step for 60 M parameters
    on 2 cores). Not under FSDP (sharded DTensor parameters keep the default path)."""
    params = [p for group in groups for p in group["params"]]
    return (not fsdp and device.type in ("cpu", "cuda")
            and all(p.is_floating_point() and p.device.type == device.type for p in params))


def check_distillm2_data(config: TrainConfig, source: Source) -> None:
    """DistiLLM-2 contrasts the dataset's responses with the student's own: without a student-generated cache
    only its first term would train, so refuse."""
    if config.objective.loss == "distillm2" and not (source.cached and "student" in map(cache_role, source.readers)):
        raise ValueError("--loss distillm2 contrasts the teacher on the dataset's responses with the student's own "
                         "responses: give --cache for the dataset and a second --cache extracted from the student's "
                         "generations (mta generate, then mta extract)")


def own_tokenizer(source: Source, tokenizer) -> bool:
    """Whether the student tokenizes for itself (its tokenizer is not the cache's)."""
    return bool(source.tokenizer_sha) and tokenizer_fingerprint(tokenizer) != source.tokenizer_sha


def build(config: TrainConfig, device: torch.device, report: Callable[[str, dict], None]) -> tuple:
    """Student, tokenizer, objective, source, the teacher layers read, and where the key layers came from."""
    report("status", {"message": {"cache": f"checking the cache {config.cache}",
                                  "online": f"loading the teacher {config.teacher}",
                                  "data": f"reading {config.data}"}[source_kind(config)]})
    source = Source(config, device)
    if config.objective.topk and (not source.cached or not all(r.meta["config"]["top_k"] for r in source.readers)):
        raise ValueError("--topk trains from the sparse teacher log-probs of caches extracted with --top-k K; "
                         "this source (or one of its caches) has none")
    check_distillm2_data(config, source)
    tokenizer = source.tokenizer()
    if own_tokenizer(source, tokenizer) and config.objective.loss != "sft":
        raise ValueError(f"the student's tokenizer differs from the teacher's: --loss {config.objective.loss} "
                         "compares distributions token by token and needs identical token positions. Use --loss "
                         "sft (with --mta: DSA and Hid on spans), or a student with the teacher's tokenizer.")
    init = (source.teacher_location() if source.cached else source.teacher_spec) if config.init_from_teacher else None
    what = f"{config.keep_layers} layers of {init}" if init else (config.student or config.student_config)
    report("status", {"message": f"loading the student ({what})"})
    student = build_student(config.student, init, config.keep_layers, config.student_config, config.seed,
                            config.trust_remote_code, check_teacher=source.check_teacher)
    student.to(device).train()
    if device.type == "cuda":
        student.gradient_checkpointing_enable()

    objective_config, origin = config.objective, ""
    if objective_config.uses_key_layers:
        objective_config.key_layers, origin = key_layers(
            config.student_layers, config.teacher_layers, config.word_layers, n_layers(student), source.n_teacher,
            source.available, source.cached)
    layers = source.layers(objective_config.teacher_layers)
    objective = Objective(objective_config, source.head, source.n_teacher, hidden_size(student), source.teacher_dim,
                          source.final_norm, student.get_output_embeddings().weight.shape[0]).to(device)
    return student, tokenizer, objective, source, layers, origin


def start_schedule(run: Run, config: TrainConfig, source: Source, layers: list[int], device: torch.device) -> None:
    """DistiLLM's adaptive share of student-generated data: the dev batches, the schedule (restored on resume,
    else started from the dev loss of the initial student) and the mixer's weights."""
    dev_reader = CacheReader(config.dev_cache)
    same_teacher([source.reader, dev_reader], "--dev-cache")
    pad = dev_reader.meta["tokenizer"]["pad_token_id"] or 0
    run.dev_batches = list(CacheBatches(dev_reader, config.batch_size, layers, config.seed, pad, prefetch=False)
                           .iterate(0))
    run.base_weights = list(source.weights)
    run.schedule = StudentDataSchedule(config.student_data_init, config.student_data_step, config.student_data_eps)
    if "schedule" in run.position:
        run.schedule.load_state_dict(run.position["schedule"])
        return
    run.schedule.observe(dev_loss(run, device))
    run.batches.set_weights(run.schedule.weights(run.base_weights, run.batches.roles))


def dev_loss(run: Run, device: torch.device) -> float:
    """The mean distillation loss (the "kd" term, else the total) of the dev batches, the student in eval mode."""
    run.student.eval()
    with torch.no_grad():
        values = [run.model(batch.to(device)) for batch in run.dev_batches]
    run.student.train()
    return sum(float(v.get("kd", v["loss"])) for v in values) / len(values)


def plan_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run; refuses a plan in which no optimizer step would happen.

    Whole accumulations only: a trailing partial one is never stepped (the loop ends with the epochs)."""
    if batches_per_epoch == 0:
        raise ValueError("the data gives no batch: nothing to train on")
    if config.max_steps:
        return config.max_steps
    steps = batches_per_epoch * config.epochs // config.grad_accum
    if steps == 0:
        raise ValueError(f"--grad-accum {config.grad_accum} needs {config.grad_accum} batches per optimizer step, but "
                         f"{config.epochs} epoch(s) give {batches_per_epoch * config.epochs} batches of up to "
                         f"{config.batch_size}: no optimizer step would run. Lower --grad-accum or --batch-size, "
                         "or raise --epochs or --max-steps")
    return steps


def keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old lines (and a torn last line)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step))


def train(config: TrainConfig, progress: Callable[[str, dict], None] | None = None) -> TrainSummary:
    """Train a student; returns a summary. `progress(event, info)` gets ("start", {...}) and ("step", {...}).

    The run folder is checked before anything is loaded (`run_folder.check_run_folder`). A loss or gradient
    that goes non-finite stops the run with TrainingDiverged: the last good checkpoint stays, nothing else
    is saved. Under torchrun every rank runs this on its share of each global batch (`training.parallel`);
    rank 0 alone writes the run folder and reports, with the figures of the whole job."""
    started = time.perf_counter()
    ranks = distributed.launched()
    if ranks.distributed and not config.cache:
        raise ValueError("training on --data (the online baseline, or sft without a teacher) runs in one process; "
                         "under torchrun train from a cache (--cache)")
    if config.fsdp and not ranks.distributed:
        raise ValueError("--fsdp shards the student over the processes of a torchrun job; start the command with "
                         "`torchrun --nproc-per-node N`, or drop --fsdp")
    device = distributed.rank_device(config.device, ranks)
    if device.type == "cpu":
        keep_freed_memory()
    out = Path(config.out)
    with distributed.process_group(device) as ranks:
        report = progress if progress is not None and ranks.main else (lambda event, info: None)
        with distributed.together(ranks):
            check_run_folder(out, config)
            if ranks.main and out.is_dir() and not holds_run(out):
                start_over(out)
        run = prepare(config, device, report, ranks)
        summary = _loop(config, run, out, device, report)
        del run  # DDP's reducer must go before its process group: destroyed after it, it can wait forever
        gc.collect()
    summary.seconds = time.perf_counter() - started
    return summary


def _loop(config: TrainConfig, run: Run, out: Path, device: torch.device,
          report: Callable[[str, dict], None]) -> TrainSummary:
    """The steps from `run.position` to the end, then the final student; returns the summary."""
    model, objective, optimizer, scheduler, ranks = run.model, run.objective, run.optimizer, run.scheduler, run.ranks
    with distributed.together(ranks):
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            write_run_config(out, config)
            keep_metrics_until(out / "metrics.jsonl", run.position["step"])
    report("start", {"total_steps": run.total_steps, "step": run.position["step"],
                     "batches_per_epoch": run.batches.batches_per_epoch(),
                     "key_layers": objective.config.key_layers, "key_layers_from": run.key_layers_from,
                     "notes": run.notes})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    step, last, step_tokens, micro, step_losses = run.position["step"], {}, 0, 0, {}
    train_seconds, train_tokens = 0.0, 0
    epochs = range(run.position["epoch"], 10**9 if config.max_steps else config.epochs)
    reporters = config.report_to if ranks.main else []
    with ((out / "metrics.jsonl").open("a") if ranks.main else nullcontext()) as metrics, \
            MetricsLoggers(reporters, out, run_config(config), first_step=step + 1) as loggers:
        step_started = time.perf_counter()
        for epoch in epochs:
            if step >= run.total_steps:
                break
            skip = run.position["batch"] if epoch == run.position["epoch"] else 0
            for batch_index, batch in enumerate(run.batches.iterate(epoch, skip), start=skip):
                with autocast:
                    losses = model(batch.to(device), progress=step / run.total_steps)
                (losses["loss"] / config.grad_accum).backward()
                step_tokens += batch.n_tokens if batch.weight else 0
                step_losses = {k: step_losses.get(k, 0) + v.detach() / config.grad_accum for k, v in losses.items()}
                micro += 1
                if micro % config.grad_accum:
                    continue
                grad_norm = clip_gradients(model, config.max_grad_norm)
                values = mean_over_ranks(step_losses, ranks)
                step_tokens = total_over_ranks(step_tokens, ranks)
                with distributed.together(ranks):
                    check_finite(step + 1, values, grad_norm, out)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - step_started
                train_seconds, train_tokens = train_seconds + seconds, train_tokens + step_tokens
                last = {"step": step, "epoch": epoch, "lr": lr, **values, "tokens": step_tokens,
                        "step_seconds": seconds, "tokens_per_second": step_tokens / seconds}
                if run.schedule is not None:
                    last |= advance_schedule(run, step, config.eval_every, device)
                if metrics is not None:
                    metrics.write(json.dumps(last) + "\n")
                    metrics.flush()
                loggers.log(last)
                report("step", last)
                step_tokens, step_losses = 0, {}
                if config.checkpoint_every and (step % config.checkpoint_every == 0 or step >= run.total_steps):
                    position = {"step": step, "epoch": epoch, "batch": batch_index + 1}
                    if isinstance(run.batches, MixedBatches):
                        position["batches"] = run.batches.state_dict()
                    if run.schedule is not None:
                        position["schedule"] = run.schedule.state_dict()
                    save_checkpoint(out / "checkpoints" / f"step-{step:06d}", model, optimizer, scheduler, position,
                                    ranks)
                    if ranks.main:
                        drop_old_checkpoints(out, config.keep_checkpoints)
                step_started = time.perf_counter()
                if step >= run.total_steps:
                    break
    save_student(out, run, config)
    return TrainSummary(out=str(out), steps=step, epochs=config.epochs, final=last, seconds=0.0,
                        seconds_per_step=train_seconds / max(step, 1),
                        tokens_per_second=train_tokens / max(train_seconds, 1e-9), resumed_from=run.resumed_from,
                        key_layers=[list(k) for k in objective.config.key_layers], key_layers_from=run.key_layers_from,
                        ranks=ranks.world)


def advance_schedule(run: Run, step: int, eval_every: int, device: torch.device) -> dict:
    """Every `eval_every` steps a dev loss, and a new share of student-generated data when it grew; the figures
    for the step's metrics line."""
    figures = {}
    if step % eval_every == 0:
        figures["dev_loss"] = dev_loss(run, device)
        if run.schedule.observe(figures["dev_loss"]):
            run.batches.set_weights(run.schedule.weights(run.base_weights, run.batches.roles))
    return figures | {"student_share": run.schedule.share}


def check_finite(step: int, losses: dict[str, float], grad_norm: float, out: Path) -> None:
    """Stop before an optimizer step that would take a non-finite loss or gradient into the weights."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if not bad and math.isfinite(grad_norm):
        return
    what = ("the loss went non-finite (" + ", ".join(f"{k} = {v}" for k, v in bad.items()) + ")") if bad else \
        f"the gradients went non-finite (norm {grad_norm})"
    checkpoint = latest_checkpoint(out)
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"
    raise TrainingDiverged(f"step {step}: {what}; stopped without saving ({kept}). Lower --lr (or check the data) "
                           "and train into a new --out")


def save_student(out: Path, run: Run, config: TrainConfig) -> None:
    """The final student in HF format (safetensors + tokenizer), with the training configuration; written by
    rank 0 (FSDP shards gathered first, by every rank)."""
    state = {k[len("student."):]: v for k, v in full_model_state(run.model).items()
             if k.startswith("student.")} if sharded(run.model) else None
    with distributed.together(run.ranks):
        if run.ranks.main:
            run.student.config.mta_training = run_config(config)
            run.student.save_pretrained(out, state_dict=state)
            run.tokenizer.save_pretrained(out)
