"""What `pip install` puts on sys.path: the package and sparo_vit, not the top-level scripts.

main_dino, eval_knn and eval_linear are the names of official DINO's scripts too: installed as site-packages modules
they would shadow (or be shadowed by) an official DINO checkout on sys.path. Users run them from the repository,
where they are found beside the package; sparo_vit stays installed because the package imports it (and torch.hub
and checkpoints name it)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_the_package_and_sparo_vit_but_not_the_scripts(tmp_path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", "runs",
                                                                "out", ".gpu_data", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"sparo_dino", "sparo_vit.py"}
    assert "sparo_dino/cli/train_flags.py" in names
