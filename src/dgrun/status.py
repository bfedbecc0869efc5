"""The vocabulary of run states, shared by the loop, the resume decision and the report.

    running     training, or killed while training (SIGKILL, a crash of the machine)
    preempted   a signal stopped it cleanly after a checkpoint; re-running resumes it
    failed      an exception ended it; re-running resumes from its last checkpoint
    completed   its own rule ended it: the interpolation threshold, or its step/epoch budget
    stopped     cut short by a limit: the wall-clock budget, or a stall (no progress)
    diverged    the loss became NaN or infinite; re-running never trains it again
"""
from __future__ import annotations

RUNNING, PREEMPTED, FAILED = "running", "preempted", "failed"
COMPLETED, STOPPED, DIVERGED = "completed", "stopped", "diverged"
STATUSES = (RUNNING, COMPLETED, STOPPED, DIVERGED, PREEMPTED, FAILED)

# Ended by a rule: re-running does nothing unless that rule's setting changed (a bigger budget,
# stop_at_interpolation=false, ...). A diverged run never continues.
ENDED = (COMPLETED, STOPPED, DIVERGED)
# Interrupted: re-running continues from the last checkpoint.
INTERRUPTED = (RUNNING, PREEMPTED, FAILED)
# Final numbers that mean what they say (a report's finals and corruption figures use these).
HAS_FINAL_NUMBERS = (COMPLETED, STOPPED)
