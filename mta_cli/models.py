"""Loading causal LMs and tokenizers: HF hub names, local folders, and `.gguf` files.

A GGUF file is de-quantised to float by transformers; such a model is rebuilt from its config and
state dict (`materialize`) so that it can be trained and saved like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and why."""


DOWNLOAD_ENV = "MTA_ALLOW_DOWNLOAD"


def downloads_allowed() -> bool:
    """Hub names are looked up in the local Hugging Face cache only, unless MTA_ALLOW_DOWNLOAD=1: a typo then
    fails at once instead of after a minute of network retries."""
    return os.environ.get(DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


def looks_like_path(spec: str) -> bool:
    """A spec meant as a file or folder: absolute, relative with ./ ../ ~, more than one '/', a trailing
    '/', or a file suffix. A hub name is `name` or `org/name`."""
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or spec.endswith(("/", "\\"))
            or spec.count("/") > 1 or Path(spec).suffix in (".gguf", ".safetensors", ".bin", ".json"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `path` is a hub name or an absolute folder, `gguf_file` a file name inside it."""

    path: str
    gguf_file: str | None = None
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> "ModelSource":
        """A folder, a .gguf file or a hub name; a spec that looks like a path must exist (ModelLoadError)."""
        spec = str(spec)
        p = Path(spec).expanduser()
        if spec.endswith(".gguf"):
            if not p.is_file():
                raise ModelLoadError(f"{spec}: no such GGUF file; check the path")
            return cls(str(p.resolve().parent), p.name, spec)
        if p.exists():
            if not p.is_dir():
                raise ModelLoadError(f"{spec} is a file; a model is a folder (config.json, weights, tokenizer), "
                                     "a .gguf file or a hub name")
            return cls(str(p.resolve()), None, spec)
        if looks_like_path(spec):
            raise ModelLoadError(f"{spec}: no such file or folder; check the path")
        return cls(spec, None, spec)

    @property
    def local(self) -> bool:
        return Path(self.path).is_dir()

    @property
    def display(self) -> str:
        """The model as the user named it."""
        return self.spec or (str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path)

    @property
    def location(self) -> str:
        """An absolute path (local models) or the hub name: what a cache stores to find the model again."""
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    def load_error(self, what: str, error: Exception) -> ModelLoadError:
        """A one-line reason why `what` (model or tokenizer) could not be loaded, and what to do."""
        if not self.local and not downloads_allowed():
            return ModelLoadError(f"{self.display}: no such folder, and no model of that name in the local Hugging "
                                  f"Face cache. Check the path; to download it from the hub, set {DOWNLOAD_ENV}=1")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ModelLoadError(f"cannot load the {what} of {self.display}: {first_line}")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """A fast tokenizer (offsets are required). Padding side is left to the caller."""
    from transformers import AutoTokenizer

    src = ModelSource.parse(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code,
                                            local_files_only=not downloads_allowed())
    except (OSError, ValueError) as e:
        raise src.load_error("tokenizer", e) from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"tokenizer of {src.display} is not a fast tokenizer; mta needs offset mappings")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", trust_remote_code: bool = False,
                   placement: dict | None = None):
    """Load any causal LM in `dtype` on `device`, in eval mode, GGUF files de-quantised and rebuilt.

    `placement` ({"device_map", "max_memory", "offload_folder"}) spreads a model larger than one device over
    several (GPUs, CPU memory, disk) with accelerate's big-model loading instead; `device` is then unused."""
    from transformers import AutoModelForCausalLM

    src = ModelSource.parse(spec)
    torch_dtype = resolve_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, gguf_file=src.gguf_file, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            local_files_only=not downloads_allowed(), **(placement or {}),
        )
    except (OSError, ValueError) as e:
        raise src.load_error("model", e) from None
    if placement:
        return model.eval()
    if src.gguf_file:
        model = materialize(model)
    return model.to(device=resolve_device(device), dtype=torch_dtype).eval()


def input_device(model) -> torch.device:
    """Where the model takes its input ids: its embeddings' execution device (accelerate's, with a device map)."""
    embeddings = model.get_input_embeddings()
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    return embeddings.weight.device


def full_state_dict(model) -> dict:
    """The model's state dict with every tensor in memory: weights accelerate offloaded (device map with "cpu" or
    "disk" entries) are loaded into CPU memory, so that they can be read (fingerprinted)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        return get_state_dict_offloaded_model(model)
    return model.state_dict()


def own_tensors(module, names: tuple[str, ...]) -> list[torch.Tensor | None]:
    """The module's tensors `names` (None where absent), detached, in memory on its execution device: copies of
    weights accelerate offloaded, the module's own tensors otherwise."""
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(module):
        return [None if getattr(module, n, None) is None else getattr(module, n).detach() for n in names]
    with align_module_device(module):
        return [None if getattr(module, n, None) is None else getattr(module, n).detach().clone() for n in names]


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


def weights_fingerprint(model, dtype: str | torch.dtype | None = None) -> str:
    """sha256 over parameter names, shapes and values (as fp32): identifies a teacher exactly.

    `dtype` rounds every value to that precision first, so that a teacher extracted in bf16 and the same
    checkpoint loaded in fp32 for training give the same fingerprint."""
    rounding = None if dtype is None else resolve_dtype(dtype)
    h = hashlib.sha256()
    for name, t in sorted(full_state_dict(model).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        t = t.detach().to("cpu")
        if rounding is not None and t.is_floating_point():
            t = t.to(rounding)
        h.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N` or `mps`; a clear ModelLoadError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: this torch build sees no CUDA GPU (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"--device {name!r}: mta runs on cpu, cuda or mps")
    return device


def n_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def hidden_size(model) -> int:
    return int(model.config.get_text_config().hidden_size)
