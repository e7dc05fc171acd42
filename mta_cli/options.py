"""Range checks for numeric options, shared by the configuration dataclasses (the Python API) and so by the
CLI: a bad value is refused before anything is loaded, with the option's flag and the allowed range."""

from __future__ import annotations

import math


def flag(field: str) -> str:
    """The command-line flag of a configuration field: max_length -> --max-length."""
    return "--" + field.replace("_", "-")


def check_number(owner, field: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Raise ValueError unless `owner.field` is a finite number (an integer when `integer`) within
    [low, high] ((low, high] when `low_open`); None passes when `optional`."""
    value = getattr(owner, field)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    rule = f"{kind} {' and '.join(bounds)}".strip()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and (
            high is None or value <= high)
    if not ok:
        raise ValueError(f"{flag(field)} must be {rule}, got {value!r}")


def check_choice(owner, field: str, choices) -> None:
    value = getattr(owner, field)
    if value not in choices:
        raise ValueError(f"{flag(field)} must be one of {', '.join(map(str, choices))}, got {value!r}")
