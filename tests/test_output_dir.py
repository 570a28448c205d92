"""An output folder that cannot receive files (a file in its place or above it, a folder this user may not write
to) ends every script that writes output with one line at start-up: before any process group, weights, data or
feature extraction, which today can run for minutes before the first write fails with a traceback. So does a
training output folder that another run holds."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

import pytest
import torch
from conftest import make_image_folder
from test_train import TINY

import eval_knn
import eval_linear
import main_dino
import plot_logs
import sparo_vit
import visualize_attention
import visualize_slots
from sparo_dino import distributed
from sparo_dino.cli import eval_flags
from sparo_dino.cli.errors import OutputDirError, one_line, require_writable_dirs
from sparo_dino.train import output_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVAL_IMAGES = ["--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--resize_size", "32",
               "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "4"]


@pytest.fixture
def blocker(tmp_path) -> str:
    """A plain file where a folder is wanted: it stops root too, unlike permissions."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


@pytest.fixture
def weights(tmp_path) -> str:
    path = tmp_path / "weights" / "backbone.pth"
    path.parent.mkdir()
    torch.save(sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32).state_dict(), path)
    return str(path)


@pytest.fixture
def nothing_starts(monkeypatch) -> None:
    """Fail loudly if a script gets as far as a process group, weights or images before checking its output."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(distributed, "init_distributed", started)
    monkeypatch.setattr("sparo_dino.io.weights.load_backbone", started)
    monkeypatch.setattr(visualize_attention, "load_named_backbone", started)
    monkeypatch.setattr(plot_logs, "read_log", started)


def cli_error(main, argv: list[str]) -> str:
    """The one line a run_cli entry point exits with."""
    with pytest.raises(SystemExit) as ended:
        eval_flags.run_cli(lambda: main(argv))
    message = str(ended.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_writable_or_creatable_folder_passes_and_nothing_is_created(tmp_path) -> None:
    require_writable_dirs({"--output_dir": str(tmp_path), "--dump_features": str(tmp_path / "new" / "run_%j"),
                           "--unused": None})
    assert os.listdir(tmp_path) == []  # a launcher checks on the submission host: no folder appears


def test_a_file_in_the_way_is_named(blocker) -> None:
    with pytest.raises(OutputDirError) as error:
        require_writable_dirs({"--output_dir": blocker})
    assert str(error.value) == f"--output_dir {blocker} is a file, not a folder; choose another --output_dir"
    below = os.path.join(blocker, "run", "sub")
    with pytest.raises(OutputDirError) as error:
        require_writable_dirs({"--dump_features": below})
    assert str(error.value) == (f"--dump_features {below} cannot be created: {blocker} is a file, not a folder; "
                                "choose another --dump_features")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0o500 folder anyway, so there is nothing to refuse; "
                                              "the file-in-the-way tests cover root")
def test_a_read_only_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o500)
    try:
        for path, start in ((folder, f"--output_dir {folder} is"),
                            (folder / "new", f"--output_dir {folder / 'new'} cannot be created: {folder} is")):
            with pytest.raises(OutputDirError, match="not writable by this user") as error:
                require_writable_dirs({"--output_dir": str(path)})
            assert str(error.value).startswith(start)
    finally:
        folder.chmod(0o700)


def test_one_line_keeps_the_last_line_of_a_workers_traceback() -> None:
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: bad thing in /data/x.png\n")
    assert one_line(wrapped) == "bad thing in /data/x.png"
    assert one_line(RuntimeError("")) == "RuntimeError"


def test_main_dino_stops_in_flag_validation(images, blocker, nothing_starts, capsys) -> None:
    with pytest.raises(SystemExit) as ended:
        main_dino.main([*TINY, "--epochs", "1", "--data_path", images, "--output_dir", os.path.join(blocker, "run")])
    assert ended.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"main_dino.py: error: --output_dir {blocker}/run cannot be created: {blocker} is a file, "
                      "not a folder; choose another --output_dir"]


@pytest.mark.parametrize("flag", ["--output_dir", "--dump_features"])
def test_eval_knn_checks_before_extraction(image_folder, weights, blocker, nothing_starts, flag) -> None:
    line = cli_error(eval_knn.main, ["--pretrained_weights", weights, "--data_path", image_folder, *EVAL_IMAGES,
                                     flag, blocker])
    assert line == f"error: {flag} {blocker} is a file, not a folder; choose another {flag}"


def test_eval_knn_checks_the_default_output_folder_too(image_folder, blocker, nothing_starts) -> None:
    """No --output_dir: results go next to the checkpoint; a checkpoint 'folder' that is a file is refused first."""
    line = cli_error(eval_knn.main, ["--pretrained_weights", os.path.join(blocker, "checkpoint.pth"),
                                     "--data_path", image_folder, *EVAL_IMAGES])
    assert line.startswith(f"error: --output_dir {blocker} is a file")


@pytest.mark.parametrize("mode", [[], ["--fast"]])
def test_eval_linear_checks_before_extraction_or_training(image_folder, weights, blocker, nothing_starts, mode) -> None:
    line = cli_error(eval_linear.main, ["--pretrained_weights", weights, "--data_path", image_folder, *EVAL_IMAGES,
                                        *mode, "--epochs", "1", "--output_dir", os.path.join(blocker, "probe")])
    assert line == (f"error: --output_dir {blocker}/probe cannot be created: {blocker} is a file, not a folder; "
                    "choose another --output_dir")


def test_visualize_slots_checks_before_loading(weights, blocker, nothing_starts, tmp_path) -> None:
    image = make_image_folder(tmp_path / "pictures", num_classes=1, per_class=1)
    line = cli_error(visualize_slots.main, ["--pretrained_weights", weights, "--images", image,
                                            "--output_dir", blocker])
    assert line == f"error: --output_dir {blocker} is a file, not a folder; choose another --output_dir"


def test_visualize_attention_checks_before_loading(weights, blocker, nothing_starts, tmp_path) -> None:
    image = os.path.join(make_image_folder(tmp_path / "pictures", num_classes=1, per_class=1), "class_0",
                         "img_000.png")
    line = cli_error(visualize_attention.main, ["--pretrained_weights", weights, "--image_path", image,
                                                "--output_dir", blocker])
    assert line == f"error: --output_dir {blocker} is a file, not a folder; choose another --output_dir"


def test_plot_logs_checks_where_its_png_goes_before_reading_logs(tmp_path, blocker, nothing_starts) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for target, expected in ((os.path.join(blocker, "curves.png"),
                              f"error: --output folder {blocker} is a file, not a folder; choose another --output "
                              "folder"),
                             (str(tmp_path), f"error: --output {tmp_path} is a folder; name the PNG file to write")):
        with pytest.raises(SystemExit) as ended:
            plot_logs.main([str(run), "--output", target])
        assert str(ended.value.code) == expected


def test_plot_logs_creates_the_folder_of_its_png(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0}) + "\n")
    path = plot_logs.main([str(run), "--output", str(tmp_path / "plots" / "curves.png")])
    assert os.path.isfile(path)


# Holds the lock of the output dir given as argument, as a running main_dino.py does, with a forked child that
# inherits the open lock file (as data-loader workers do), until it is killed.
HOLDER = '''
import os, sys, time
from sparo_dino.train.output_lock import OutputLock

OutputLock.acquire(sys.argv[1])
if os.fork() == 0:
    time.sleep(300)
    os._exit(0)
print("locked", flush=True)
time.sleep(300)
'''


def test_a_second_run_into_a_busy_output_dir_stops_naming_the_holder(images, tmp_path, spawn, capsys) -> None:
    """While another process holds the folder, main_dino.py stops with one line naming its host and PID and writes
    nothing; once the holder dies (kill -9: no clean-up), the OS has released the lock, also while a forked child
    of the holder lives on, and the same command runs, then leaves no lock file behind (before: both runs trained
    into the same checkpoint.pth and log.txt)."""
    out = str(tmp_path / "run")
    holder = spawn([sys.executable, "-c", HOLDER, out], cwd=tmp_path,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert holder.wait_for("locked"), holder.text
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "1"]
    assert main_dino.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is in use by another run ({socket.gethostname()} PID "
                          f"{holder.process.pid}, started "), err
    assert err.count("\n") == 1 and "--output_dir" in err
    assert os.listdir(out) == [output_lock.LOCK_NAME]

    os.kill(holder.process.pid, signal.SIGKILL)
    holder.process.wait(timeout=30)
    assert main_dino.main(argv) == 0
    assert "checkpoint.pth" in os.listdir(out) and output_lock.LOCK_NAME not in os.listdir(out)


def test_a_lock_is_held_once_per_process_and_rank_1_gets_rank_0s_answer(tmp_path, monkeypatch) -> None:
    """Record locks never conflict inside one process, so the process also remembers what it holds. Under DDP only
    rank 0 locks; the others take its answer from the broadcast, so they raise the same line instead of waiting in
    a collective for a rank 0 that stopped, and touch no file."""
    out = str(tmp_path / "run")
    with output_lock.locked_output_dir(out):
        with pytest.raises(output_lock.OutputDirBusy, match=rf"another run \(this process, PID {os.getpid()}\)"):
            output_lock.OutputLock.acquire(out)
    assert os.listdir(out) == []
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed, "broadcast_object", lambda mine: "run is in use by another run (x)")
    with pytest.raises(output_lock.OutputDirBusy, match=r"^run is in use by another run \(x\)$"):
        with output_lock.locked_output_dir(str(tmp_path / "other")):
            pass
    assert not os.path.exists(tmp_path / "other")
