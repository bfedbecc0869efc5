"""Signals that end a run early but cleanly: finish the step, checkpoint, exit as `preempted`.

SIGTERM (scancel, Slurm's time limit), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (submitit sends USR2
before the time limit) all ask the loop to stop after the current step (the command then exits
0, or 130 for Ctrl-C: dgrun.cli). A second Ctrl-C stops at once. Handlers that were installed
before ours (submitit's requeue handler) are called after the checkpoint is written, so a
cluster launcher still requeues the job (Ctrl-C is not forwarded: it is the user's).
"""
from __future__ import annotations

import os
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
        """Hand the received signal to the handler that was there before (e.g. submitit's).

        Called after the checkpoint is written, while the job's callable still runs. In a
        submitit Slurm job, submitit's USR2 handler requeues the job and exits (SystemExit)
        right here. Any other signal there (SIGTERM from `scontrol requeue`, a preemption, a
        time limit or `scancel`; submitit only logs it) must not end the job with a result:
        submitit would record the unfinished run as a success, and Hydra's launcher would stop
        waiting for a job that Slurm may be about to run again. So the job exits with
        128 + signal number and no result: a requeued job is awaited and resumes, a cancelled
        one is reported as not completed.
        """
        handler = self._previous.get(self.received) if self.received is not None else None
        # Ctrl-C is the user's, not a launcher's: the command reports it itself (exit 130).
        if callable(handler) and self.received != signal.SIGINT:
            handler(self.received, None)
        if self.received is not None and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            raise SystemExit(128 + int(self.received))
