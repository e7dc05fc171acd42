"""Named recipes: the settings of a published method's own scripts, as defaults that explicit options override.

`distillm` is DistiLLM's (Ko et al., ICML 2024) recipe for its GPT-2 0.1B student (scripts/gpt2/distillm/
train_0.1B_1.5B.sh): `--type adaptive-sfkl` (the skew forward KL, λ = 0.1, with adaptive student-generated
data), `--kd-ratio 1.0` (the divergence alone, no CE term), lr 5e-4, no warmup, weight decay 0.01, clipping
1.0. Its student-generated data comes from `mta generate` rounds; batch size and epochs are the user's budget.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, dict]] = {
    "distillm": {
        "objective": {"loss": "skl", "kd_alpha": 1.0, "skew_lambda": 0.1},
        "train": {"lr": 5e-4, "warmup_ratio": 0.0, "weight_decay": 0.01, "max_grad_norm": 1.0},
    },
}


def recipe(name: str) -> dict[str, dict]:
    """The settings of recipe `name`: {"objective": {...}, "train": {...}} (ValueError naming the known ones)."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]
