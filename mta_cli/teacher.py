"""The teacher side of extraction: which layers to keep, its exact output head, and one batched forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mta_cli.losses.kd import LogitHead
from mta_cli.models import own_tensors


def output_head(model, detach: bool = True) -> LogitHead:
    """The model's output head, so training can recompute exact logits from the last layer.

    logits = softcap(scale * (h @ weight.T + bias)). Covers plain heads (Llama, GPT-2, Qwen, SmolLM),
    Gemma-2/3 final soft-capping, Cohere's `logit_scale` and Granite's `logits_scaling` (a divisor).
    `extract` also checks the result against the model's own logits, so an unknown head cannot slip
    through. `detach=False` keeps the student's trainable tensors.
    """
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None):
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    if detach:  # a teacher's: in memory also where a device map offloaded it
        weight, bias = own_tensors(head, ("weight", "bias"))
    else:
        weight, bias = head.weight, getattr(head, "bias", None)
    return LogitHead(weight, bias, scale, float(softcap) if softcap else None)


@dataclass
class TeacherOutput:
    """One batch of teacher results, padded: states[l] [B, T, d], optional top-k [B, T, k]."""

    states: dict[int, torch.Tensor]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_rest: torch.Tensor | None = None   # [B, T] probability mass outside the top k


@torch.inference_mode()
def teacher_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int],
                    head: LogitHead | None = None, top_k: int = 0) -> TeacherOutput:
    """Run the teacher once on a right-padded batch [B, T] and keep only `layers`.

    The full-vocabulary logits are not computed here (`logits_to_keep=1`): the cache stores the
    last layer and the head instead. They are computed only for the top-k option.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                use_cache=False, logits_to_keep=1)
    states = {layer: out.hidden_states[layer] for layer in layers}
    if not top_k:
        return TeacherOutput(states)
    logprobs = torch.log_softmax(head(out.hidden_states[-1].to(head.weight.device)).float(), dim=-1)
    values, ids = logprobs.topk(top_k, dim=-1)
    rest = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    return TeacherOutput(states, ids.to(torch.int32), values, rest)
