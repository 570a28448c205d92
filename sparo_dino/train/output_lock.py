"""One run per output dir: the main process holds a lock on OUTPUT_DIR/run.lock for the run's life.

Two runs writing the same checkpoint.pth and log.txt corrupt each other's resume silently, so a second start into a
busy folder stops with one line naming the holder (host, PID, start time, SLURM job). The lock is a POSIX record
lock (fcntl.lockf) on the open file: the OS releases it when the process ends, however it ends, so a requeued or
restarted run starts normally after a crash. Unlike flock, a record lock is not inherited by forked children, so
data-loader workers that outlive a killed main process for a few seconds do not keep the folder busy; it is also
the lock that NFS forwards to the server (docs/training.md, "One run per output dir", says what network file
systems do with it). The file is removed when the run ends; one left by a crash holds no lock and is taken over.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Iterator

from sparo_dino import distributed

LOCK_NAME = "run.lock"
# errno of a lock that another process holds, and of a file system that cannot lock at all
_BUSY = (errno.EACCES, errno.EAGAIN)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_HELD: set[str] = set()  # folders this process locked: record locks never conflict within one process


class OutputDirBusy(RuntimeError):
    """Another run holds the output dir, or its lock file cannot be opened; the message is one line."""


def _holder(path: str) -> str:
    """Who holds the lock at `path`, as its file says (the holder writes it just after locking)."""
    try:
        with open(path) as handle:
            record = json.load(handle)
        job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
        return f"{record['host']} PID {record['pid']}, started {record['started']}{job}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _busy(output_dir: str, holder: str) -> OutputDirBusy:
    return OutputDirBusy(f"{output_dir} is in use by another run ({holder}); wait for it to end or use another "
                         f"--output_dir (a lock left by a dead node: see docs/training.md, One run per output dir)")


class OutputLock:
    """The lock on one output dir, taken by `acquire` (None where the file system cannot lock) and `release`d."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: str) -> OutputLock | None:
        """Lock `output_dir` (created if missing) for this process; OutputDirBusy when another run holds it. On a
        file system without locks (some NFS mounts, Lustre with noflock) one warning line and None."""
        path = os.path.join(output_dir, LOCK_NAME)
        key = os.path.realpath(output_dir)
        if key in _HELD:
            raise _busy(output_dir, f"this process, PID {os.getpid()}")
        try:
            os.makedirs(output_dir, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    os.close(fd)
                    if error.errno in _BUSY:
                        raise _busy(output_dir, _holder(path)) from error
                    if error.errno in _UNSUPPORTED:
                        print(f"warning: cannot lock {path} ({error.strerror}): this file system does not lock "
                              "files, so a second run started into this folder would not be detected", flush=True)
                        return None
                    raise
                if _same_file(fd, path):  # not removed by a holder that ended between our open and our lock
                    break
                os.close(fd)
        except OSError as error:
            raise OutputDirBusy(f"cannot lock {path}: {error.strerror or error}") from error
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        _HELD.add(key)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file, then unlock it: a run that opened it before the removal finds it still locked and
        says so; one that opens it after creates and locks a new file."""
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                os.remove(self.path)
        os.close(self.fd)  # closing releases the lock
        _HELD.discard(os.path.realpath(os.path.dirname(self.path)))


def _same_file(fd: int, path: str) -> bool:
    try:
        opened, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


@contextlib.contextmanager
def locked_output_dir(output_dir: str) -> Iterator[None]:
    """Hold `output_dir` for the block: the main process locks it, and every rank raises the main process's
    OutputDirBusy, so no rank waits in a collective for a peer that stopped (a collective: call it on all ranks)."""
    lock, problem = None, None
    if distributed.is_main_process():
        try:
            lock = OutputLock.acquire(output_dir)
        except OutputDirBusy as error:
            problem = str(error)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise OutputDirBusy(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
