"""Flags from YAML files and the command line, resolved the same way for every entry point.

Researchers keep recipes in `configs/*.yaml` and tweak single flags on the command line, so the precedence is
parser defaults < YAML < CLI, and a YAML key that is not a flag is an error (a typo would otherwise silently run
the default recipe).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import yaml


def bool_flag(value: str | bool) -> bool:
    """Parse the official DINO style `--flag true|false`."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in {"true", "1", "yes", "on"}:
        return True
    if lowered in {"false", "0", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def read_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file not found: {path}")
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise SystemExit(f"error: config file {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of flag: value, got {type(data).__name__}")
    return data


def _typed(convert: Any, value: Any) -> Any:
    """A YAML value as the flag's type. Text converts as on the command line; a number must already be of the
    flag's kind, since int(16.5) would silently train with a batch of 16 (an int is a fine float)."""
    if convert is int and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    if convert is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return convert(value)


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests the user typed on the command line, so YAML values never override them."""
    sentinel = object()
    shadow = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:  # argparse has no public API to copy actions
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        kwargs: dict[str, Any] = {"dest": action.dest, "default": sentinel}
        if action.nargs == 0:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["nargs"] = action.nargs
        shadow.add_argument(*action.option_strings, **kwargs)
    seen, _ = shadow.parse_known_args(list(argv))
    return {dest for dest, value in vars(seen).items() if value is not sentinel}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with defaults < `--config FILE.yaml` < explicit CLI flags."""
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", type=str, default=None,
                            help="YAML file of flag: value pairs; command-line flags override it")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    values = read_config(args.config)
    valid = sorted(action.dest for action in parser._actions
                   if action.option_strings and action.dest not in {"help", "config"})
    unknown = sorted(key for key in values if key not in valid)
    if unknown:
        raise SystemExit(f"error: unknown key(s) {', '.join(unknown)} in {args.config}; valid keys: {', '.join(valid)}")
    explicit = _explicit_dests(parser, argv)
    actions = {action.dest: action for action in parser._actions}
    for key, value in values.items():
        if key in explicit:
            continue
        action = actions[key]
        takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        if takes_list and value is not None and not isinstance(value, list):
            value = [value]  # `scale: 0.4` reads as the command line's `--scale 0.4`, and is checked as that is
        if not takes_list and isinstance(value, (list, dict)):
            raise SystemExit(f"error: bad value {value!r} for key {key} in {args.config}: it takes one value")
        if action.type is not None and value is not None:
            try:
                value = ([_typed(action.type, v) for v in value] if isinstance(value, list)
                         else _typed(action.type, value))
            except (TypeError, ValueError, AttributeError, argparse.ArgumentTypeError) as err:
                raise SystemExit(f"error: bad value {value!r} for key {key} in {args.config}: {err}") from err
        if action.choices is not None and value not in action.choices:
            raise SystemExit(f"error: bad value {value!r} for key {key} in {args.config}; "
                             f"choose from {', '.join(map(str, action.choices))}")
        setattr(args, key, value)
    return args
