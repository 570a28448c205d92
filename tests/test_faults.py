"""Fault injection on CPU: hard kills (also during checkpoint writes), damaged checkpoints, unreadable images, a NaN
loss and a full disk. Each fault must end in a run equal to the clean one, or in one clear error line with the last
good checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time

import pytest
import torch
from conftest import make_image_folder
from test_preemption import clean_run  # noqa: F401 (a fixture)
from test_train import EVERY_STEP, TINY, assert_same_training_state, error_line, executed_steps, load, steps_between

import main_dino
from sparo_dino.io import checkpoint
from sparo_dino.train.loss import DINOLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs main_dino.main with optional faults: SLOW_SAVE_S stretches every checkpoint write over that many seconds
# (printing SAVE_BEGIN/SAVE_END) so a kill can land inside it; SIGTERM_AT="epoch,iteration,rank" makes that rank send
# itself SIGTERM right after the step that ends at (epoch, iteration), HANG_AT="epoch,iteration,rank" makes it stop
# answering there (a hung rank); FULL_DISK_AFTER=N makes every checkpoint write after the first N fail as a full
# disk does. Each process first prints "RANK r PID p ATTEMPT a" (a = torchrun's restart count), for kills by rank.
# Markers go out with one os.write per line: print() under PYTHONUNBUFFERED writes the text and its newline
# separately, so two ranks' markers could share a line ("...ATTEMPT 1RANK 0 ...") and a wait for them would miss one.
WRAPPER = '''
import errno, io, os, signal, sys, time
import torch
import main_dino
from sparo_dino.train import trainer


def say(line):
    os.write(1, (line + "\\n").encode())


say(f"RANK {os.environ.get('RANK', '0')} PID {os.getpid()} ATTEMPT {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")

pause = float(os.environ.get("SLOW_SAVE_S", "0"))
if pause:
    real_save = torch.save

    def slow_save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        say("SAVE_BEGIN")
        chunk = -(-len(data) // 8)
        for start in range(0, len(data), chunk):
            handle.write(data[start:start + chunk])
            handle.flush()
            time.sleep(pause / 8)
        say("SAVE_END")

    torch.save = slow_save

full_after = int(os.environ.get("FULL_DISK_AFTER", "-1"))
if full_after >= 0:
    real_save, saves = torch.save, []

    def disk_fills_up(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) <= full_after:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"\\0" * 4096)
        say(f"DISK FULL {time.time()}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    torch.save = disk_fills_up

for variable, fault in (("SIGTERM_AT", lambda: os.kill(os.getpid(), signal.SIGTERM)),
                        ("HANG_AT", lambda: (say(f"HANGING {time.time()}"), time.sleep(3600)))):
    if os.environ.get(variable):
        def step_then_fault(self, crops, epoch, global_iteration, at=tuple(map(int, os.environ[variable].split(","))),
                            fault=fault, step=trainer.DinoTrainer.train_step):
            metrics = step(self, crops, epoch, global_iteration)
            if (epoch, global_iteration % self.iters_per_epoch + 1, self.info.rank) == at:
                fault()
            return metrics

        trainer.DinoTrainer.train_step = step_then_fault

code = main_dino.main(sys.argv[1:])
sys.stdout.flush()
say(f"RANK {os.environ.get('RANK', '0')} EXIT {code}")
sys.exit(code)
'''


# A test that fails while persistent data-loader workers run, holding their iterator in its traceback, as a
# failure inside a training step does.
FAILS_WITH_WORKERS = '''
from torch.utils.data import DataLoader
from sparo_dino.stop_signals import ignore_stop_signals


def test_fails_while_workers_run():
    loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    next(batches)
    assert False, "failed with the workers running"
'''


def write_wrapper(folder) -> str:
    path = os.path.join(folder, "faulty_main.py")
    with open(path, "w") as handle:
        handle.write(WRAPPER)
    return path


def temporaries(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp." in name]


def test_sigkill_at_random_moments_and_during_writes_then_restart(images, clean_run, tmp_path, spawn, capsys) -> None:
    """kill -9 at seeded random moments, half of them inside a (slowed) checkpoint write; after every kill the
    checkpoint on disk loads, the next start removes the partial file and runs the steps after the checkpoint's
    position, and the finished run equals the clean one."""
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", "--ckpt_every_iters", "2"]
    command = [sys.executable, write_wrapper(tmp_path), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "SLOW_SAVE_S": "0.4"}
    rng = random.Random(0)
    partial_files_left = 0
    for mode in ("during_write", "random", "during_write"):
        job = spawn(command, cwd=tmp_path, env=env)
        if mode == "during_write":
            alive = job.wait_for("SAVE_BEGIN", count=rng.choice([1, 2]))
            time.sleep(rng.uniform(0.02, 0.3))  # the write takes 0.4 s
        else:
            alive = job.wait_for("Epoch [")
            time.sleep(rng.uniform(0.0, 1.5))
        job.process.kill()
        job.wait_exit(timeout=30)
        assert alive, job.text
        if mode == "during_write":
            markers = [line.strip() for line in job.lines if line.startswith("SAVE_")]
            assert markers[-1] == "SAVE_BEGIN", "the kill missed the write"
            partial_files_left += len(temporaries(out)) == 1
        if os.path.exists(os.path.join(out, "checkpoint.pth")):
            checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pth"))  # never a corrupt file
    assert partial_files_left >= 1  # a write really was cut off
    partial_files_left_now = len(temporaries(out))
    saved = load(os.path.join(out, "checkpoint.pth"))
    assert main_dino.main([*argv, *EVERY_STEP]) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and ("removed" in log) == (partial_files_left_now > 0)
    assert executed_steps(log) == steps_between((saved["epoch"], saved["iteration"]), (2, 0))
    assert temporaries(out) == []
    assert_same_training_state(clean_run, out)


def test_truncated_checkpoint_falls_back_to_the_newest_loadable_periodic_one(images, clean_run, tmp_path,
                                                                            recwarn, capsys) -> None:
    """checkpoint.pth and checkpoint0001.pth truncated, checkpoint0000.pth good: resume from the latter, with a
    warning naming both files, run epoch 1 only and finish like the clean run."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(clean_run, "checkpoint0000.pth"), out / "checkpoint0000.pth")
    data = open(os.path.join(clean_run, "checkpoint.pth"), "rb").read()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 3])
    (out / "checkpoint0001.pth").write_bytes(data[: len(data) // 2])
    assert main_dino.main([*TINY, "--data_path", images, "--output_dir", str(out), "--epochs", "2", *EVERY_STEP]) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between((1, 0), (2, 0))
    messages = [str(w.message) for w in recwarn if "falling back" in str(w.message)]
    assert len(messages) == 1
    assert f"checkpoint {out / 'checkpoint.pth'} is corrupt or truncated" in messages[0]
    assert f"falling back to {out / 'checkpoint0000.pth'} (epoch 1, iteration 0)" in messages[0]
    assert_same_training_state(clean_run, str(out))


def test_truncated_checkpoint_without_fallback_is_one_error_line(images, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated zip")
    assert main_dino.main([*TINY, "--data_path", images, "--output_dir", str(out), "--epochs", "1"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "corrupt or truncated" in line and str(out / "checkpoint.pth") in line


def test_skip_bad_images_counts_them_per_epoch(images, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "class_0" / "img_001.png").write_bytes(b"not a png")
    (data / "class_1" / "img_005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = str(tmp_path / "run")
    assert main_dino.main([*TINY, "--data_path", str(data), "--output_dir", out, "--epochs", "2",
                           "--num_workers", "2", "--skip_bad_images", "true"]) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["train_bad_images_skipped"] for r in records] == [2, 2]  # each file once per epoch, 2 workers


def test_nan_between_logs_stops_before_the_periodic_save(images, tmp_path, monkeypatch, capsys) -> None:
    """NaN at global step 5 (epoch 1, iteration 1), no log line until the epoch ends: the periodic save due after
    step 6 checks the unlogged steps first, names them, and leaves the checkpoint of (1, 0) untouched."""
    original = DINOLoss.forward
    calls = []

    def poisoned(self, student_output, teacher_output, epoch):
        output = original(self, student_output, teacher_output, epoch)
        calls.append(epoch)
        return output._replace(loss=output.loss * float("nan")) if len(calls) == 6 else output

    monkeypatch.setattr(DINOLoss, "forward", poisoned)
    out = tmp_path / "run"
    code = main_dino.main([*TINY, "--data_path", images, "--output_dir", str(out), "--epochs", "3",
                           "--ckpt_every_iters", "3", "--print_freq", "100"])
    assert code == 1
    line = error_line(capsys.readouterr().err)
    assert "not finite" in line and "epoch 1, iterations 0-1" in line and "checkpoint.pth is kept" in line
    state = load(out / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch, capsys) -> None:
    """The second save runs out of space halfway through: one error line, the first checkpoint intact, no
    partial file left behind."""
    real_save = torch.save
    saves = []

    def disk_fills_up(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) < 3:  # epoch 0: checkpoint.pth and checkpoint0000.pth
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"\0" * 4096)
        try:  # what torch.save does on a full disk (seen on a full tmpfs): its zip writer fails after the OSError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    out = tmp_path / "run"
    code = main_dino.main([*TINY, "--data_path", images, "--output_dir", str(out), "--epochs", "2"])
    assert code == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: cannot write checkpoint {out / 'checkpoint.pth'}: No space left on device; "
                    "the previous checkpoint is kept")
    assert load(out / "checkpoint.pth")["epoch"] == 1
    assert temporaries(str(out)) == []


@pytest.mark.parametrize("damage", [b"", b"\x89PNG\r\n\x1a\n"], ids=["empty", "header-only"])
def test_unreadable_image_error_names_the_file(tmp_path, capsys, damage: bytes) -> None:
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=4, size=32)
    bad = os.path.join(data, "class_1", "img_002.png")
    open(bad, "wb").write(damage)
    code = main_dino.main([*TINY, "--data_path", data, "--output_dir", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 1 and bad in error_line(capsys.readouterr().err)


def test_a_test_failing_with_data_loader_workers_running_ends_pytest(tmp_path, spawn) -> None:
    """The workers ignore SIGTERM (see stop_signals.ignore_stop_signals), so without conftest's no_leaked_workers
    pytest would print "1 failed" and then hang in multiprocessing's exit handler, which terminates and joins them."""
    (tmp_path / "test_leak.py").write_text(FAILS_WITH_WORKERS)
    tests = os.path.join(REPO, "tests")
    job = spawn([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "test_leak.py"],
                cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, tests])})
    assert job.wait_exit(timeout=60) == 1, job.text
    assert "1 failed" in job.text


def corrupt_image_folder(root, splits=None) -> tuple[str, str]:
    """A small ImageFolder with one file of garbage bytes; returns (root, the bad file)."""
    data = make_image_folder(root, num_classes=2, per_class=8, size=32, splits=splits)
    bad = os.path.join(data, *(["train"] if splits else []), "class_1", "img_002.png")
    with open(bad, "wb") as handle:
        handle.write(b"garbage bytes, not an image")
    return data, bad


def exits_with_one_error_line(spawn, command: list[str], bad: str, timeout: float = 45) -> None:
    """The command, run as its own process, exits with status 1 and one `error:` line naming `bad`, no
    traceback, within `timeout` seconds (a hang fails the test instead of hanging it)."""
    job = spawn([sys.executable, *command], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    started = time.monotonic()
    code = job.wait_exit(timeout=timeout)
    assert code == 1, job.text
    lines = [line for line in job.text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and bad in lines[0] and "Traceback" not in job.text, job.text
    print(f"exited in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("workers,augmentation", [(1, "cpu"), (2, "gpu"), (10, "cpu")])
def test_unreadable_image_with_loader_workers_exits_with_its_line(tmp_path, spawn, workers, augmentation) -> None:
    """The worker's error reaches the main process, which prints its line and exits: the workers, which ignore
    SIGTERM for preemption, must not keep multiprocessing's exit handler waiting for them."""
    data, bad = corrupt_image_folder(tmp_path / "data")
    exits_with_one_error_line(spawn, ["main_dino.py", *TINY, "--epochs", "1", "--data_path", data,
                                      "--output_dir", str(tmp_path / "run"), "--num_workers", str(workers),
                                      "--augmentation", augmentation], bad)


@pytest.mark.parametrize("script", ["eval_knn.py", "eval_linear.py"])
def test_unreadable_image_in_evaluation_workers_is_one_line(tmp_path, spawn, script) -> None:
    data, bad = corrupt_image_folder(tmp_path / "data", splits=("train", "val"))
    exits_with_one_error_line(spawn, [script, "--pretrained_weights", tiny_backbone(tmp_path), "--arch", "vit_tiny",
                                      "--patch_size", "8", "--img_size", "32", "--data_path", data,
                                      "--resize_size", "32", "--crop_size", "32", "--batch_size_per_gpu", "4",
                                      "--num_workers", "2", "--output_dir", str(tmp_path / "out")], bad)


def tiny_backbone(folder) -> str:
    """A plain state dict of a randomly initialised vit_tiny/8 at 32 px."""
    import sparo_vit
    path = os.path.join(folder, "backbone.pth")
    torch.save(sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32).state_dict(), path)
    return path


def test_closing_training_data_after_a_worker_error_ends_its_workers_at_once(tmp_path) -> None:
    """What the exit hook relies on, in-process: the workers (which ignore SIGTERM) are gone right after close(),
    although the failed iterator is still referenced, as a traceback references it."""
    from sparo_dino.cli.train_flags import parse_train_args
    from sparo_dino.data.datasets import BadImageError
    from sparo_dino.data.loader import TrainingData

    data_dir, bad = corrupt_image_folder(tmp_path / "data")
    config = vars(parse_train_args([*TINY, "--data_path", data_dir, "--output_dir", str(tmp_path / "run"),
                                    "--num_workers", "2", "--augmentation", "cpu"]))
    data = TrainingData(config, rank=0, world_size=1, device=torch.device("cpu"))
    data.start_epoch(0, 0)
    with pytest.raises(BadImageError, match=bad):
        for _ in data.loader:
            pass
    failed = data.loader._iterator
    workers = list(failed._workers)
    assert all(worker.is_alive() for worker in workers)
    started = time.monotonic()
    data.close()
    assert not any(worker.is_alive() for worker in workers) and time.monotonic() - started < 10
    data.close()  # a second close (the exit hook after an explicit one) does nothing
