"""How an evaluation script ends on SIGTERM (scancel, a SLURM preemption) or Ctrl-C: one line saying what it saved
and how to go on, and the status a shell gives a command ended by that signal (143, 130), instead of a silent death
or a traceback.

The signal raises Interrupted in the main thread, as Ctrl-C raises KeyboardInterrupt: an evaluation has no step
boundary to wait for, and what it keeps (a linear probe's per-epoch checkpoint, dumped features) is written
atomically or at its end. Only while the main process receives a batch from its data-loader workers (`guarded`)
the exception waits until the batch is in: cut there, the handshake that passes the batch's shared memory breaks
and the worker prints a traceback. The workers ignore both signals, so a signal sent to the whole job reaches only
the main process, which ends them itself. Training handles the same signals differently: it saves at the next step
(sparo_dino/train/preemption.py).
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the running evaluation has written that a rerun reuses: key -> a description (None: nothing yet), read when a
# signal ends it.
_SAVED: dict[str, Callable[[], str | None]] = {}


class Interrupted(BaseException):
    """A signal ended the evaluation (a BaseException like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signal.Signals(signum)


def note_saved(key: str, describe: Callable[[], str | None]) -> None:
    """Record something the evaluation keeps for a rerun (e.g. dumped features): `describe()` says what and where,
    or None while nothing is written yet; a later note of the same key replaces it."""
    _SAVED[key] = describe


_receiving = False  # the main thread is inside `guarded`'s next(): a signal waits for the batch
_pending: signal.Signals | None = None


def _raise(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _receiving:
        _pending = _pending or signal.Signals(signum)
        return
    raise Interrupted(signum)


def guarded(batches: Iterable[T]) -> Iterator[T]:
    """The batches of a data loader, with a signal that arrives while one is being received (or the workers are
    started) raised once it is in. Harmless without `interruptible` (training's k-NN monitor goes through it too)."""
    iterator = _received(lambda: iter(batches))
    while True:
        try:
            batch = _received(lambda: next(iterator))
        except StopIteration:
            return
        yield batch


def _received(get: Callable[[], T]) -> T:
    global _receiving
    _receiving = True
    try:
        return get()
    finally:
        _receiving = False
        if _pending is not None:
            raise Interrupted(_pending)  # also instead of the StopIteration of the last batch: it must not be lost


def end_workers_of(error: BaseException) -> None:
    """Let the data-loader iterators that `error`'s traceback still references shut their workers down now.

    The workers ignore SIGTERM, so multiprocessing's exit handler, which terminates them and then waits, would
    wait until they noticed on their own; dropping the frames' locals runs the iterators' own shutdown."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()


def interrupted_line(stop: Interrupted) -> str:
    saved = [line for line in (describe() for describe in _SAVED.values()) if line]
    if not saved:
        return f"stopped by {stop.signal.name}: nothing was saved; run the same command again to start over"
    return (f"stopped by {stop.signal.name}: saved {'; '.join(saved)}; run the same command again to continue from "
            "there")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT end the process: the line of `interrupted_line` on stderr (from rank 0
    of a distributed run), the loader workers ended, exit status 128 + the signal's number. Outside the main thread,
    where Python delivers no signal, the block runs unchanged."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SAVED.clear()
    _pending = None
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    except Interrupted as stop:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the report
        end_workers_of(stop)
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_line(stop), file=sys.stderr, flush=True)
        sys.exit(128 + stop.signal)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
