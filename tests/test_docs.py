"""The README and docs/ stay true to the code: short, every link resolves, every command they show exists.

A newcomer reads the README first and runs what it shows; a renamed module, a dropped make target or a flag shown
without the value it needs would send them to a traceback, and nothing else in the suite reads these pages.
"""
from __future__ import annotations

import glob
import os
import re

from sparo_dino.cli.config import bool_flag
from sparo_dino.cli.train_flags import get_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
README_MAX_LINES = 260  # the length of a README that can be read in one sitting; details belong in docs/


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _pages() -> list[str]:
    return [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _section(text: str, heading: str) -> str:
    """The body of a `## heading` section, up to the next `## ` heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_readme_is_short() -> None:
    lines = _read(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in _pages():
        text = _read(page)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(page, REPO)}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                broken.append(f"{os.path.relpath(page, REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_make_target_shown_exists() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", _read(os.path.join(REPO, "Makefile")), flags=re.MULTILINE))
    shown = {name for page in _pages()
             for name in re.findall(r"(?:`|^)make ([a-z][\w-]*)", _read(page), flags=re.MULTILINE)}
    assert shown, "the README shows no make command"
    assert shown <= targets, f"make targets shown in the docs but missing from the Makefile: {shown - targets}"


ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")


def test_the_architecture_layout_names_every_module() -> None:
    named = set(re.findall(r"([\w/]+\.py)`", _section(_read(ARCHITECTURE), "Layout")))
    named_files = {os.path.basename(name) for name in named}
    modules = [os.path.relpath(path, REPO) for pattern in ("*.py", "sparo_dino/**/*.py", "experiments/*.py")
               for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True))]
    missing = [module for module in modules
               if os.path.basename(module) != "__init__.py" and os.path.basename(module) not in named_files]
    assert not missing, f"modules missing from docs/architecture.md's Layout table: {missing}"


def test_layout_tables_name_only_existing_modules() -> None:
    """A row names its first module with its folder (`sparo_dino/a.py`, `b.py`); the others share that folder."""
    stale = []
    for page in (README, ARCHITECTURE):
        for row in _section(_read(page), "Layout").splitlines():
            names = re.findall(r"`([\w/]+\.py)`", row)
            folder = os.path.dirname(names[0]) if names else ""
            stale += [name for name in names
                      if not os.path.isfile(os.path.join(REPO, name if "/" in name else os.path.join(folder, name)))]
    assert not stale, f"Layout tables name modules that do not exist: {stale}"


def test_true_false_flags_are_shown_with_their_value() -> None:
    """main_dino's true/false flags take a value, as official DINO's do: `--grad_checkpointing` alone is an error."""
    boolean = {action.option_strings[0] for action in get_args_parser()._actions if action.type is bool_flag}
    flag_table = "\n".join(line for line in _read(os.path.join(REPO, "docs", "training.md")).splitlines()
                           if line.startswith("| `--"))
    shown_alone = []
    for where, text in (("README.md", _read(README)), ("docs/training.md flag table", flag_table)):
        for flag in boolean:
            for match in re.finditer(re.escape(flag) + r"\b(?!\s+(true|false))", text):
                shown_alone.append(f"{where}: {text[match.start():match.end() + 20]!r}")
    assert not shown_alone, "true/false flags shown without a value:\n" + "\n".join(shown_alone)


def test_every_test_named_in_reliability_md_exists() -> None:
    """The fault and bad-input tables name the test that holds each row; a renamed or deleted test must not leave
    a row claiming a guard that no longer runs."""
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", _read(os.path.join(REPO, "docs", "reliability.md")))
    assert len(named) >= 20
    missing = [f"{path}::{name}" for path, name in named
               if not re.search(rf"^def {name}\(", _read(os.path.join(REPO, path)), re.M)]
    assert not missing, missing
