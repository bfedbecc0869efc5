"""`dgrun show PATH`: where a run (or every run of a sweep) stands, like `squeue` for dgrun.

    dgrun show outputs/2026-11-24/10-00-00     one run: status, summary, closing lines, last rows
    dgrun show multirun/2026-11-24/10-00-00    a sweep: one line per run

Read from the run directories only (summary.json, metrics.csv, the stored config), so it works
on runs still training, killed, failed or finished, here or on a cluster's shared disk. A run
whose summary says `running` while no process holds its directory's lock is shown as `killed
at step N`, N from its last metrics row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from dgrun.errors import UserError
from dgrun.probes.closing import closing_lines
from dgrun.readback import read_summary
from dgrun.rundir import holder

LAST_ROWS = 5
STYLE = {"completed": "green", "stopped": "green", "running": "yellow", "preempted": "yellow",
         "unknown": "yellow", "killed": "red"}


def _fmt(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4g}"
    return str(value)


def show(paths: list[Path], rows: int = LAST_ROWS) -> None:
    from rich.console import Console

    from dgrun import report

    run_dirs = report.find_run_dirs(paths)
    table, curves, keys = report.build_table(run_dirs)
    table = killed(table, curves)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if len(table) == 1:
        _one(console, table.iloc[0], curves.get(table.iloc[0]["run_dir"]), rows)
    else:
        _many(console, table, report.swept_columns(table, keys))


def killed(table: pd.DataFrame, curves: dict) -> pd.DataFrame:
    """A run whose summary says `running` but whose directory no live process holds (its
    lock died with it: SIGKILL, a crash, a lost node) is `killed`, at the step of its last
    metrics row (summary.json is only as new as its last checkpoint)."""
    table = table.copy()
    for i, run in table.iterrows():
        if run["status"] != "running" or holder(Path(run["run_dir"])) is not None:
            continue
        table.at[i, "status"] = "killed"
        curve = curves.get(run["run_dir"])
        if curve is not None and len(curve) and "step" in curve:
            table.at[i, "steps"] = curve["step"].iloc[-1]
    return table


def _one(console, run: pd.Series, curve, rows: int) -> None:
    from rich.table import Table

    status = run["status"]
    console.print(f"[bold]{run['run_dir']}[/]")
    console.print(f"  {run.get('model')} on {run.get('dataset')}, corruption "
                  f"{run.get('corruption')} (prob {_fmt(run.get('prob'))}), seed "
                  f"{_fmt(run.get('seed'))}, {_fmt(run.get('params'))} params")
    reason = run.get("stop_reason")
    console.print(f"  [{STYLE.get(status, 'red')}]{status}[/]"
                  + (f" ({reason})" if isinstance(reason, str) else "")
                  + f" at step {_fmt(run.get('steps'))}, epoch {_fmt(run.get('epochs'))}, "
                    f"{_fmt(run.get('time_s'))} s of training")
    console.print(f"  final: train acc {_fmt(run.get('final_train_acc'))}, test acc "
                  f"{_fmt(run.get('final_test_acc'))}, train loss "
                  f"{_fmt(run.get('final_train_loss'))}")
    if run.get("interpolation_reached"):
        console.print(f"  interpolation at step {_fmt(run.get('interpolation_step'))} "
                      f"({_fmt(run.get('interpolation_time_s'))} s); test acc there "
                      f"{_fmt(run.get('interpolation_test_acc'))}")
    else:
        console.print("  interpolation threshold not reached")
    if isinstance(run.get("error"), str) and run["error"]:
        console.print(f"  error: {run['error']}", markup=False)
    # The phenomenon's numbers, as the run printed them when it ended (dgrun.probes.closing).
    for line in closing_lines(read_summary(Path(run["run_dir"]) / "summary.json")):
        console.print(f"  {line}", markup=False, soft_wrap=True)
    if curve is not None and len(curve):
        grid = Table(title=f"last {min(rows, len(curve))} of {len(curve)} metrics rows",
                     title_justify="left")
        columns = [c for c in curve.columns if c not in ("time_s",)][:10]
        for column in columns:
            grid.add_column(column, justify="right")
        for _, row in curve.tail(rows).iterrows():
            grid.add_row(*[_fmt(row[c]) for c in columns])
        console.print(grid)


def _many(console, table: pd.DataFrame, swept: list[str]) -> None:
    from rich.table import Table

    counts = table["status"].value_counts()
    grid = Table(title=f"{len(table)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
                 title_justify="left")
    columns = ["run", *swept, "status", "steps", "final_train_acc", "final_test_acc",
               "interpolation_step", "time_s"]
    titles = {"final_train_acc": "train acc", "final_test_acc": "test acc",
              "interpolation_step": "fit at step", "time_s": "train s"}
    for column in columns:
        grid.add_column(titles.get(column, column), justify="left" if column in
                        ("run", "status") else "right")
    for _, run in table.iterrows():
        cells = [_fmt(run.get(c)) for c in columns]
        status = run["status"]
        reason = run.get("stop_reason")
        if isinstance(reason, str):
            status = f"{status} ({reason})"
        cells[columns.index("status")] = f"[{STYLE.get(run['status'], 'red')}]{status}[/]"
        grid.add_row(*cells)
    console.print(grid)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dgrun show",
                                description="Where a run, or each run of a sweep, stands.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a run directory, a sweep directory, or a folder of sweeps")
    p.add_argument("--rows", type=int, default=LAST_ROWS,
                   help=f"metrics rows to show for a single run (default {LAST_ROWS})")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        show(args.paths, args.rows)
    except UserError as e:
        print(f"dgrun: error: {e}", file=sys.stderr)
        return 2
    return 0
