"""What to do with a run directory, decided from the directory alone, before any data is read.

    fresh      nothing usable here: train from step 0 (removing an earlier record first when
               `trainer.resume=false`, or when a record has no checkpoint to resume from)
    resume     an interrupted run (running, preempted, failed): continue from its checkpoint
    continue   an ended run whose rule no longer holds under this command (a bigger budget,
               `stop_at_interpolation=false`, a looser stall rule): continue from its checkpoint
    finished   an ended run with nothing more to do: touch nothing (but re-make a derived file
               a kill took away; dgrun.run), return its summary

A checkpoint written with another config is refused (UserError naming the keys), and the
directory is left exactly as it was.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from dgrun import checkpoint
from dgrun.config import TrainerConfig
from dgrun.errors import UserError
from dgrun.files import read_json
from dgrun.rundir import RunDir
from dgrun.status import DIVERGED, ENDED
from dgrun.stopping import stalled

log = logging.getLogger("dgrun")

# Keys a resumed run may change: the budget and how the run is watched, not what it computes.
RESUMABLE_KEYS = {
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time_s", "trainer.checkpoint_every",
    "trainer.snapshots", "trainer.progress", "trainer.log_every_s", "trainer.resume",
    "trainer.stop_at_interpolation", "trainer.eval_batch_size", "trainer.stall_patience",
    "trainer.stall_min_delta", "trainer.min_lr", "device", "threads", "quiet",
    "logger",  # the trackers a run reports to (the whole subtree)
    # Always 1 in a run's own config (an ensemble member's included); listed so checkpoints
    # written before the key existed still resume.
    "trainer.ensemble",
}
# Keys added after runs were recorded whose null is what those runs did: a checkpoint written
# without them resumes under a config that has them null.
NULL_WHEN_UNSET = {"dataset.subset_fraction", "dataset.subset_seed"}


@dataclass
class Decision:
    action: str                       # fresh | resume | continue | finished
    payload: Optional[dict] = None    # the checkpoint to continue from
    summary: Optional[dict] = None    # the run's summary.json as it stands
    clear: bool = False               # remove an earlier record before starting
    why: str = ""

    @property
    def finished(self) -> bool:
        return self.action == "finished"


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        if full in RESUMABLE_KEYS:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if full in NULL_WHEN_UNSET and {a, b} <= {"<unset>", None}:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, full + ".")
        elif a != b:
            out.append(f"{full}: {a} -> {b}")
    return out


def decide(record: RunDir, config: dict, trainer: TrainerConfig) -> Decision:
    summary = _read_summary(record)
    if not trainer.resume:
        return Decision("fresh", summary=summary, clear=record.has_record(),
                        why="trainer.resume=false")
    payload = checkpoint.load_latest(record.checkpoints)
    if payload is None:
        if summary.get("status") == DIVERGED:  # written before diverged runs kept a checkpoint
            return Decision("finished", summary=summary, why="diverged")
        return Decision("fresh", summary=summary, clear=record.has_record(),
                        why="no checkpoint to resume from")
    diffs = config_differences(payload.get("config", {}), config)
    if diffs:
        raise UserError(f"{record.path} holds a run with a different config ({'; '.join(diffs)})",
                        "use a new hydra.run.dir, or trainer.resume=false to start over there")
    state = payload["state"]
    if state["status"] not in ENDED:
        return Decision("resume", payload=payload, summary=summary,
                        why=f"{state['status']} at step {state['step']}")
    reason = more_to_do(state, trainer)
    if reason is None:  # the payload: what a finished run's missing files are re-made from
        return Decision("finished", payload=payload, summary=summary or _summary_of(state),
                        why=f"{state['status']} ({state['stop_reason']})")
    return Decision("continue", payload=payload, summary=summary, why=reason)


def more_to_do(state: dict, t: TrainerConfig) -> Optional[str]:
    """Why a run that ended by a rule would go on under these trainer settings, or None."""
    status, reason, step, rows = state["status"], state["stop_reason"], state["step"], state["rows"]
    if status == DIVERGED:
        return None
    budget = step_budget(t, _steps_per_epoch(state))
    if budget is not None and step >= budget:
        return None
    if t.max_time_s is not None and state["train_time_s"] >= t.max_time_s:
        return None
    if reason == "interpolation":
        return None if t.stop_at_interpolation else "trainer.stop_at_interpolation=false"
    if reason == "stalled":
        still = stalled(rows, t.stall_patience, t.stall_min_delta) or (
            t.min_lr is not None and rows and rows[-1]["lr"] < t.min_lr)
        return None if still else "the stall rule no longer holds"
    if reason in ("max_steps", "max_epochs", "max_time_s"):
        return "a bigger budget"
    return None


def step_budget(t: TrainerConfig, steps_per_epoch: int) -> Optional[int]:
    budgets = [b for b in (t.max_steps, t.max_epochs and t.max_epochs * steps_per_epoch) if b]
    return min(budgets) if budgets else None


def _steps_per_epoch(state: dict) -> int:
    if state.get("steps_per_epoch"):
        return state["steps_per_epoch"]
    # Checkpoints from before the count was kept: any row with a nonzero epoch gives it.
    for row in state["rows"]:
        if row.get("epoch"):
            return round(row["step"] / row["epoch"])
    return 1


def _read_summary(record: RunDir) -> dict:
    try:
        summary = read_json(record.summary)
        if not isinstance(summary, dict):
            raise ValueError(f"a JSON {type(summary).__name__}, not an object")
        return summary
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring an unreadable %s (%s)", record.summary, e)
        return {}


def _summary_of(state: dict) -> dict:
    return {k: state[k] for k in ("status", "stop_reason", "interpolation")} | {
        "steps": state["step"]}
