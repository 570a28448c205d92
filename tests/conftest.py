"""Shared fixtures: small generated image datasets, so tests need no downloads, and child processes (data-loader
workers, subprocesses) that end with the test that started them, even when it fails."""
from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

_PALETTE = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (200, 40, 200), (40, 210, 210)]


def make_image_folder(root: str | os.PathLike, num_classes: int = 3, per_class: int = 8, size: int = 32,
                      splits: Sequence[str] | None = None, seed: int = 0) -> str:
    """Write an ImageFolder whose classes are easy to tell apart (own colour and stripe direction, plus noise).

    With `splits`, each split gets its own subfolder (`root/train/<class>/...`), the layout evaluation expects.
    Returns the root path.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in (splits or [None]):
        base = root / split if split else root
        for label in range(num_classes):
            folder = base / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(_PALETTE[label % len(_PALETTE)], dtype=np.float32)
            for index in range(per_class):
                yy, xx = np.mgrid[0:size, 0:size]
                phase = rng.uniform(0, 2 * np.pi)
                coord = xx if label % 2 == 0 else yy
                stripes = 0.5 + 0.5 * np.sin(coord * (0.5 + 0.25 * (label // 2)) + phase)
                image = colour[None, None, :] * (0.55 + 0.45 * stripes[..., None])
                image += rng.normal(0, 12, size=image.shape)
                pixels = np.clip(image, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{index:03d}.png")
    return str(root)


@pytest.fixture
def image_folder(tmp_path: Path) -> str:
    """A 3-class ImageFolder of 32 px images with train/ and val/ splits."""
    return make_image_folder(tmp_path / "data", splits=("train", "val"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes 2 threads several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def free_module_temporaries(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                            ) -> Iterator[None]:
    """Remove what a module's shared fixtures wrote (vit_tiny checkpoints: 168 MB apiece) once its tests passed:
    CI machines may have a few GB of disk, and pytest keeps tmp_path_factory folders to the end of the session.
    Folders of a module with a failure stay for reading. (tmp_path folders: tmp_path_retention_policy.)"""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A 2-class ImageFolder of 16 small images, shared by the training tests of a module."""
    return make_image_folder(tmp_path_factory.mktemp("images"), num_classes=2, per_class=8, size=32)


@pytest.fixture(autouse=True)
def no_leaked_workers() -> Iterator[None]:
    """Shut down data-loader workers that outlive their test.

    A test that fails inside a training step leaves the trainer, and so its persistent workers, referenced by the
    traceback pytest keeps. The workers ignore SIGTERM (they must survive SLURM's signal, see
    stop_signals.ignore_stop_signals), so multiprocessing's exit handler, which terminates and then joins them,
    would hang the whole pytest process after it printed its summary."""
    yield
    if not multiprocessing.active_children():
        return
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for obj in gc.get_objects():
        if type(obj) is _MultiProcessingDataLoaderIter:  # type(): isinstance would touch lazy deprecated objects
            obj._shutdown_workers()  # what the iterator's __del__ does: workers exit cleanly, no SIGCHLD error
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


class OutputLines:
    """A child process's output, read line by line in a thread, so a test waits for a marker with a deadline: a
    child that hangs fails the test instead of hanging it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, count: int = 1, timeout: float = 60) -> bool:
        """True once `marker` was seen `count` times; False when the process ended first; AssertionError (with
        the output so far) when the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout} s; output so far:\n{self.text}") from None
            if line is None:
                return False
            count -= line.count(marker)  # two processes' writes may share a line
            if count <= 0:
                return True

    def wait_exit(self, timeout: float = 120) -> int:
        """The exit status, once the process ended and its output was read to the end."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; output so far:\n{self.text}") from None
        while self._queue.get(timeout=timeout) is not None:
            pass
        return code


@pytest.fixture
def spawn() -> Iterator[Callable[..., OutputLines]]:
    """Start a command in its own process group with stdout and stderr merged; whatever is still running when the
    test ends, passed or failed, is killed with its whole group (e.g. its data-loader workers)."""
    started: list[subprocess.Popen] = []

    def start(command: Sequence[str], **popen_kwargs) -> OutputLines:
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, **popen_kwargs)
        started.append(process)
        return OutputLines(process)

    yield start
    for process in started:
        try:  # the group, not only the process: workers can outlive a leader that already exited
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
