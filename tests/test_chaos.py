"""Faults of a multi-process run (CPU, gloo, 2 ranks under torchrun): SIGKILL of either rank or of the whole job at
seeded random moments, rank 0 failing to write its checkpoint, and a rank that hangs.

The chaos loop kills CHAOS_KILLS times (default 2, what CI runs; `make chaos` runs 5) and then requires the run to
end bit-identical to an uninterrupted one: student, teacher, optimizer state, DINO center and log.txt.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import OutputLines, make_image_folder
from test_faults import WRAPPER, temporaries, write_wrapper
from test_train import TINY, assert_same_training_state, error_line, load

import main_dino
from sparo_dino import distributed
from sparo_dino.io import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
EPOCHS = 6
ITERS_PER_EPOCH = 4  # 32 images, 2 ranks x 4 per step
# The kills in order; CI runs the first two, `make chaos` all five: a kill of a rank makes torchrun restart both
# (attempts 1, 2, 3 of one launch after the relaunch), a kill of everything (agent and workers, like a lost node)
# is followed by the same command again.
KILL_PLAN = ("rank 0", "everything", "rank 1", "rank 0", "rank 1")
KILLS = int(os.environ.get("CHAOS_KILLS", "2"))
# not anchored to a line: another process's text may share the marker's line
_RANK_LINE = re.compile(r"RANK (\d+) PID (\d+) ATTEMPT (\d+)(?!\d)")
_STEP_LINE = re.compile(r"^Epoch \[\d+/\d+\] it \[\d+/\d+\]", re.MULTILINE)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_image_folder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=16, size=32)


def command(script: str, data: str, out, *extra: str, restarts: int = 5) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
            "--monitor-interval=0.1", script, *TINY, "--print_freq", "1", "--data_path", data,
            "--output_dir", str(out), "--epochs", str(EPOCHS), "--saveckp_freq", "100", "--ckpt_every_iters", "2",
            *extra]


def log_records(folder) -> list[dict]:
    """log.txt without its wall-clock field."""
    records = [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]
    return [{k: v for k, v in record.items() if k != "epoch_time_s"} for record in records]


def kill_workers(pids) -> None:
    """torchrun starts each worker in its own session: killing the agent's group leaves them running. Only pids
    that still run the test's wrapper are killed (a finished worker's pid may have been reused)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"faulty_main.py" in handle.read():
                    os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def worker_pids(job: OutputLines, attempt: int) -> dict[int, int]:
    """rank -> pid of the workers of torchrun's restart `attempt`, once both have started."""
    assert job.wait_for(f"ATTEMPT {attempt}", count=2, timeout=120), job.text
    return {int(rank): int(pid) for rank, pid, seen in _RANK_LINE.findall(job.text) if int(seen) == attempt}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(command(os.path.join(REPO, "main_dino.py"), data, out), env=ENV, cwd=out,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(out)


def test_kills_of_ranks_and_of_the_whole_job_end_bit_identical(data, uninterrupted, tmp_path, spawn,
                                                                  request) -> None:
    """SIGKILL at seeded random moments after a step was logged: torchrun restarts the group from checkpoint.pth
    by itself after a rank's death (the restarted workers must not hang in the rendezvous), the same command
    continues after the whole job died, and the finished run equals the uninterrupted one bit for bit."""
    out = tmp_path / "run"
    argv = command(write_wrapper(tmp_path), data, out)
    rng = random.Random(0)
    started = time.monotonic()
    job, attempt, launches, outputs = spawn(argv, cwd=tmp_path, env=ENV), 0, 1, []
    request.addfinalizer(lambda: kill_workers(int(pid) for line in outputs + [job.text]
                                              for _, pid, _ in _RANK_LINE.findall(line)))
    for target in KILL_PLAN[:KILLS]:
        pids = worker_pids(job, attempt)
        assert job.wait_for("Epoch [", count=rng.randint(1, 5), timeout=120), job.text  # steps of this attempt
        time.sleep(rng.uniform(0.0, 0.5))  # a step takes about 0.4 s
        assert "EXIT 0" not in job.text, "the run ended before the kill"
        if target == "everything":
            os.killpg(job.process.pid, signal.SIGKILL)
            kill_workers(pids.values())
            job.wait_exit(timeout=60)
            outputs.append(job.text)
            job, attempt, launches = spawn(argv, cwd=tmp_path, env=ENV), 0, launches + 1
        else:
            os.kill(pids[int(target.split()[1])], signal.SIGKILL)
            attempt += 1  # torchrun notices the death, stops the other rank and starts both again
        if os.path.exists(out / "checkpoint.pth"):
            checkpoint.load_checkpoint(str(out / "checkpoint.pth"))  # never a half-written file
    code = job.wait_exit(timeout=600)
    outputs.append(job.text)
    text = "".join(outputs)
    assert code == 0, text[-5000:]
    assert "RANK 0 EXIT 0" in job.text and "RANK 1 EXIT 0" in job.text
    assert "resumed from" in text
    assert temporaries(str(out)) == []
    assert_same_training_state(uninterrupted, str(out))
    assert log_records(out) == log_records(uninterrupted)
    executed = len(_STEP_LINE.findall(text))
    print(f"\nchaos: {KILLS} kills ({', '.join(KILL_PLAN[:KILLS])}), {launches} launches, "
          f"{attempt} torchrun restarts in the last launch, {executed - EPOCHS * ITERS_PER_EPOCH} steps replayed "
          f"of {EPOCHS * ITERS_PER_EPOCH}, {time.monotonic() - started:.0f} s wall")


def test_markers_of_two_processes_on_one_line_are_both_seen(spawn) -> None:
    """Under PYTHONUNBUFFERED two ranks' prints can share a line ("...ATTEMPT 1RANK 0 ...", seen in CI): both
    markers count, and both ranks' pids are read."""
    line = "RANK 1 PID 11 ATTEMPT 1RANK 0 PID 10 ATTEMPT 1"
    job = spawn([sys.executable, "-c", f"print({line!r}); print('after')"])
    assert worker_pids(job, 1) == {0: 10, 1: 11}


def test_rank0_checkpoint_write_failure_stops_every_rank_within_seconds(data, tmp_path, spawn) -> None:
    """Rank 0's second checkpoint write fails as on a full disk: both ranks print one error line and exit at once
    (not after the collective timeout); the first checkpoint is intact and no partial file is left."""
    out = tmp_path / "run"
    job = spawn(command(write_wrapper(tmp_path), data, out, restarts=0), cwd=tmp_path,
                env={**ENV, "FULL_DISK_AFTER": "1"})
    code = job.wait_exit(timeout=300)
    text = job.text
    assert code != 0 and "RANK 0 EXIT 1" in text and "RANK 1 EXIT 1" in text, text[-3000:]
    failed_at = float(re.search(r"^DISK FULL ([\d.]+)$", text, re.MULTILINE).group(1))
    assert time.time() - failed_at < 30  # ranks and agent gone within seconds, not after 30 minutes
    path = out / "checkpoint.pth"
    # both ranks write to the same terminal, so their lines may interleave: count the messages, not the lines
    expected = (f"error: cannot write checkpoint {path}: No space left on device; the previous checkpoint is kept",
                f"error: rank 0 could not write {path}; see its error")
    assert [text.count(message) for message in expected] == [1, 1] and text.count("error: ") == 2, text[-3000:]
    state = load(path)
    assert (state["epoch"], state["iteration"]) == (0, 2)
    assert temporaries(str(out)) == []


def test_a_hung_rank_is_named_after_the_collective_timeout(data, tmp_path, spawn) -> None:
    """Rank 1 stops answering after step 2 of epoch 0; with --dist_timeout_minutes 0.1 rank 0 fails 6 s later with
    one line that names rank 1 and keeps gloo's reason."""
    out = tmp_path / "run"
    job = spawn(command(write_wrapper(tmp_path), data, out, "--dist_timeout_minutes", "0.1", "--ckpt_every_iters",
                        "0", restarts=0), cwd=tmp_path, env={**ENV, "HANG_AT": "0,2,1"})
    assert job.wait_for("HANGING", timeout=120), job.text
    hung_at = time.monotonic()
    assert job.wait_for("error:", timeout=60), job.text
    waited = time.monotonic() - hung_at
    line = error_line(job.text)
    assert line.startswith("error: rank 0: a collective failed in epoch 0 after step 2/4 "
                           "(--dist_timeout_minutes 0.1); rank(s) 1 did not arrive (hung or dead); torch: "), line
    assert "Timed out" in line
    assert 6 <= waited < 6 + 10 + 10  # the timeout, the 10 s wait for the others' reports, start-up slack


# NCCL's destroy_process_group waits for every peer; gloo's returns at once. The prefix makes a destroy block as
# NCCL's does while a peer is stuck, and FAIL_AT="epoch,iteration,rank" makes that rank's training fail after the step.
BLOCKING_DESTROY = '''
import os, time
import torch.distributed
from sparo_dino.train import trainer


def destroy_waits_for_the_peers(*args, **kwargs):
    os.write(1, b"DESTROY\\n")
    time.sleep(3600)


torch.distributed.destroy_process_group = destroy_waits_for_the_peers
at = tuple(map(int, os.environ["FAIL_AT"].split(",")))


def step_then_fail(self, crops, epoch, global_iteration, step=trainer.DinoTrainer.train_step):
    metrics = step(self, crops, epoch, global_iteration)
    if (epoch, global_iteration % self.iters_per_epoch + 1, self.info.rank) == at:
        os.write(1, f"FAILING {time.time()}\\n".encode())
        raise trainer.TrainingError(f"injected failure on rank {self.info.rank}")
    return metrics


trainer.DinoTrainer.train_step = step_then_fail
'''


def test_a_failing_rank_prints_its_error_first_and_aborts_instead_of_a_blocking_destroy(data, tmp_path, spawn):
    """Rank 1 fails after step 2 while rank 0 goes on into the next collective. Its line must come out at once and
    its process group be aborted, not destroyed: a coordinated destroy (NCCL) would wait for rank 0 until the
    collective timeout, with nothing printed."""
    script = tmp_path / "failing_main.py"
    script.write_text(BLOCKING_DESTROY + WRAPPER)
    job = spawn(command(str(script), data, tmp_path / "run", "--ckpt_every_iters", "0", restarts=0), cwd=tmp_path,
                env={**ENV, "FAIL_AT": "0,2,1"})
    code = job.wait_exit(timeout=120)
    text = job.text
    failed_at = float(re.search(r"FAILING ([\d.]+)", text).group(1))
    assert "error: injected failure on rank 1" in text and "RANK 1 EXIT 1" in text, text[-3000:]
    assert "DESTROY" not in text and code != 0, text[-3000:]
    assert time.time() - failed_at < 30  # the default 30-minute timeout never came into play


def test_dist_timeout_must_be_positive(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main_dino.main([*TINY, "--data_path", str(tmp_path), "--dist_timeout_minutes", "0"])
    assert "--dist_timeout_minutes must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("message, collective", [
    ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms for recv operation to complete", True),
    ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500", True),
    ("DataLoader timed out after 60 seconds", False),  # a data-loader stall is not a lost rank
    ("CUDA out of memory", False),
])
def test_only_collective_errors_are_reported_as_collective_failures(monkeypatch, message, collective) -> None:
    monkeypatch.setattr(distributed, "is_dist", lambda: True)
    assert distributed.is_collective_failure(RuntimeError(message)) is collective


