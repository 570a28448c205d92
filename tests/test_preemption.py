"""Stop requests from signals: handlers only where Python can own them, periodic checkpoints, and SIGTERM to a whole
job (main process and its data-loader workers, as SLURM sends it) ending in a resumable checkpoint."""
from __future__ import annotations

import os
import signal
import sys
import threading

import pytest
from test_train import EVERY_STEP, TINY, assert_same_training_state, executed_steps, load, logged_epochs, steps_between

import main_dino
from sparo_dino.io import checkpoint
from sparo_dino.train import run_state
from sparo_dino.train.preemption import REQUEUE_EXIT_CODE, StopRequest, stop_on_signals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clean_run(images, tmp_path_factory) -> str:
    """The uninterrupted reference: 2 epochs of 4 iterations."""
    out = str(tmp_path_factory.mktemp("clean"))
    assert main_dino.main([*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2"]) == 0
    return out


def test_signals_become_stop_requests_and_handlers_are_restored() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with stop_on_signals() as stop:
        assert isinstance(stop, StopRequest) and not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.reason == "received SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first reason and does not kill us
        assert stop.reason == "received SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_no_handlers_outside_the_main_thread() -> None:
    """The submitit launcher trains in a worker thread with its own StopRequest; signal.signal would raise there."""
    seen = []

    def body() -> None:
        with stop_on_signals() as stop:
            seen.append(stop)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [None]


def test_ckpt_every_iters_saves_positions_without_changing_the_run(images, clean_run, tmp_path, monkeypatch) -> None:
    """4 iterations per epoch, a checkpoint every 3 global steps: (0, 3) and (1, 2) besides the epoch ends; the
    saves draw no random numbers, so the run ends exactly like the reference."""
    saved = []
    real_save = checkpoint.save_checkpoint

    def recording_save(state, path):
        saved.append((os.path.basename(path), state["epoch"], state["iteration"]))
        real_save(state, path)

    monkeypatch.setattr(run_state, "save_checkpoint", recording_save)
    out = str(tmp_path / "run")
    assert main_dino.main([*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2",
                           "--ckpt_every_iters", "3"]) == 0
    assert saved == [("checkpoint.pth", 0, 3), ("checkpoint.pth", 1, 0), ("checkpoint0000.pth", 1, 0),
                     ("checkpoint.pth", 1, 2), ("checkpoint.pth", 2, 0)]
    assert_same_training_state(clean_run, out)


def test_sigterm_to_the_whole_job_saves_mid_epoch_and_resumes_exactly(images, clean_run, tmp_path, spawn,
                                                                      capsys) -> None:
    """SIGTERM to the process group, as SLURM sends it: the data-loader workers survive it, the main process
    finishes its step, writes the position and exits 75; running the command again runs the remaining steps only
    and ends like the reference."""
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", "--num_workers", "2", *EVERY_STEP]
    job = spawn([sys.executable, os.path.join(REPO, "main_dino.py"), *argv], cwd=tmp_path,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert job.wait_for("it [2/4]"), job.text  # mid-epoch 0, data-loader workers running
    os.killpg(job.process.pid, signal.SIGTERM)
    assert job.wait_exit(timeout=120) == REQUEUE_EXIT_CODE, job.text
    assert "stopping (received SIGTERM)" in job.text and "Traceback" not in job.text, job.text
    partial = load(os.path.join(out, "checkpoint.pth"))
    position = (partial["epoch"], partial["iteration"])
    assert position in {(0, 2), (0, 3), (1, 0)}  # the step after the signal
    assert executed_steps(job.text) == steps_between((0, 0), position)
    assert main_dino.main(argv) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between(position, (2, 0))
    assert logged_epochs(out) == [0, 1]
    assert_same_training_state(clean_run, out)
