"""Distillation losses: base KD divergences and losses, MTA's DSA and Hid terms, and the key-layer schedule."""

from mta_cli.losses.divergences import (
    DIVERGENCES,
    adaptive_kl,
    forward_kl,
    js,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    topk_forward_kl,
    tvd,
)
from mta_cli.losses.kd import LOSSES, LogitHead, auto_chunk_size, kd_loss, kd_loss_from_logits, topk_kd_loss
from mta_cli.losses.mta import (
    MTALoss,
    dsa_loss,
    hid_loss,
    hid_loss_spans,
    importance_weights,
    pool_spans,
    span_membership,
)
from mta_cli.losses.schedule import default_key_layers, default_teacher_layers, pair_teacher_layers

__all__ = [
    "DIVERGENCES",
    "LOSSES",
    "LogitHead",
    "MTALoss",
    "adaptive_kl",
    "auto_chunk_size",
    "default_key_layers",
    "default_teacher_layers",
    "dsa_loss",
    "forward_kl",
    "hid_loss",
    "hid_loss_spans",
    "importance_weights",
    "js",
    "kd_loss",
    "kd_loss_from_logits",
    "pair_teacher_layers",
    "pool_spans",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "span_membership",
    "topk_forward_kl",
    "topk_kd_loss",
    "tvd",
]
