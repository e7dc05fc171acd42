"""Recipes: the options of `mta extract | train | eval` from TOML files (`--config recipe.toml`).

A recipe holds one table per command (`[extract]`, `[train]`, `[eval]`); a pipeline file holds several, and
each command reads its own. A key is an option's flag without the dashes (`max-length`, or `max_length`); a
value is a TOML string, number or boolean, or a list for a repeatable option (`model = ["a", "b"]`) or a
comma-separated one (`layers = [15, 22, 30]`). `--config` may be repeated: later files override earlier
ones, and flags on the command line override them all. The mechanism is click's `default_map`: the recipe
supplies the defaults of the command's own options, so every option is covered and parsed, checked and
documented exactly as on the command line. (Only typer's names are used: recent typer releases carry their
own copy of click.)
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

import typer

from mta_cli.cli_support import fail

COMMANDS = ("extract", "train", "eval")


def read_recipe(path: Path, command: str) -> dict:
    """The `[command]` table of a recipe file; an unreadable file, a key outside the command tables or a
    file without this command's table is refused with the file named."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise fail(f"--config {path}: {e.strerror or e}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise fail(f"--config {path}: not valid TOML ({e})")
    for key, value in document.items():
        if key not in COMMANDS or not isinstance(value, dict):
            raise fail(f"{path}: unknown key {key!r}: a recipe holds the tables "
                       + ", ".join(f"[{c}]" for c in COMMANDS))
    if command not in document:
        raise fail(f"{path}: no [{command}] table, so nothing in it applies to `mta {command}`")
    return document[command]


def recipe_options(ctx: typer.Context) -> dict:
    """The command's options a recipe may set, by flag without dashes (`--max-length` -> "max-length")."""
    return {opt.lstrip("-"): param for param in ctx.command.params if param.param_type_name == "option"
            and "--config" not in param.opts and not param.hidden for opt in param.opts if opt.startswith("--")}


def recipe_defaults(ctx: typer.Context, table: dict, path: Path, command: str) -> dict:
    """`table` as click's default_map (option name -> value), each value checked as the command line would
    check it; an unknown key or a bad value is refused with the file and key named."""
    options = recipe_options(ctx)
    defaults = {}
    for key, value in table.items():
        param = options.get(key.replace("_", "-"))
        if param is None:
            close = difflib.get_close_matches(key.replace("_", "-"), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; see `mta {command} --help`"
            raise fail(f"{path}: [{command}] unknown key {key!r}: not an option of `mta {command}`{hint}")
        if isinstance(value, list) and not param.multiple:
            value = ",".join(map(str, value))
        elif param.multiple and not isinstance(value, list):
            value = [value]
        try:
            param.process_value(ctx, value)
        except typer.BadParameter as e:
            raise fail(f"{path}: [{command}] {key}: {e.format_message()}")
        defaults[param.name] = value
    return defaults


def apply_recipes(ctx: typer.Context, param: typer.CallbackParam, paths: list[Path] | None) -> list[Path] | None:
    """Eager callback of `--config`: the recipes become the defaults of the other options."""
    if paths:
        command = ctx.info_name
        defaults = dict(ctx.default_map or {})
        for path in paths:
            defaults |= recipe_defaults(ctx, read_recipe(path, command), path, command)
        ctx.default_map = defaults
    return paths


def config_option():
    """The `--config` option shared by extract, train and eval."""
    return typer.Option(None, "--config", is_eager=True, callback=apply_recipes, metavar="RECIPE.toml",
                        help="read options from the command's table ([extract], [train] or [eval]) of a TOML "
                             "recipe; repeat to layer recipes; flags given here override them")


def effective_options(ctx: typer.Context) -> dict:
    """Every option of the running command with its effective value, keyed like a recipe (so it can be
    pasted back as one): what the command line, the recipes and the defaults decided together."""
    effective = {}
    for key, param in recipe_options(ctx).items():
        if param.name in ctx.params and param.opts[0] == "--" + key:
            value = ctx.params[param.name]
            if isinstance(value, (tuple, list)):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            elif isinstance(value, Path):
                value = str(value)
            effective[key] = value
    return effective
