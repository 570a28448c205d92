"""launch/submit.py: what a dry run would submit, and a real requeue cycle with submitit's LocalExecutor."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_image_folder
from launch import submit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_training_flags(data: str, output_dir: str, epochs: int = 2) -> list[str]:
    return ["--arch", "vit_tiny_sparo", "--patch_size", "8", "--img_size", "32", "--num_slots", "4",
            "--slot_dim", "4", "--attn_dim", "4", "--out_dim", "32", "--global_crop_size", "32",
            "--local_crop_size", "16", "--local_crops_number", "1", "--batch_size_per_gpu", "2",
            "--epochs", str(epochs), "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "1",
            "--data_path", data, "--output_dir", output_dir]


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, capsys):
    output_dir = tmp_path / "run"
    job = submit.submit(["--nodes", "2", "--ngpus", "8", "--partition", "gpu", "--account", "lab", "--qos", "high",
                         "--constraint", "h100", "--mem_gb", "400", "--mail_user", "me@lab.org",
                         "--mail_type", "END,FAIL", "--timeout", "1440", "--dry_run", "--",
                         "--config", os.path.join(REPO, "configs", "dino_vit_small_sparo_in1k.yaml"),
                         "--data_path", "/imagenet/train", "--output_dir", str(output_dir)])
    out = capsys.readouterr().out
    assert job is None and not output_dir.exists()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --mem=400GB", "#SBATCH --mail-user=me@lab.org",
                 "#SBATCH --mail-type=END,FAIL", "#SBATCH --time=1440", "#SBATCH --signal=USR2@180"):
        assert line in out, line
    assert f"--output_dir {output_dir}" in out and "dino_vit_small_sparo_in1k.yaml" in out
    assert out.count("--output_dir") == 1
    assert "/checkpoint/" not in out  # no hard-coded shared folder


def test_relative_output_dir_becomes_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, output_dir = submit.with_absolute_output_dir(["--data_path", "/data", "--output_dir=runs/a"])
    assert output_dir == tmp_path / "runs" / "a"
    assert argv == ["--data_path", "/data", "--output_dir", str(tmp_path / "runs" / "a")]


def test_launcher_errors_are_one_line():
    with pytest.raises(SystemExit, match="put the training flags after `--`"):
        submit.submit(["--nodes", "1"])
    with pytest.raises(SystemExit, match="--cluster local runs on one node"):
        submit.submit(["--cluster", "local", "--nodes", "2", "--", "--output_dir", "x"])


def _task_pids(controller_pid: int) -> list[int]:
    listing = subprocess.run(["ps", "-o", "pid=", "--ppid", str(controller_pid)], capture_output=True, text=True)
    return [int(pid) for pid in listing.stdout.split()]


def test_local_executor_requeues_on_preemption_and_resumes(tmp_path):
    """Two tasks (gloo on CPU); USR2 to every task, as SLURM sends it, in the middle of the first epoch."""
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=16, size=32)
    output_dir = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1", "SUBMITIT_PREEMPT_SIGNAL": "USR2"}
    os.environ.update(env)
    cwd = os.getcwd()
    os.chdir(REPO)  # the tasks import main_dino and launch.submit from the repository
    try:
        job = submit.submit(["--cluster", "local", "--ngpus", "2", "--timeout", "10", "--",
                             *tiny_training_flags(data, str(output_dir))])
        log = output_dir / "submitit" / f"{job.job_id}_0_log.out"
        deadline = time.time() + 120
        while time.time() < deadline and "Epoch [0/2] it [2/" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        assert "Epoch [0/2] it [2/" in log.read_text(), "training did not start"
        for pid in _task_pids(job._process.pid):
            os.kill(pid, signal.SIGUSR2)
        assert job.results() == [0, 0]
    finally:
        os.chdir(cwd)
    text = log.read_text()
    # submitit calls a signal "timed-out" once 80% of the walltime is used, "preempted" before; both requeue
    assert re.search(r"Caught signal SIGUSR2 .*this job is (timed-out|preempted)", text) and "Requeued job" in text
    assert "stopping (submitit: timeout or preemption)" in text
    resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and "epochs done, iteration" in resumed[0] and "iteration 0" not in resumed[0]
    final = torch.load(output_dir / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == 2 and final["iteration"] == 0
    launches = (output_dir / "provenance.jsonl").read_text().strip().splitlines()
    assert len(launches) == 2 and json.loads(launches[0])["world_size"] == 2