def _one_process_group(tmp_path):
    """init_distributed for a gloo group of one process (the environment of a real job is not needed here)."""
    def init(backend=None, timeout_minutes=distributed.DEFAULT_TIMEOUT_MINUTES):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                             world_size=1)
        return distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    return init


def test_process_group_reports_then_aborts_on_an_error_and_destroys_on_success(tmp_path, monkeypatch) -> None:
    """What eval_knn.py, eval_linear.py and training share: the error's line before any teardown, an abort (never the
    coordinated destroy) after an error, a destroy after success."""
    events = []
    monkeypatch.setattr(distributed, "init_distributed", _one_process_group(tmp_path))
    real_abort, real_destroy = distributed.abort, torch.distributed.destroy_process_group
    monkeypatch.setattr(distributed, "abort", lambda: (events.append("abort"), real_abort()))
    monkeypatch.setattr(torch.distributed, "destroy_process_group",
                        lambda *a, **k: (events.append("destroy"), real_destroy(*a, **k)))
    with pytest.raises(ValueError):
        with distributed.process_group(report_error=lambda error: events.append(f"report {error}")):
            raise ValueError("bad input")
    assert events == ["report bad input", "abort"] and not distributed.is_dist()
    events.clear()
    with distributed.process_group(report_error=lambda error: events.append("report")):
        assert distributed.is_dist()
    assert events == ["destroy"] and not distributed.is_dist()


def test_each_restart_attempt_rendezvous_on_its_own_keys(monkeypatch) -> None:
    """torchrun keeps one key store for all restart attempts: a restarted worker must not find the dead workers'
    addresses. Whether the kill loop above hits such a stale key depends on where its kills land, so this checks the
    keys themselves: what attempt 0 wrote is invisible to attempt 1."""
    store = torch.distributed.HashStore()
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda *args, **kwargs: iter([(store, 0, 2)]))
    timeout = distributed.datetime.timedelta(seconds=5)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = distributed._attempt_store(0, 2, timeout)
    first.set("1", "address of a worker that was killed")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = distributed._attempt_store(0, 2, timeout)
    assert first.check(["1"]) and not second.check(["1"])
