"""Layers only point down: the library never imports a top-level script, the layers below the command line never
import it (flags are parsed once and handed down as data), and the model imports nothing else of the package."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in REPO.glob("*.py")} - {"sparo_vit"} | {"experiments"}


def imported(folder: str) -> dict[str, set[str]]:
    """{module path: every module it imports (absolute names)} for the .py files under sparo_dino/<folder>."""
    result = {}
    for path in (REPO / "sparo_dino" / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        result[str(path.relative_to(REPO))] = names
    return result


def test_the_library_imports_no_script_and_leaves_sys_path_alone() -> None:
    offenders = {path: sorted(names & SCRIPTS | {n for n in names if n.split(".")[0] in SCRIPTS})
                 for path, names in imported("").items()}
    assert {path: names for path, names in offenders.items() if names} == {}
    assert [str(p) for p in (REPO / "sparo_dino").rglob("*.py") if "sys.path" in p.read_text()] == []


def test_only_the_command_line_layer_imports_the_flags() -> None:
    core = {path: sorted(n for n in names if n.startswith("sparo_dino.cli"))
            for folder in ("model", "data", "train", "eval", "io") for path, names in imported(folder).items()}
    assert {path: names for path, names in core.items() if names} == {}


def test_the_model_imports_nothing_else_of_the_package() -> None:
    model = {path: sorted(n for n in names if n.startswith("sparo_dino") and not n.startswith("sparo_dino.model"))
             for path, names in imported("model").items()}
    assert {path: names for path, names in model.items() if names} == {}
