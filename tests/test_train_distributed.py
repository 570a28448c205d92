"""The documented multi-process launch, on CPU: torchrun with 2 gloo processes on a generated ImageFolder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import make_image_folder
from test_train import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_torchrun_training(tmp_path) -> None:
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=8, size=32)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "main_dino.py"), *TINY, "--data_path", data, "--output_dir", str(out),
               "--epochs", "2", "--saveckp_freq", "1"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "destroy_process_group" not in result.stderr  # torch warns when a process group is left behind

    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 0
    assert state["rng"]["torch"].shape[0] == 2  # one RNG stream per rank
    assert not torch.equal(state["rng"]["torch"][0], state["rng"]["torch"][1])
    records = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["epoch"] for r in records] == [0, 1]  # written once, by rank 0
    assert len(open(out / "provenance.jsonl").readlines()) == 1
    assert json.loads(open(out / "provenance.jsonl").readline())["world_size"] == 2
    # 16 images, 4 per process and step: 2 iterations per epoch; rank 0 logs each of them (print_freq 2)
    assert result.stdout.count("it [2/2]") == 2
    # lr scaled for the total batch of 2 x 4 (peak 5e-4 * 8 / 256 reached at the end of the 1 warmup epoch)
    assert records[0]["train_lr"] == 5e-4 * 8 / 256
