"""The logit lens: an intermediate layer's states read through the model's final norm and output head.

HF models apply a final norm to the last layer's states before the head (`hidden_states[N]` already has
it), but not to intermediate ones, so the lens needs the norm. `FinalNorm` re-implements the three forms
in use (Llama-style RMSNorm, Gemma's RMSNorm with weight + 1, LayerNorm) from the module's tensors, so a
cache can store it as plain arrays; `final_norm` picks the form that reproduces the module's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mta_cli.models import own_tensors

NORM_KINDS = ("rms", "rms_offset", "layer")
NORM_ATTRIBUTES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class FinalNorm:
    """y = norm(h): "rms" h / rms(h) * w (Llama, Qwen, Mistral), "rms_offset" h / rms(h) * (1 + w) (Gemma),
    "layer" LayerNorm (GPT-2, OPT). weight [d], bias [d] | None; the statistics in float32 as the models do."""

    kind: str
    weight: Tensor
    bias: Tensor | None
    eps: float

    def to(self, device) -> "FinalNorm":
        return FinalNorm(self.kind, self.weight.to(device), None if self.bias is None else self.bias.to(device), self.eps)

    def __call__(self, h: Tensor) -> Tensor:
        """[..., d] -> [..., d] in h's dtype."""
        if self.kind == "layer":
            return F.layer_norm(h, h.shape[-1:], self.weight.to(h.dtype),
                                None if self.bias is None else self.bias.to(h.dtype), self.eps)
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms":
            return self.weight.to(h.dtype) * x.to(h.dtype)
        return (x * (1.0 + self.weight.to(torch.float32))).to(h.dtype)


def final_norm_module(model) -> nn.Module:
    """The norm a causal LM applies to its last layer's states before the head."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for holder in (base, getattr(model, "transformer", None), getattr(base, "decoder", None)):
        for name in NORM_ATTRIBUTES:
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module):
                return module
    raise ValueError(f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(NORM_ATTRIBUTES)})")


def final_norm(model, probe: Tensor | None = None) -> FinalNorm | None:
    """The model's final norm as a FinalNorm, or None when no known form reproduces it on `probe` [n, d]."""
    try:
        module = final_norm_module(model)
    except ValueError:
        return None
    if getattr(module, "weight", None) is None:
        return None
    eps = next((float(getattr(module, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(module, a)), None)
    if eps is None:
        return None
    weight, bias = own_tensors(module, ("weight", "bias"))  # in memory also where a device map offloaded them
    d = weight.shape[-1]
    if probe is None:
        probe = torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=weight.dtype) * 3
    probe = probe.to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = module(probe)
        for kind in NORM_KINDS:
            candidate = FinalNorm(kind, weight, bias, eps)
            if torch.allclose(candidate(probe), expected, rtol=1e-5, atol=1e-5):
                return candidate
    return None
