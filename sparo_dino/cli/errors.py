"""How the command-line scripts end on a user's mistake: one line naming the problem, and as early as possible.

A traceback from a data-loader worker, or an unwritable output folder found after minutes of training or feature
extraction, tells a user less than one line at start-up; every entry point shares these two helpers.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, NoReturn


class OutputDirError(ValueError):
    """An output folder that cannot receive files; the message names it and why."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a mistake on the command line ends with one line and where to look, not the usage
    block of every flag before it (46 lines for main_dino.py); every entry point builds its parser from this."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def warn(message: str) -> None:
    """`warning: <message>` on stderr, once per job: a flag that is legal but likely not what the user meant is
    said by the process that prints the run's output (RANK 0, or a process that is not part of a group)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


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


def print_once(error: BaseException) -> None:
    """`error: <one line>` on stderr, once per error: a failing rank prints it before tearing its process group
    down (a teardown must not stand between the rank and its message), and the entry point sees it again after."""
    if not getattr(error, "_sparo_printed", False):
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        error._sparo_printed = True


def exit_with(error: BaseException) -> NoReturn:
    """End the script with status 1 and the error's line on stderr, unless print_once has shown it already."""
    sys.exit(1 if getattr(error, "_sparo_printed", False) else f"error: {one_line(error)}")


def require_writable_dirs(folders: Mapping[str, str | None]) -> None:
    """Raise OutputDirError unless every output folder (flag -> folder; None: not used) can receive files or be
    created: a file standing at it or at a parent, or a folder this user may not write to, is reported at start-up
    instead of by the first write, which may come after hours of training or minutes of feature extraction.

    Creates nothing (a launcher checks the flags on the submission host, and a folder may hold a placeholder such
    as SLURM's %j): the nearest existing folder on the way up is the one that must be writable. `os.access` answers
    for this user, root included, and says no on a read-only file system."""
    for flag, path in folders.items():
        if path is not None:
            _require_writable_dir(path, flag)


def _require_writable_dir(path: str, flag: str) -> None:
    target = os.path.abspath(path)
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        problem = "is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable by this user (permissions or a read-only file system)"
    else:
        return
    where = f"{flag} {path}" if existing == target else f"{flag} {path} cannot be created: {existing}"
    raise OutputDirError(f"{where} {problem}; choose another {flag}")
