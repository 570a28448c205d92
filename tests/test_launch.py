"""launch/submit.py: what a dry run would submit (both command forms), %j output folders, and a real requeue cycle
with submitit's LocalExecutor."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import submitit
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
                 "#SBATCH --mail-type=END,FAIL", "#SBATCH --time=1440", "#SBATCH --signal=USR2@120"):
        assert line in out, line
    assert f"--output_dir {output_dir}" in out and "dino_vit_small_sparo_in1k.yaml" in out
    assert out.count("--output_dir") == 1
    assert "/checkpoint/" not in out  # no hard-coded shared folder


def test_relative_output_dir_becomes_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, output_dir = submit.with_absolute_output_dir(["--data_path", "/data", "--output_dir=runs/a"])
    assert output_dir == tmp_path / "runs" / "a"
    assert argv == ["--data_path", "/data", "--output_dir", str(tmp_path / "runs" / "a")]


def _dry_run(argv: list[str], capsys) -> str:
    assert submit.submit(argv) is None
    return capsys.readouterr().out


def test_official_command_form_submits_what_the_dash_form_submits(tmp_path, capsys):
    """official run_with_submitit.py mixes launcher and training flags; the same run with `--` is identical."""
    training = ["--arch", "vit_small", "--data_path", "/imagenet/train", "--output_dir", str(tmp_path / "runs" / "%j"),
                "--global_crops_scale", "0.25", "1.0", "--use_fp16=false", "--epochs", "50"]
    launcher = ["--nodes", "4", "--ngpus", "8", "--use_volta32", "--comment", "ICML deadline", "--dry_run"]
    mixed = ["--nodes", "4", "--arch", "vit_small", "--ngpus", "8", "--data_path", "/imagenet/train",
             "--use_volta32", "--output_dir", str(tmp_path / "runs" / "%j"), "--global_crops_scale", "0.25", "1.0",
             "--comment", "ICML deadline", "--use_fp16=false", "--dry_run", "--epochs", "50"]
    ns_mixed, argv_mixed = submit.split_argv(mixed)
    ns_dashed, argv_dashed = submit.split_argv(launcher + ["--"] + training)
    assert argv_mixed == argv_dashed == training and vars(ns_mixed) == vars(ns_dashed)
    out = _dry_run(mixed, capsys)
    assert out == _dry_run(launcher + ["--"] + training, capsys)
    for line in ("#SBATCH --nodes=4", "#SBATCH --constraint=volta32gb", "#SBATCH --comment='ICML deadline'",
                 f"#SBATCH --output={tmp_path}/runs/%j/submitit/%j_0_log.out"):
        assert line in out, line
    assert f"--epochs 50 --output_dir {tmp_path}/runs/%j\n" in out and not (tmp_path / "runs").exists()


def test_official_launcher_defaults(tmp_path, capsys):
    """Official: 2 nodes x 8 GPUs, 2800 min, 40 GB per GPU, signal 120 s early, 30 requeues; 11 CPUs per task for
    the default 10 loader workers and the main process (official asks for 10)."""
    out = _dry_run(["--output_dir", str(tmp_path), "--data_path", "/d", "--dry_run"], capsys)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=11", "#SBATCH --time=2800", "#SBATCH --mem=320GB",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=dino", "up to 30 times"):
        assert line in out, line
    assert "--partition" not in out and "--comment" not in out and "--constraint" not in out
    assert "--mem=" not in _dry_run(["--mem_gb", "0", "--output_dir", str(tmp_path), "--data_path", "/d",
                                     "--dry_run"], capsys)


class _FakeJobEnvironment:
    job_id = "4242"


class _NoRendezvous:
    def export(self, **kwargs) -> None:
        pass


def test_job_id_replaces_percent_j_inside_the_job_and_survives_requeue(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit, "JobEnvironment", _FakeJobEnvironment)
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", _NoRendezvous)
    seen: list[list[str]] = []
    monkeypatch.setattr(submit.main_dino, "main", lambda argv, stop: seen.append(list(argv)) or 0)
    template = ["--arch", "vit_tiny", "--output_dir", str(tmp_path / "runs" / "%j")]
    job = submit.TrainingJob(template)
    assert job() == 0
    requeued = job.checkpoint().function
    assert requeued.train_argv == template  # the placeholder travels, the requeued job resolves it again
    assert requeued() == 0
    assert seen == [["--arch", "vit_tiny", "--output_dir", str(tmp_path / "runs" / "4242")]] * 2


def test_percent_j_log_folder_is_created_for_the_real_job_id(tmp_path, monkeypatch, capsys):
    """A fake sbatch answers like SLURM; submitit must put the job's files in runs/<id>/submitit, not in '%j'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command, script in (("sbatch", "echo 'Submitted batch job 4242'"), ("srun", "exit 1")):  # srun: "on SLURM"
        (bin_dir / command).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    (tmp_path / "data").mkdir()
    job = submit.submit(["--partition", "gpu", "--arch", "vit_tiny", "--data_path", str(tmp_path / "data"),
                         "--output_dir", str(runs / "%j")])
    assert job.job_id == "4242"
    assert f"logs in {runs}/4242/submitit; checkpoints in {runs}/4242" in capsys.readouterr().out
    assert not any("%j" in str(path) for path in runs.rglob("*"))  # submitit keeps a dotfile link to the script
    assert [path.name for path in runs.iterdir() if not path.name.startswith(".")] == ["4242"]
    logs = runs / "4242" / "submitit"
    assert (logs / "4242_submitted.pkl").is_file()
    assert f"#SBATCH --output={runs}/%j/submitit/%j_0_log.out" in (logs / "4242_submission.sh").read_text()
    pickled = submitit.helpers.DelayedSubmission.load(logs / "4242_submitted.pkl").function
    assert pickled.train_argv[-2:] == ["--output_dir", str(runs / "%j")]


