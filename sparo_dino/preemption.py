"""Stop requests that end training at a step boundary with a checkpoint, instead of losing the epoch.

A request comes from SIGTERM/SIGUSR1 (what SLURM sends before a kill, outside submitit) or from submitit's
`checkpoint()` callback. Only the ranks that got the signal know about it, so the trainer asks all ranks at each
poll (`agreed_to_stop`) and they all stop after the same step. The process then exits with REQUEUE_EXIT_CODE, which
tells a launcher "resume me" rather than "failed" or "done".
"""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator

import torch

from sparo_dino import distributed

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: the run is incomplete but healthy; run the same command again to resume
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A thread-safe flag, set by signal handlers or a launcher, read by the training loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def install_signal_handlers(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> dict:
        """Turn the given signals into stop requests; only possible from the main thread.

        Returns the previous handlers, so a caller can put them back (see `stop_on_signals`)."""
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request(f"received {signal.Signals(signum).name}")
        return {sig: signal.signal(sig, handler) for sig in signals}

    def agreed_to_stop(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on all ranks).

        A single process reads its own flag: no device tensor, so no host sync per step."""
        if distributed.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        distributed.all_reduce_sum_(flag)
        stop = bool(flag.item() > 0)
        if stop and not self.requested:
            self.request("another rank was asked to stop")
        return stop


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> Iterator[StopRequest | None]:
    """A StopRequest fed by SIGTERM/SIGUSR1 while the block runs, then the previous handlers again.

    Yields None outside the main thread (Python only delivers signals there): whoever runs training in a worker
    thread, like the submitit launcher, owns the signals and passes its own StopRequest instead.
    """
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


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader `worker_init_fn`: workers survive the SIGTERM that SLURM sends to every process of the job,
    so the main process can finish its step and save; it shuts the workers down itself afterwards."""
    for sig in DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
