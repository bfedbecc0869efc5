"""Abrupt transitions in metric curves: a plateau, then a large change within a short span.

Definition (everything relative, so it means the same on linear and on log-spaced evaluations
and at step 100 or step 100,000). Take a curve of (step, value) pairs with step > 0 and a
finite value; `w = max_span`.

1. Levels around each gap between consecutive evaluations s_i < s_i+1: the level before is the
   median of the values at steps in [s_i / (1 + w), s_i], the level after the median of those in
   [s_i+1, s_i+1 * (1 + w)]; the jump J = after - before. Medians, so a single noisy or spiking
   evaluation neither makes nor hides a transition.
2. Extent: with u = (value - before) / J (0 at the old level, 1 at the new one), the transition
   ends at the first evaluation with u >= 1 - EDGE after the last evaluation up to s_i with
   u <= EDGE, and starts at the last evaluation before that end with u <= EDGE. Its `step` is
   the first evaluation from the start on with u >= 1/2.
3. It is abrupt when all hold:
   - size:    |J| >= min_jump (in the metric's units: accuracy, or decades of loss), and
              |J| >= NOISE_MULTIPLE * sigma, sigma the curve's noise level estimated from the
              median absolute difference between consecutive evaluations;
   - short:   end - start <= max_span * start (default 1: done before the step doubles);
   - plateau: the evaluations in [start / (1 + plateau), start] (at least MIN_PLATEAU_EVALS of
              them) are flat: a straight line fitted to them (value against step) changes by
              at most flatness * |J| over max(plateau length, end - start), so the plateau
              neither moved much in total nor at more than `flatness` times the jump's rate;
              and their scatter (10%-90% quantile spread) is at most 2 * flatness * |J|;
   - distinct: its [start, end] does not overlap a transition already accepted, nor the
              plateau of one (that run-up is part of the accepted jump).

Why these rules separate jumps from ordinary learning: a curve that is smooth in log-step
(power laws: log loss linear in log step) changes about as much over the plateau window as
over the jump's windows of similar relative length; a decelerating curve (exponential
approach to a limit) changes more before than after; a constant-rate curve (linear drift, a
loss falling exponentially in steps) moves on the plateau at the jump's own rate. All fail
the plateau rule by a wide margin (its change or rate is about 1/2 of the jump's or more,
where 1/5 is allowed). Noise fails the size and scatter rules: a jump must exceed the
curve's noise level eightfold and the plateau's scatter 2.5-fold. What passes is a curve
that sat still for a while and then moved a lot, quickly relative to how long it had been
running: sparse parity's escape from 50%, a grokking jump after a long plateau, a loss cliff.

Gaps are examined from the largest |J| down, so one jump is reported once (with the levels of
its best-aligned windows) and separate jumps are all reported. Detection is statistical: on
smooth curves with heavy noise (10% multiplicative noise on a loss) a false positive was seen
in about 1 of 400 random curves. A rise that is fast on a log axis but gradual relative to its
step is not abrupt by default: Gromov's MLP groks with test accuracy 0.03 at step 56, 0.2 at
112, 0.99 at 224; `flatness=0.3` flags it, at about 1% false positives on noisy exponential
loss curves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from dgrun.errors import UserError
from dgrun.probes import PROBES
from dgrun.metrics import number
from dgrun.probes.base import Probe

EDGE = 0.2                # a point within 20% of the jump from a level is still at that level
MIN_PLATEAU_EVALS = 3     # fewer evaluations than this before a jump cannot show a plateau
NOISE_MULTIPLE = 8        # a jump is at least this many times the curve's noise level
LOG_PREFIX = "log10_"     # metric "log10_train_loss" is log10(train_loss); values <= 0 dropped
DEFAULT_METRICS = ("train_acc", "test_acc", "log10_train_loss", "log10_test_loss")


@dataclass(frozen=True)
class Transition:
    metric: str
    step: int             # first evaluation past half the jump
    start_step: int       # last evaluation still at the old level
    end_step: int         # first evaluation at the new level
    before: float         # level before (median of the window before the jump)
    after: float          # level after

    @property
    def size(self) -> float:
        return self.after - self.before

    def as_dict(self) -> dict:
        return {**asdict(self), "size": self.size}


def detect(steps: Sequence[float], values: Sequence[float], *, metric: str = "",
           min_jump: float = 0.2, max_span: float = 1.0, plateau: float = 1.0,
           flatness: float = 0.2) -> list[Transition]:
    """The abrupt transitions of one curve (see the module docstring), ordered by step."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(s) & np.isfinite(v) & (s > 0)
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if len(s) < MIN_PLATEAU_EVALS + 1:
        return []
    last = np.append(s[1:] != s[:-1], True)  # a step recorded twice (a stop right after an
    s, v = s[last], v[last]                  # evaluation) counts once, with its last value
    n = len(s)
    if n < MIN_PLATEAU_EVALS + 1:
        return []
    # Window bounds for every evaluation at once; the windows are contiguous index ranges.
    first_before = np.searchsorted(s, s / (1 + max_span), side="left")
    past_after = np.searchsorted(s, s * (1 + max_span), side="right")
    before = np.array([np.median(v[first_before[i]:i + 1]) for i in range(n - 1)])
    after = np.array([np.median(v[i + 1:past_after[i + 1]]) for i in range(n - 1)])
    jump = after - before
    # The curve's own noise, robustly, from evaluation-to-evaluation differences (a jump is one
    # large difference among many, so the median ignores it).
    noise = 1.4826 * np.median(np.abs(np.diff(v))) / math.sqrt(2)

    found: list[Transition] = []
    taken = np.zeros(n, dtype=bool)
    for i in np.argsort(-np.abs(jump), kind="stable"):
        if abs(jump[i]) < min_jump:
            break
        if abs(jump[i]) < NOISE_MULTIPLE * noise:
            continue
        u = (v - before[i]) / jump[i]
        # Each search ends inside a window: a median has half its window on each side. The gap
        # may sit anywhere whose windows straddle the jump, so the extent is tightened around
        # the first crossing: from the old level, the first arrival at the new one, and the
        # last evaluation at the old level before that arrival.
        start = i
        while u[start] > EDGE:
            start -= 1
        end = start + 1
        while u[end] < 1 - EDGE:
            end += 1
        start = end - 1
        while u[start] > EDGE:
            start -= 1
        span = s[end] - s[start]
        if span > max_span * s[start] or taken[start:end + 1].any():
            continue
        first = np.searchsorted(s, s[start] / (1 + plateau), side="left")
        flat = v[first:start + 1]
        if len(flat) < MIN_PLATEAU_EVALS:
            continue
        # Scatter bounds the plateau's noise; the fitted line's change over the longer of the
        # plateau and the jump bounds its drift in total and in rate (a curve falling at a
        # constant rate is no jump, however noise happens to scatter it).
        low, high = np.quantile(flat, [0.1, 0.9])
        scatter = high - low
        slope = np.polyfit(s[first:start + 1], flat, 1)[0]
        drift = abs(slope) * max(s[start] - s[first], span)
        if drift > flatness * abs(jump[i]) or scatter > 2 * flatness * abs(jump[i]):
            continue
        middle = start + int(np.argmax(u[start:end + 1] >= 0.5))
        found.append(Transition(metric, int(s[middle]), int(s[start]), int(s[end]),
                                float(before[i]), float(after[i])))
        # The run-up inside its plateau belongs to this jump, not to a separate one.
        taken[first:end + 1] = True
    return sorted(found, key=lambda t: t.step)


