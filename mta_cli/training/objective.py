"""The training objective of one batch: the base loss (SFT, KD, FDD or DistiLLM-2 from exact teacher logits) + MTA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mta_cli.losses import DIVERGENCES, LOSSES, LogitHead, MTALoss, auto_chunk_size, kd_loss, topk_kd_loss
from mta_cli.losses.distillm2 import beta_at, distillm2_loss, sequence_weights
from mta_cli.losses.fdd import fdd_loss
from mta_cli.losses.lens import FinalNorm, final_norm_module
from mta_cli.options import check_choice, check_number
from mta_cli.training.batches import Batch


@dataclass
class ObjectiveConfig:
    """What to optimise. key_layers: (student layer, teacher layer, "word" | "phrase") triples."""

    loss: str = "srkl"
    kd_alpha: float = 0.5
    temperature: float = 1.0
    mta: bool = False
    use_dsa: bool = True
    use_hid: bool = True
    lambda_dsa: float = 2.0
    lambda_hid: float = 0.2
    student_pooling: str = "student"
    key_layers: list[tuple[int, int, str]] = field(default_factory=list)
    chunk_size: int | None = None     # target positions per vocabulary chunk; None: from the vocabulary size
    compile_loss: bool = False       # torch.compile the per-chunk loss (same values; see README Performance)
    topk: bool = False   # base loss from the cache's top-k teacher log-probs instead of exact logits
    skew_lambda: float = 0.1          # λ of skl / srkl (DistiLLM: 0.1)
    akl_mu: float = 0.5               # μ of akl, the teacher mass of the head (AKL: 0.5)
    mta_weighting: str = "paper"      # "paper": L_base + λ MTA; "group": MTA inside the α mix, Hid weights renormalised
    fdd_divergence: str = "fkl"       # FDD: the divergence of its logit, trajectory and delta terms
    fdd_feature_weight: float = 1.0   # FDD: weight of the layer-wise (trajectory) term
    fdd_delta_weight: float = 1.0     # FDD: weight of the first-difference (delta) term
    distillm2_beta: float = 1.0       # DistiLLM-2: weight of the student-generated term (2 - β on the other)
    distillm2_gradual: bool = False   # DistiLLM-2: β from 1 to 1.5 over the first half of training

    def __post_init__(self) -> None:
        check_choice(self, "loss", TRAIN_LOSSES)
        check_choice(self, "fdd_divergence", tuple(DIVERGENCES))
        check_number(self, "fdd_feature_weight", 0, 1e6)
        check_number(self, "fdd_delta_weight", 0, 1e6)
        check_number(self, "distillm2_beta", 0, 2)
        if self.topk and self.loss in ("fdd", "distillm2"):
            raise ValueError(f"--loss {self.loss} needs the teacher's exact distributions; it cannot train from top-k "
                             "log-probs (drop --topk)")
        if self.compile_loss and not self.chunked_loss:
            what = "--topk" if self.topk else f"--loss {self.loss}"
            raise ValueError(f"--compile-loss compiles the chunked loss of sft and the KD losses on the exact teacher "
                             f"logits; {what} does not use it: drop --compile-loss")
        check_choice(self, "student_pooling", ("student", "teacher"))
        check_number(self, "kd_alpha", 0, 1)
        check_number(self, "temperature", 0, 1e3, low_open=True)
        check_number(self, "lambda_dsa", 0, 1e6)
        check_number(self, "lambda_hid", 0, 1e6)
        check_number(self, "chunk_size", 1, integer=True, optional=True)
        check_number(self, "skew_lambda", 0, 1)
        check_number(self, "akl_mu", 0, 1, low_open=True)
        check_choice(self, "mta_weighting", ("paper", "group"))
        if self.mta and not (self.use_dsa or self.use_hid):
            raise ValueError("--no-dsa and --no-hid together leave MTA with nothing to add; drop --mta instead")

    @property
    def chunked_loss(self) -> bool:
        """Whether the base loss is the chunked loss of `kd_loss` (sft and the divergences on exact logits), the
        one --compile-loss compiles."""
        return not (self.topk or self.loss in ("fdd", "distillm2"))

    @property
    def uses_teacher(self) -> bool:
        """The objective reads the teacher (its logits or its states): everything but SFT without MTA."""
        return self.loss != "sft" or self.mta

    @property
    def uses_key_layers(self) -> bool:
        """MTA and FDD both follow the key-layer schedule."""
        return self.mta or self.loss == "fdd"

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t, _ in self.key_layers}) if self.uses_key_layers else []


TRAIN_LOSSES = (*LOSSES, "fdd", "distillm2")


def student_head(model) -> LogitHead:
    """The student's own output head, trainable (shares tensors with the model)."""
    from mta_cli.teacher import output_head

    return output_head(model, detach=False)


