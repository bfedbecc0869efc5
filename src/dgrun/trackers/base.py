"""The Tracker contract, and the helpers every backend shares.

A tracker is a sink: dgrun's run directory stays the record, and a tracker receives the same
rows, plots and summary to show them in its own tool. It never feeds anything back into
training, so losing one costs a view, never a result.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from dgrun.errors import UserError


class Tracker:
    """One experiment tracker. `TrackerSet` drives it; a backend overrides the four calls.

    Order: `start` once, `log_metrics` for each evaluation row (steps increasing), then
    `log_images` and `finish` once. Any exception may escape: the set catches it, warns and
    stops using the tracker. `close` releases what `start` opened without recording anything
    (after a failure) and must not raise.

    `state` is a small JSON-able dict the set keeps in <run_dir>/trackers.json between the
    segments of a resumed run (a tracker-side run id, the last step logged). The set fills it
    before `start`: `resume=True` means "continue the run that `state` describes".

    `rewrites_history`: the backend can drop what it logged after a point (TensorBoard's
    purge_step), so after a resume it takes the re-measured rows; a backend that cannot is not
    sent rows at or below the last step it logged before the run was interrupted.
    """

    name = ""
    requires = ""                # the module to import, e.g. "wandb"
    extra = ""                   # the pip extra that installs it: dgrun[<extra>]
    rewrites_history = False

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        """Open the tracker run. config: the resolved run config, flattened to dotted keys."""

    def log_metrics(self, row: dict[str, Any]) -> None:
        """One metrics row: step, epoch, time_s, lr, losses, accuracies, probe extras."""

    def log_images(self, paths: list[Path], step: int) -> None:
        """Image files (the run's plots), shown at training step `step`."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's summary (final numbers, summary["status"]); closes the tracker run."""

    def close(self) -> None:
        """Release resources without recording anything; never raises."""


def require(module: str, extra: str) -> ModuleType:
    """Import a tracker's package, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logger '{extra}' needs the '{module.split('.')[0]}' package, "
                        "which is not installed",
                        f"pip install 'dgrun[{extra}]' (or choose another logger)") from None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}. Lists stay values; an empty
    mapping stays a value ({}), so a key the config has is never lost."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row as {name: float} for a tracker: `step` is the x-axis, not a series; None
    (not measured) is left out; NaN and inf stay (a diverged run shows them)."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None:
            continue
        try:
            out[key] = float(value)   # python and numpy numbers, bools, one-element tensors
        except (TypeError, ValueError):
            continue                  # a non-numeric extra is the run directory's business
    return out


def hparam_value(value: Any) -> Any:
    """A config value as a tracker can show it: numbers, strings and bools as they are."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


def default_run_name(run_dir: Path) -> str:
    """outputs/2026-11-24/10-00-00 -> "2026-11-24/10-00-00"; multirun/.../10-00-00/3 ->
    "10-00-00/3": the run directory's last two parts, which tell runs of a sweep apart."""
    return "/".join(Path(run_dir).resolve().parts[-2:])
