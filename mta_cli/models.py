"""Loading causal LMs and tokenizers: HF hub names, local folders, and `.gguf` files.

A GGUF file is de-quantised to float by transformers; such a model is rebuilt from its config and
state dict (`materialize`) so that it can be trained and saved like any other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `path` is a hub name or folder, `gguf_file` a file name inside it."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "ModelSource":
        p = Path(spec)
        if spec.endswith(".gguf"):
            if not p.is_file():
                raise ModelLoadError(f"GGUF file not found: {spec}")
            return cls(str(p.parent), p.name)
        return cls(spec)

    @property
    def display(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """A fast tokenizer (offsets are required). Padding side is left to the caller."""
    from transformers import AutoTokenizer

    src = ModelSource.parse(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer from {src.display}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"tokenizer of {src.display} is not a fast tokenizer; mta needs offset mappings")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """Load any causal LM in `dtype` on `device`, in eval mode, GGUF files de-quantised and rebuilt."""
    from transformers import AutoModelForCausalLM

    src = ModelSource.parse(spec)
    torch_dtype = resolve_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, gguf_file=src.gguf_file, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {src.display}: {e}") from e
    if src.gguf_file:
        model = materialize(model)
    return model.to(device=resolve_device(device), dtype=torch_dtype).eval()


def materialize(model):
    """Rebuild a model from its config and state dict (drops GGUF quantisation markers)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full serialised state (vocab, merges, normalizer, specials)."""
    state = json.loads(tok.backend_tokenizer.to_str())
    blob = json.dumps(state, sort_keys=True) + json.dumps(sorted(map(str, tok.all_special_tokens)))
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_fingerprint(model) -> str:
    """sha256 over parameter names, shapes and bytes (fp32): identifies a teacher exactly."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def n_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def hidden_size(model) -> int:
    return int(model.config.get_text_config().hidden_size)
