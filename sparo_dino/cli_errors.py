"""How the command-line scripts end on a user's mistake: one line naming the problem.

A traceback from a data-loader worker tells a user less than the one line at its end; every entry point shares this.
"""
from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The error's own message on one line. Errors raised in data-loader workers arrive wrapped in the worker's
    traceback, whose last line is `module.Type: message`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last.removeprefix(prefix)
    return last