def curve(rows: Iterable[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the rows; blanks, non-numbers and non-finite values
    are skipped, and a `log10_` metric takes log10 of its column (values <= 0 skipped)."""
    column, log = (metric[len(LOG_PREFIX):], True) if metric.startswith(LOG_PREFIX) \
        else (metric, False)
    steps, values = [], []
    for row in rows:
        value = number(row.get(column))
        step = number(row.get("step"))
        if value is None or step is None or (log and value <= 0):
            continue
        steps.append(step)
        values.append(math.log10(value) if log else value)
    return steps, values



class TransitionsProbe(Probe):
    """Detects abrupt transitions in the run's metric curves; measures nothing itself.

    summarize -> {"transitions": {"count", "<metric>_step", "<metric>_size" (largest |size| per
    metric, null when none), "events": [Transition.as_dict(), ...]}}.
    """

    KEY = "transitions"

    def __init__(self, metrics: Sequence[str], **criteria: float):
        self.metrics = list(metrics)
        self.criteria = criteria

    def summarize(self, rows: list[dict]) -> dict:
        events: list[Transition] = []
        out: dict = {}
        for metric in self.metrics:
            found = detect(*curve(rows, metric), metric=metric, **self.criteria)
            largest = max(found, key=lambda t: abs(t.size), default=None)
            out[f"{metric}_step"] = None if largest is None else largest.step
            out[f"{metric}_size"] = None if largest is None else largest.size
            events.extend(found)
        events.sort(key=lambda t: t.step)
        return {self.KEY: {"count": len(events), **out,
                           "events": [t.as_dict() for t in events]}}

    def marks(self, summary: dict) -> list[tuple[int, str]]:
        events = (summary.get(self.KEY) or {}).get("events") or []
        from dgrun.probes.closing import event_text

        return [(e["step"], event_text(e)) for e in events]


@PROBES.register("transitions")
def transitions(*, meta, seed, metrics: Sequence[str] = DEFAULT_METRICS, min_jump: float = 0.2,
                max_span: float = 1.0, plateau: float = 1.0,
                flatness: float = 0.2) -> TransitionsProbe:
    """Abrupt-change detector over metric columns (`log10_<column>` for a log-scale column)."""
    if isinstance(metrics, str) or not metrics:
        raise UserError(f"probes.transitions.metrics must be a non-empty list, got {metrics!r}",
                        "e.g. probes.transitions.metrics=[test_acc,log10_test_loss]")
    for name, value in (("min_jump", min_jump), ("max_span", max_span), ("plateau", plateau),
                        ("flatness", flatness)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"probes.transitions.{name} must be a positive number, got {value!r}",
                            f"set probes.transitions.{name} to a value > 0")
    return TransitionsProbe(metrics, min_jump=float(min_jump), max_span=float(max_span),
                            plateau=float(plateau), flatness=float(flatness))
