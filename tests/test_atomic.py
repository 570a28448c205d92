"""Files replaced whole (sparo_dino/io/atomic.py): the old file or the new one, never half; a killed writer's
temporary recognised and removed; nothing else in the folder touched."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from sparo_dino.io import atomic


def test_a_clean_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path) -> None:
    path = tmp_path / "sub" / "results.json"  # the folder is created
    with atomic.replaced(path) as handle:
        handle.write("first")
    with atomic.replaced(path) as handle:
        handle.write("second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["results.json"]


def test_a_failure_midway_keeps_the_old_file_and_removes_the_temporary(tmp_path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        with atomic.replaced(path, "wb") as handle:
            handle.write(b"new, half")
            assert os.path.exists(atomic.temporary_path(path))  # written beside the target, not over it
            raise OSError("No space left on device")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_a_durable_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda descriptor: synced.append(descriptor) or real_fsync(descriptor))
    with atomic.replaced(tmp_path / "checkpoint.pth", "wb") as handle:
        handle.write(b"x")
    assert synced == []  # the default is a rename only
    with atomic.replaced(tmp_path / "checkpoint.pth", "wb", durable=True) as handle:
        handle.write(b"y")
    assert len(synced) == 2  # the file before the rename, the folder after it


def test_appending_is_refused() -> None:
    with pytest.raises(ValueError, match="mode 'w' or 'wb', not 'a'"):
        with atomic.replaced("anything", "a"):
            pass


def _killed_while_writing(path: str) -> None:
    with atomic.replaced(path) as handle:
        handle.write("half")
        handle.flush()
        os._exit(9)  # no cleanup runs, as under SIGKILL


def test_a_killed_writers_temporary_is_found_and_removed_at_the_next_start(tmp_path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("whole\n")
    writer = multiprocessing.get_context("spawn").Process(target=_killed_while_writing, args=(str(path),))
    writer.start()
    writer.join()
    assert writer.exitcode == 9 and path.read_text() == "whole\n"
    leftover = f".log.txt.tmp.{writer.pid}"
    assert sorted(os.listdir(tmp_path)) == [leftover, "log.txt"]
    mine = tmp_path / f".other.json.tmp.{os.getpid()}"  # this process's own temporary is in use: kept
    mine.write_text("{")
    (tmp_path / "notes.tmp.txt").write_text("a user's file")  # not a temporary's name: kept
    assert atomic.remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / leftover)]
    assert sorted(os.listdir(tmp_path)) == [mine.name, "log.txt", "notes.tmp.txt"]
    assert atomic.remove_stale_temporaries(str(tmp_path / "missing")) == []
