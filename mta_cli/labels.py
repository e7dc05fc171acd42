"""Short names for paths in tables, legends and file names: a model, run or eval file is shown by its last
path component (its folder or file name), with as many parent folders as make it unique among the others,
so that a long path never wraps a table over several lines."""

from __future__ import annotations

from pathlib import PurePath


def short_names(paths: list[str]) -> list[str]:
    """The last component of each path, extended by parent folders until it differs from every other."""
    parts = [PurePath(p).parts or (str(p),) for p in paths]
    names = []
    for i, own in enumerate(parts):
        depth = 1
        while depth < len(own) and any(_tail(other, depth) == _tail(own, depth)
                                       for j, other in enumerate(parts) if j != i):
            depth += 1
        names.append(_tail(own, depth))
    return names


def _tail(parts: tuple[str, ...], depth: int) -> str:
    return "/".join(parts[-depth:])


def split_named(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a spec without '=' before its first '/' -> (None, spec)."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and rest:
        return name, rest
    return None, spec


def model_labels(specs: list[str]) -> list[tuple[str, str]]:
    """(label, spec) per model: the NAME of `NAME=PATH`, else the short name of the path or hub name.
    Two models with the same NAME are refused (ValueError)."""
    named = [split_named(s) for s in specs]
    shorts = iter(short_names([spec for name, spec in named if name is None]))
    labels = [(name if name is not None else next(shorts), spec) for name, spec in named]
    given = [name for name, _ in named if name is not None]
    clash = sorted({name for name in given if [label for label, _ in labels].count(name) > 1})
    if clash:
        raise ValueError(f"--model NAME=PATH: the name {clash[0]!r} is used twice; give each model its own name")
    return labels
