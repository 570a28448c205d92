"""What produced an output directory: command line, resolved config (config.yaml), code version, package versions.

Each launch (first start and every resume) appends one JSON line to OUTPUT_DIR/provenance.jsonl, so a run that
was requeued on other machines or resumed after a code change still says which commit trained which epochs. The
trainer writes it after the launch's first step, so that `compiled` says whether the step really ran compiled
graphs, not whether --compile asked for them.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any, Mapping

import torch
import yaml

PROVENANCE_NAME = "provenance.jsonl"
_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pyyaml", "faiss-cpu", "faiss-gpu-cu12", "submitit")
_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*command: str) -> str | None:
    try:
        result = subprocess.run(["git", *command], cwd=_REPO_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """Commit of the code that runs, and whether tracked files differ from it (None outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda or "none"
    return versions


def machine() -> str:
    """The machine in one phrase for result tables (timings mean little without it): CPU cores, GPU, torch."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {os.cpu_count()} cores{gpu}, torch {torch.__version__.split('+')[0]}"


def file_sha256(path: str) -> str:
    """The SHA-256 of a file the run started from (--pretrained_trunk): a path says where it was, not what it held."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def collect(config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One provenance record; `extra` holds run facts that are not flags (world size, effective precision)."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cwd": os.getcwd(),
        "command": [sys.executable, *sys.argv],
        "git": git_state(),
        "packages": package_versions(),
        "config": dict(config),
        **dict(extra or {}),
    }


def append_provenance(output_dir: str, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Append this launch's record to OUTPUT_DIR/provenance.jsonl and return it (experiment trackers keep it too)."""
    os.makedirs(output_dir, exist_ok=True)
    record = collect(config, extra)
    with open(os.path.join(output_dir, PROVENANCE_NAME), "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def save_config(config: Mapping[str, Any], output_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved flags (plain data), so a run can be repeated with `--config OUTPUT/config.yaml`."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as handle:
        yaml.safe_dump({k: v for k, v in config.items() if k != "config"}, handle, sort_keys=True)
    return path