class Objective(nn.Module):
    """Computes every loss component of a batch; owns the MTA projectors (trainable).

    forward(student, batch) -> {"loss": total, "ce", "kd", "fdd_traj", "fdd_delta", "dsa", "hid"} (components
    present when used).

    Under data parallelism each rank holds a share of a global batch, and every loss is a mean over the whole
    global batch (target tokens, sequences, contributing samples per key layer). `share` then maps each of
    this rank's counts to the global count over the number of ranks (`training.parallel.global_share`):
    every rank divides its sums by that, so the ranks' mean of any component, and of the gradients (what DDP
    and FSDP take), is the value of the global batch in one process. None: one process, local counts.
    """

    share: Callable[[Tensor], Tensor] | None = None

    def __init__(self, config: ObjectiveConfig, teacher_head: LogitHead | None, teacher_last_layer: int | None,
                 student_dim: int, teacher_dim: int | None, teacher_norm: FinalNorm | None = None,
                 vocab_size: int | None = None):
        """`teacher_head` etc. are None when the objective reads no teacher (SFT on --data alone); `vocab_size`
        is the student's vocabulary, which the chunks of its logits cut (default: the teacher head's)."""
        super().__init__()
        self.config = config
        self.chunk_size = config.chunk_size or auto_chunk_size(vocab_size or teacher_head.weight.shape[0])
        self.teacher_head = teacher_head
        self.teacher_norm = teacher_norm
        self.teacher_last_layer = teacher_last_layer
        if config.loss == "fdd" and teacher_norm is None:
            raise ValueError("--loss fdd reads intermediate teacher layers through the teacher's final norm, and this "
                             "teacher's norm has a form mta cannot reproduce (none stored in the cache)")
        self.mta = MTALoss(config.key_layers, student_dim, teacher_dim, config.lambda_dsa, config.lambda_hid,
                           config.use_dsa, config.use_hid, config.student_pooling,
                           normalize_hid=config.mta_weighting == "group") if config.mta else None

    @property
    def mta_scale(self) -> float:
        """MTA's factor in the total: 1 (method.md §7: L_base + λ MTA), or α inside the KD mix of the group's
        code ((1 - α) CE + α (D + λ MTA)); with sft there is no mix to join."""
        return self.config.kd_alpha if self.config.mta_weighting == "group" and self.config.loss != "sft" else 1.0

    def forward(self, student, batch: Batch, progress: float = 0.0) -> dict[str, torch.Tensor]:
        """All loss components of `batch`; `progress` (step / total steps) drives DistiLLM-2's gradual β."""
        c = self.config
        out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                      use_cache=False, logits_to_keep=1)
        targets = batch.labels != -100
        counts = None if self.share is None else (lambda count: self.share(count * batch.weight))
        tokens = None if counts is None else float(counts(targets.sum().double()))
        needs_teacher = c.loss != "sft"
        if needs_teacher and batch.teacher_mask is not None:
            raise ValueError(f"--loss {c.loss} compares token distributions position by position and needs the "
                             "teacher's tokenizer; with another tokenizer use --loss sft (MTA still applies)")
        student_hidden, labels = out.hidden_states[-1][targets], batch.labels[targets]
        if c.loss == "fdd":
            losses = self.fdd(student, out.hidden_states, batch, targets, labels, tokens)
        elif c.loss == "distillm2":
            sequences = None if counts is None else float(counts(targets.any(dim=1).sum().double()))
            losses = distillm2_loss(student_hidden, student_head(student),
                                    batch.teacher_states[self.teacher_last_layer][targets], self.teacher_head, labels,
                                    sequence_weights(targets, sequences), batch.role == "student",
                                    beta_at(progress, c.distillm2_beta, c.distillm2_gradual), c.skew_lambda,
                                    c.temperature, self.chunk_size, tokens)
        elif c.topk:
            topk = {k: v[targets] for k, v in batch.topk.items()}
            losses = topk_kd_loss(student_hidden, student_head(student), topk["ids"], topk["logprobs"], topk["rest"],
                                  labels, c.loss, c.kd_alpha, c.temperature, self.chunk_size, tokens)
        else:
            teacher_hidden = batch.teacher_states[self.teacher_last_layer][targets] if needs_teacher else None
            losses = kd_loss(student_hidden, student_head(student), teacher_hidden,
                             self.teacher_head if needs_teacher else None, labels, c.loss, c.kd_alpha, c.temperature,
                             self.chunk_size, c.skew_lambda, c.akl_mu, tokens, c.compile_loss)
        if self.mta is not None:
            student_states = {s: out.hidden_states[s] for s, _, _ in c.key_layers}
            teacher_states = {t: batch.teacher_states[t] for _, t, _ in c.key_layers}
            teacher_mask = None if batch.teacher_mask is None else batch.teacher_mask.bool()
            mta = self.mta(student_states, teacher_states, batch.attention_mask.bool(), batch.spans,
                           teacher_mask, batch.teacher_spans, counts)
            losses.update(dsa=mta["dsa"], hid=mta["hid"])
            losses["loss"] = losses["loss"] + self.mta_scale * mta["mta"]
        if batch.weight != 1:  # a stand-in batch (`Batch.weight`) adds nothing
            losses = {k: v * batch.weight for k, v in losses.items()}
        return losses

    def fdd(self, student, hidden_states: tuple, batch: Batch, targets: torch.Tensor, labels: torch.Tensor,
            tokens: float | None = None) -> dict[str, torch.Tensor]:
        """FDD over the key-layer pairs plus the final pair: lens inputs normed as the models norm their last
        layer (hidden_states[N] already is)."""
        c = self.config
        n_student = len(hidden_states) - 1
        pairs = sorted({(s, t) for s, t, _ in c.key_layers} | {(n_student, self.teacher_last_layer)})
        norm = final_norm_module(student)
        student_states = [(hidden_states[s] if s == n_student else norm(hidden_states[s]))[targets] for s, _ in pairs]
        teacher_states = [(batch.teacher_states[t] if t == self.teacher_last_layer else
                           self.teacher_norm(batch.teacher_states[t]))[targets] for _, t in pairs]
        return fdd_loss(student_states, student_head(student), teacher_states, self.teacher_head, labels, c.kd_alpha,
                        c.temperature, c.fdd_feature_weight, c.fdd_delta_weight, c.fdd_divergence, self.chunk_size,
                        c.skew_lambda, c.akl_mu, tokens)
