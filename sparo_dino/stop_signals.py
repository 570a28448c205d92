"""The signals that mean "stop" for a job, and loader workers that leave them to the main process.

Below both the data loaders and the training loop, so neither has to import the other to agree on them.
"""
from __future__ import annotations

import signal

# SIGTERM: SLURM preemption and scancel; SIGUSR1: SLURM's warning before a time limit; SIGINT: Ctrl-C.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """Data-loader `worker_init_fn`: workers survive the SIGTERM that SLURM sends to every process of the job, and
    the SIGINT that a terminal's Ctrl-C sends to its whole foreground group, so the main process can finish its
    step and save (or, in the evaluation scripts, report what it saved); it shuts the workers down itself."""
    for sig in DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