def test_each_task_asks_for_a_core_per_loader_worker_and_one_for_the_main_process(tmp_path, capsys):
    training = ["--output_dir", str(tmp_path), "--data_path", "/d", "--dry_run"]
    assert "#SBATCH --cpus-per-task=5\n" in _dry_run([*training, "--num_workers", "4"], capsys)
    config = os.path.join(REPO, "configs", "fmnist_vit_tiny.yaml")  # num_workers: 8
    assert "#SBATCH --cpus-per-task=9\n" in _dry_run(["--dry_run", "--", "--config", config, *training[:4]], capsys)
    assert "#SBATCH --cpus-per-task=16\n" in _dry_run(["--cpus_per_task", "16", *training], capsys)
    with pytest.raises(SystemExit, match=r"^error: --cpus_per_task 10 leaves the main process no core of its own "
                                         r"next to --num_workers 10; ask for 11 or lower --num_workers$"):
        submit.submit(["--cpus_per_task", "10", *training])


def test_launcher_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--use_volta32 sets the constraint volta32gb"):
        submit.submit(["--use_volta32", "--constraint", "a100", "--output_dir", "x", "--data_path", "/d"])
    with pytest.raises(SystemExit, match="--cluster local runs on one node"):
        submit.submit(["--cluster", "local", "--nodes", "2", "--", "--output_dir", "x", "--data_path", "/d"])
    with pytest.raises(SystemExit, match="%j in --output_dir needs a SLURM job id"):
        submit.submit(["--cluster", "local", "--output_dir", str(tmp_path / "%j"), "--data_path", "/d"])


def fake_slurm(folder, monkeypatch) -> str:
    """sbatch and srun on PATH that answer like SLURM; sbatch leaves `submitted` in `folder` when called."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    marker = folder / "submitted"
    for command, script in (("sbatch", f"touch {marker}; echo 'Submitted batch job 4242'"), ("srun", "exit 1")):
        (bin_dir / command).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return str(marker)


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "-2"], "--nodes must be >= 1, got -2"),
    (["--ngpus", "0"], "--ngpus must be >= 1, got 0"),
    (["--ngpus", "-1", "--cluster", "local"], "--ngpus must be >= 1, got -1"),  # before: an AttributeError
    (["--timeout", "-5"], "--timeout must be >= 1, got -5"),
    (["--mem_gb", "-4"], "--mem_gb must be >= 0, got -4"),
    (["--max_requeues", "-1"], "--max_requeues must be >= 0, got -1"),
])
def test_launcher_numbers_are_one_line_before_anything_is_submitted(tmp_path, monkeypatch, flags, message):
    """Before: invalid #SBATCH lines (--nodes=-2, --mem=-4GB) went to sbatch."""
    marker = fake_slurm(tmp_path, monkeypatch)
    (tmp_path / "data").mkdir()
    for dry_run in ([], ["--dry_run"]):
        with pytest.raises(SystemExit) as info:
            submit.submit([*flags, *dry_run, "--data_path", str(tmp_path / "data"), "--output_dir",
                           str(tmp_path / "run")])
        assert str(info.value) == f"error: {message}"
    assert not os.path.exists(marker) and not (tmp_path / "run").exists()


def test_no_slurm_on_this_machine_is_one_line(tmp_path, monkeypatch):
    """Before: submitit's RuntimeError traceback ('Could not detect "srun"')."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as info:
        submit.submit(["--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")])
    assert str(info.value) == ("error: --cluster slurm needs a SLURM cluster (sbatch and srun not found on this "
                               "machine): submit from a SLURM login node, or use --cluster local to run here")


def test_missing_data_path_is_one_line_before_submitting(tmp_path, monkeypatch, capsys):
    """Before: submitted, and the job failed at its start on the cluster. A dry run only warns: the data may live
    on the cluster alone."""
    marker = fake_slurm(tmp_path, monkeypatch)
    missing = str(tmp_path / "no_such_data")
    with pytest.raises(SystemExit) as info:
        submit.submit(["--data_path", missing, "--output_dir", str(tmp_path / "run")])
    assert str(info.value) == (f"error: --data_path {missing} does not exist on this machine; the job would fail "
                               "at its start")
    assert not os.path.exists(marker)
    assert submit.submit(["--dry_run", "--data_path", missing, "--output_dir", str(tmp_path / "run")]) is None
    assert capsys.readouterr().err == f"warning: --data_path {missing} does not exist on this machine\n"


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
