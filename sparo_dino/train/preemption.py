"""Stop requests that end training at a step boundary with a checkpoint, instead of losing the epoch.

A request comes from SIGTERM/SIGUSR1 (what SLURM sends before a kill, outside submitit), from a first Ctrl-C
(SIGINT; a second one exits at once), or from submitit's `checkpoint()` callback. Only the ranks that got the signal
know about it, so the trainer asks all ranks at each step boundary (`StopPoll`) and they all stop after the same
step. The process then exits with REQUEUE_EXIT_CODE, which tells a launcher "resume me" rather than "failed" or
"done", or after Ctrl-C with INTERRUPT_EXIT_CODE, what a shell reports for a command the user interrupted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sparo_dino import distributed
from sparo_dino.stop_signals import DEFAULT_SIGNALS

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: the run is incomplete but healthy; run the same command again to resume
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT  # 130, a shell's status for Ctrl-C; the run is saved as for a requeue


class StopRequest:
    """A thread-safe flag, set by signal handlers or a launcher, read by the training loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.signal: signal.Signals | None = None  # the signal behind the first request, if one was

    def request(self, reason: str, signum: signal.Signals | None = None) -> None:
        if not self.requested:
            self.reason, self.signal = reason, signum
        self._event.set()

    @property
    def exit_code(self) -> int:
        """What a process stopped by this request exits with: 130 after Ctrl-C, else 75 (resume me)."""
        return INTERRUPT_EXIT_CODE if self.signal == signal.SIGINT else REQUEUE_EXIT_CODE

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install_signal_handlers(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> dict:
        """Turn the given signals into stop requests; only possible from the main thread.

        A second SIGINT ends the process at once (status 130) without saving: the user pressed Ctrl-C twice because
        the step boundary is too far away. The lines go to stderr with os.write, which, unlike print, is safe
        inside a handler that may interrupt a print of the main thread.
        Returns the previous handlers, so a caller can put them back (see `stop_on_signals`)."""
        interrupts = 0

        def handler(signum: int, frame: FrameType | None) -> None:
            nonlocal interrupts
            if signum == signal.SIGINT:
                interrupts += 1
                if interrupts > 1:
                    os.write(2, b"second Ctrl-C: exiting now without saving; the last checkpoint is kept\n")
                    os._exit(INTERRUPT_EXIT_CODE)
                if distributed.is_main_process():
                    os.write(2, b"Ctrl-C: saving at the next step boundary, then exiting (press Ctrl-C again to "
                                b"exit at once without saving)\n")
            self.request(f"received {signal.Signals(signum).name}", signal.Signals(signum))
        return {sig: signal.signal(sig, handler) for sig in signals}

    def agreed_to_stop(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on all ranks).

        A single process reads its own flag: no device tensor, so no host sync per step."""
        if distributed.get_world_size() == 1:
            return self.requested
        flag = torch.full((1,), float(self.requested), device=device)  # a fill, not a blocking host-to-device copy
        distributed.all_reduce_sum_(flag)
        return self.note_agreement(bool(flag.item() > 0))

    def note_agreement(self, any_rank: bool) -> bool:
        """Pass through whether any rank asked to stop; when one did and this rank was not asked itself, record
        that another rank asked, so this rank's announcement can say why."""
        if any_rank and not self.requested:
            self.request("another rank was asked to stop")
        return any_rank


class StopPoll:
    """Asks all ranks at each step boundary whether any was asked to stop, so they all save the same position.

    On GPUs (`asynchronous`) the poll is read one boundary after it was launched: a request during step k stops every
    rank after step k + 1 (docs/architecture.md, design notes). `reset` loses nothing: requests are never withdrawn."""

    def __init__(self, stop: StopRequest | None, device: torch.device, asynchronous: bool | None = None) -> None:
        self.stop = stop
        self.device = device
        self.asynchronous = device.type == "cuda" if asynchronous is None else asynchronous
        self._pending: Callable[[], bool] | None = None

    def poll(self) -> bool:
        """Whether every rank stops at this step boundary (call it at every boundary on every rank)."""
        if self.stop is None:
            return False
        if distributed.get_world_size() == 1:
            return self.stop.requested
        if not self.asynchronous:
            return self.stop.agreed_to_stop(self.device)
        previous = self._pending() if self._pending is not None else False
        self._pending = self._launch()
        return self.stop.note_agreement(previous)

    def reset(self) -> None:
        """Finish and drop the poll in flight (before a synchronous agreement or the end of an epoch)."""
        if self._pending is not None:
            self._pending()
            self._pending = None

    def _launch(self) -> Callable[[], bool]:
        assert self.stop is not None
        flag = torch.full((1,), float(self.stop.requested), device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.SUM, async_op=True)
        if self.device.type != "cuda":
            def reduced() -> bool:
                work.wait()
                return bool(flag.item() > 0)
            return reduced
        work.wait()  # makes the current stream wait for the reduction; the host does not block
        host = torch.empty(1, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def copied_to_host() -> bool:
            copied.synchronize()  # the device reached the boundary that launched this poll
            return bool(host.item() > 0)
        return copied_to_host


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> Iterator[StopRequest | None]:
    """A StopRequest fed by SIGTERM/SIGUSR1/SIGINT while the block runs, then the previous handlers again.

    Yields None outside the main thread (Python only delivers signals there): whoever runs training in a worker
    thread, like the submitit launcher, owns the signals and passes its own StopRequest instead."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop = StopRequest()
    previous = stop.install_signal_handlers(signals)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
