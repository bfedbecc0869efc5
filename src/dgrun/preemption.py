"""Signals that end a run early but cleanly: finish the step, checkpoint, exit as `preempted`.

SIGTERM (scancel, Slurm's time limit), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (submitit sends USR2
before the time limit) all ask the loop to stop after the current step. A second Ctrl-C stops at
once. Handlers that were installed before ours (submitit's requeue handler) are called after the
checkpoint is written, so a cluster launcher still requeues the job.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                if hasattr(signal, name))


class PreemptionGuard:
    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.received = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def forward(self) -> None:
        """Hand the received signal to the handler that was there before (e.g. submitit's)."""
        handler = self._previous.get(self.received) if self.received is not None else None
        if callable(handler) and handler not in (signal.default_int_handler,):
            handler(self.received, None)
