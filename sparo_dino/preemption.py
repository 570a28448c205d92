"""Stop requests that end training at a step boundary with a checkpoint, instead of losing the epoch.

A request comes from SIGTERM/SIGUSR1 (what SLURM sends before a kill, outside submitit) or from submitit's
`checkpoint()` callback. Only the ranks that got the signal know about it, so the trainer asks all ranks at each
poll (`agreed_to_stop`) and they all stop after the same step. The process then exits with REQUEUE_EXIT_CODE, which
tells a launcher "resume me" rather than "failed" or "done".
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

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

    def install_signal_handlers(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        """Turn the given signals into stop requests; only possible from the main thread."""
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request(f"received {signal.Signals(signum).name}")
        for sig in signals:
            signal.signal(sig, handler)

    def agreed_to_stop(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        distributed.all_reduce_sum_(flag)
        stop = bool(flag.item() > 0)
        if stop and not self.requested:
            self.request("another rank was asked to stop")
        return stop
