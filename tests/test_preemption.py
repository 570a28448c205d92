"""Stop requests from signals: handlers only where Python can own them, periodic checkpoints, and SIGTERM to a whole
job (main process and its data-loader workers, as SLURM sends it; also while the k-NN monitor runs) or Ctrl-C ending
in a resumable checkpoint."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest
from conftest import make_image_folder
from test_train import EVERY_STEP, TINY, assert_same_training_state, executed_steps, load, logged_epochs, steps_between

import main_dino
from sparo_dino.io import checkpoint
from sparo_dino.train import run_state
from sparo_dino.train.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, StopRequest, stop_on_signals

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


# Runs main_dino.main with every image the k-NN monitor reads delayed by SLOW_MONITOR_S seconds (in its loader
# workers), so that a signal lands while the monitor runs.
SLOW_MONITOR = '''
import os, sys, time
import main_dino
from sparo_dino.train import knn_monitor


class Slow:
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        time.sleep(float(os.environ["SLOW_MONITOR_S"]))
        return self.dataset[index]


subset = knn_monitor._fixed_subset
knn_monitor._fixed_subset = lambda dataset, size, seed: Slow(subset(dataset, size, seed))
sys.exit(main_dino.main(sys.argv[1:]))
'''


def test_sigterm_to_the_whole_job_during_the_knn_monitor_keeps_the_epoch(images, clean_run, tmp_path, spawn,
                                                                         capsys) -> None:
    """SLURM's SIGTERM while the monitor extracts features after epoch 0, to the main process, its training
    workers and the monitor's workers: the epoch was saved before the monitor, the monitor's workers survive, the
    monitor stops at the next batch and is reported as skipped, and the run exits 75; the rerun trains epoch 1
    only and ends like the reference (before: the workers died, exit 1, epoch 0 lost)."""
    labelled = make_image_folder(tmp_path / "labelled", num_classes=3, per_class=4, size=32, splits=("train", "val"))
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", "--num_workers", "2",
            "--knn_every", "1", "--knn_data_path", labelled, *EVERY_STEP]
    driver = tmp_path / "slow_monitor.py"
    driver.write_text(SLOW_MONITOR)
    job = spawn([sys.executable, str(driver), *argv], cwd=tmp_path,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "SLOW_MONITOR_S": "0.15"})
    assert job.wait_for("Epoch [0/2] done"), job.text
    assert job.wait_for("k-NN train features: 1/3"), job.text  # the monitor after epoch 0, 2 batches to go
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1  # saved before the monitor: a kill loses nothing
    os.killpg(job.process.pid, signal.SIGTERM)
    assert job.wait_exit(timeout=120) == REQUEUE_EXIT_CODE, job.text
    assert "k-NN monitor after epoch 0 skipped: stop requested (received SIGTERM)" in job.text, job.text
    assert f"stopping (received SIGTERM): {out}/checkpoint.pth holds epoch 1, iteration 0" in job.text, job.text
    assert "Traceback" not in job.text, job.text
    saved = load(os.path.join(out, "checkpoint.pth"))
    assert (saved["epoch"], saved["iteration"]) == (1, 0)
    record = json.loads(open(os.path.join(out, "log.txt")).read())
    assert record["epoch"] == 0 and "knn_top1_init" in record and "knn_top1" not in record
    assert record["knn_skipped"] == "stop requested (received SIGTERM)"

    assert main_dino.main(argv) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between((1, 0), (2, 0))
    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in records] == [0, 1] and 0 <= records[1]["knn_top1"] <= 100
    assert_same_training_state(clean_run, out)  # the monitor draws from a forked RNG


def test_ctrl_c_saves_at_the_next_step_and_exits_130(images, clean_run, tmp_path, spawn, capsys) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole foreground group: the loader workers ignore it, the main
    process says so in one line, saves at the next step boundary and exits 130; the rerun ends like the reference
    (before: a KeyboardInterrupt traceback in the main process and each worker, and no checkpoint)."""
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", "--num_workers", "2", *EVERY_STEP]
    job = spawn([sys.executable, os.path.join(REPO, "main_dino.py"), *argv], cwd=tmp_path,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert job.wait_for("it [2/4]"), job.text
    os.killpg(job.process.pid, signal.SIGINT)
    assert job.wait_exit(timeout=120) == INTERRUPT_EXIT_CODE == 130, job.text
    assert "Ctrl-C: saving at the next step boundary" in job.text and "stopping (received SIGINT)" in job.text
    assert "Traceback" not in job.text and "KeyboardInterrupt" not in job.text, job.text
    partial = load(os.path.join(out, "checkpoint.pth"))
    position = (partial["epoch"], partial["iteration"])
    assert position in {(0, 2), (0, 3), (1, 0)}
    assert main_dino.main(argv) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between(position, (2, 0))
    assert_same_training_state(clean_run, out)


# A process that turns signals into a stop request, as main_dino.py does, then gets two Ctrl-C.
TWO_CTRL_C = '''
import os, signal, time
from sparo_dino.train.preemption import stop_on_signals

with stop_on_signals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    print(f"requested {stop.requested} exit code {stop.exit_code}", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    print("still running", flush=True)
'''


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path, spawn) -> None:
    """The first Ctrl-C is a stop request (saved at the next step, exit 130); a second one, for a user who will not
    wait for that step, ends the process at once with status 130 and one line, no traceback."""
    job = spawn([sys.executable, "-c", TWO_CTRL_C], cwd=tmp_path,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert job.wait_exit(timeout=60) == 130, job.text
    assert "requested True exit code 130" in job.text and "still running" not in job.text, job.text
    assert "second Ctrl-C: exiting now without saving" in job.text and "Traceback" not in job.text, job.text
