"""The documented multi-process launch, on CPU: torchrun with 2 gloo processes on a generated ImageFolder, and a
SIGTERM that reaches only one of the ranks."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_image_folder
from test_faults import write_wrapper
from test_train import TINY, assert_same_training_state

from sparo_dino.train.preemption import REQUEUE_EXIT_CODE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_image_folder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=8, size=32)


def torchrun(script: str, data: str, out, cwd, env=ENV, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *TINY, "--data_path", data, "--output_dir", str(out), "--epochs", "2", "--saveckp_freq", "1", *extra]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """2 epochs, with the k-NN monitor after the last one (both ranks extract features). torchrun runs inside a
    simulated SLURM allocation of another size, as an sbatch script would start it: torchrun's variables win."""
    out = tmp_path_factory.mktemp("run")
    labelled = make_image_folder(tmp_path_factory.mktemp("labelled"), num_classes=3, per_class=5, size=32,
                                 splits=("train", "val"))
    in_allocation = {**ENV, "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
                     "SLURM_JOB_NODELIST": "nosuchnode[1-4]"}
    return str(out), torchrun(os.path.join(REPO, "main_dino.py"), data, out, out, in_allocation, "--knn_every", "2",
                              "--knn_data_path", labelled)


def test_two_process_torchrun_training(two_process_run) -> None:
    out, result = two_process_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "destroy_process_group" not in result.stderr  # torch warns when a process group is left behind

    state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 0
    assert state["rng"]["torch"].shape[0] == 2  # one RNG stream per rank
    assert not torch.equal(state["rng"]["torch"][0], state["rng"]["torch"][1])
    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in records] == [0, 1]  # written once, by rank 0
    assert len(open(os.path.join(out, "provenance.jsonl")).readlines()) == 1
    assert json.loads(open(os.path.join(out, "provenance.jsonl")).readline())["world_size"] == 2
    # 16 images, 4 per process and step: 2 iterations per epoch; rank 0 logs each of them (print_freq 2)
    assert result.stdout.count("it [2/2]") == 2
    # lr scaled for the total batch of 2 x 4: the 1 warmup epoch's 2 steps run at 0 and the peak 5e-4 * 8 / 256;
    # train_lr is their mean (official DINO logs epoch means), train_lr_last the last step's value
    assert records[0]["train_lr"] == pytest.approx(5e-4 * 8 / 256 / 2, rel=1e-12)
    assert records[0]["train_lr_last"] == 5e-4 * 8 / 256
    assert "knn_top1" not in records[0] and 0 <= records[1]["knn_top1"] <= 100
    assert "k-NN monitor: weighted 20-NN top-1" in result.stdout


def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_resumes_exactly(data, two_process_run,
                                                                                tmp_path) -> None:
    """Rank 1 alone gets SIGTERM after step (epoch 1, iteration 1): both ranks agree at that step boundary, the
    checkpoint holds (1, 1), both exit 75 (torchrun reports it), and the rerun equals the uninterrupted run (which
    also ran the k-NN monitor: it must not shift any random stream)."""
    out = tmp_path / "run"
    wrapper = write_wrapper(tmp_path)
    result = torchrun(wrapper, data, out, tmp_path, {**ENV, "SIGTERM_AT": "1,1,1"})
    log = result.stdout + result.stderr
    assert "RANK 0 EXIT 75" in log and "RANK 1 EXIT 75" in log, log[-3000:]
    assert result.returncode != 0 and re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}\b", result.stderr)
    assert "stopping (another rank was asked to stop): " in result.stdout  # rank 0 learned it from rank 1
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (1, 1)
    assert state["rng"]["torch"].shape[0] == 2
    resumed = torchrun(os.path.join(REPO, "main_dino.py"), data, out, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "epochs done, iteration 1" in resumed.stdout
    assert_same_training_state(two_process_run[0], str(out))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_srun_tasks_train_as_one_job(data, tmp_path) -> None:
    """`srun --ntasks=2 python main_dino.py` as SLURM starts it, no torchrun (RANK and WORLD_SIZE unset): the two
    tasks join one 2-rank job instead of training twice into the same output dir."""
    out = tmp_path / "run"
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    task_env = {key: value for key, value in ENV.items() if key not in launcher and not key.startswith("SLURM_")}
    task_env.update(SLURM_NTASKS="2", SLURM_JOB_ID="77", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = [sys.executable, os.path.join(REPO, "main_dino.py"), *TINY, "--data_path", data,
               "--output_dir", str(out), "--epochs", "1"]
    tasks = [subprocess.Popen(command, env={**task_env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert state["rng"]["torch"].shape[0] == 2  # one RNG stream per rank
    provenance = [json.loads(line) for line in open(out / "provenance.jsonl")]
    assert [record["world_size"] for record in provenance] == [2]  # one run, written once
    assert "it [2/2]" in logs[0] and "it [" not in logs[1]  # 16 images / (2 x 4): 2 steps, logged by rank 0
