"""TrackerSet: the trackers a run asked for, driven as one, none of them able to stop the run.

Every call goes to every live tracker inside its own guard: the first exception from a tracker
(full disk, server down, a bug inside the library) is logged once as a warning on the "dgrun"
logger, the tracker is closed and dropped, and the run carries on with the others. The state
the trackers need to continue after a resume lives in <run_dir>/trackers.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from dgrun.files import write_json
from dgrun.trackers.base import Tracker, flatten

log = logging.getLogger("dgrun")

STATE_FILE = "trackers.json"


class TrackerSet:
    """The run's trackers (possibly none). See the package docstring for the call order."""

    def __init__(self, trackers: Mapping[str, Tracker]):
        self.trackers: dict[str, Tracker] = dict(trackers)
        self.failed: dict[str, str] = {}       # name -> what went wrong (once warned)
        self.run_dir: Optional[Path] = None
        # Per tracker: rows at or below this step are not sent (already logged).
        self._logged_up_to: dict[str, Optional[int]] = {}
        # What trackers.json holds; a tracker that failed keeps its last good entry, so a
        # resumed run can continue its tracker run.
        self._state: dict[str, Any] = {}
        self._state_write_failed = False

    @property
    def names(self) -> list[str]:
        return list(self.trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, run_dir: Path, config: Mapping[str, Any], resume: bool) -> None:
        """Open every tracker's run. resume=True continues the tracker runs recorded in
        <run_dir>/trackers.json (a tracker with nothing recorded there starts a new run)."""
        self.run_dir = Path(run_dir)
        saved = self._read_state() if resume else {}
        if not resume:
            # It describes the tracker runs of the run this one replaces: never continue those.
            try:
                (self.run_dir / STATE_FILE).unlink(missing_ok=True)
            except OSError:
                pass  # overwritten below when there are trackers; harmless otherwise
        self._state = dict(saved)
        hparams = flatten(config)
        for name, tracker in list(self.trackers.items()):
            tracker.state = dict(saved.get(name) or {})
            tracker.state.pop("finished", None)  # open again until this command finishes it
            continues = resume and bool(tracker.state)
            if not continues:
                tracker.state = {}
            if self._call(name, "start", self.run_dir, hparams, continues):
                # What the tracker run already has (it may have started anew after all).
                last = tracker.state.get("last_step")
                self._logged_up_to[name] = None if tracker.rewrites_history else last
        self._write_state()

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Send one metrics row (it must have `step`) to every tracker."""
        step = int(row["step"])
        for name, tracker in list(self.trackers.items()):
            done = self._logged_up_to.get(name)
            if done is not None and step <= done:
                continue
            if self._call(name, "log_metrics", dict(row)):
                tracker.state["last_step"] = step
                self._logged_up_to[name] = step
        self._write_state()

    def log_images(self, paths: list[Path], step: int) -> None:
        """Send image files (the run's plots) to every tracker, at training step `step`."""
        paths = [Path(p) for p in paths]
        if paths:
            for name in list(self.trackers):
                self._call(name, "log_images", paths, int(step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Close every tracker run with the run's summary; the set is empty afterwards."""
        for name in list(self.trackers):
            if self._call(name, "finish", dict(summary)):
                # A finished run whose trackers.json lacks this was killed before its trackers
                # were closed: re-running it finishes them (dgrun.run.missing_derived).
                self.trackers[name].state["finished"] = True
        self._write_state()
        self.trackers.clear()

    def close(self) -> None:
        """Release every tracker without recording a summary (when `finish` cannot be called)."""
        for tracker in self.trackers.values():
            _quietly_close(tracker)
        self.trackers.clear()

    def _call(self, name: str, method: str, *args: Any) -> bool:
        tracker = self.trackers[name]
        try:
            getattr(tracker, method)(*args)
            return True
        except Exception as e:  # a tracker is a view of the run, never a reason to stop it
            problem = f"{type(e).__name__}: {e}"
            self.failed[name] = problem
            log.warning("tracker '%s' failed in %s (%s); dgrun stops logging to it and carries "
                        "on (the run directory keeps the full record)", name, method, problem)
            del self.trackers[name]
            _quietly_close(tracker)
            return False

    def _read_state(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); trackers start new runs", path, e)
            return {}

    def _write_state(self) -> None:
        if self.run_dir is None or self._state_write_failed:
            return
        self._state.update({name: dict(t.state) for name, t in self.trackers.items()})
        if not self._state:
            return  # no tracker ever: no file
        try:
            write_json(self.run_dir / STATE_FILE, self._state)
        except OSError as e:
            self._state_write_failed = True
            log.warning("cannot write %s (%s); a resumed run will start new tracker runs",
                        self.run_dir / STATE_FILE, e)


def _quietly_close(tracker: Tracker) -> None:
    try:
        tracker.close()
    except Exception:
        pass
