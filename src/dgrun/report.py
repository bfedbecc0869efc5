"""`dgrun report PATH...`: run directories -> one tidy table -> sweep figures.

Everything is read from the run directories (`.hydra/`, `summary.json`, `metrics.csv`), so a
report can be made of a sweep that is still going, of one with failed runs, or of several
sweeps at once. No run is dropped: a run without a summary is listed with status `unknown`,
one still training (or killed while training) with `running`, and its numbers so far are
taken from its metrics.csv.

    dgrun report multirun/2026-11-24/10-00-00
    dgrun report multirun/ --x prob --y final_test_acc --hue model --html
"""
from __future__ import annotations

import argparse
import difflib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from dgrun import readback
from dgrun.errors import UserError, os_problem
from dgrun.files import write_text
from dgrun.status import HAS_FINAL_NUMBERS as FINISHED
from dgrun.stopping import interpolates

EXIT_USAGE = 2
MARKERS = (".hydra/config.yaml", "summary.json", "metrics.csv")
STANDARD = ("dataset", "model", "corruption", "prob", "seed", "corruption_seed")
# Override keys that name the same thing as a standard column (`corruption.prob=0,0.5` is `prob`).
ALIASES = {"corruption.prob": "prob", "corruption.name": "corruption", "model.name": "model",
           "dataset.name": "dataset", "corruption.seed": "corruption_seed"}
RUN_FIELDS = ("status", "stop_reason", "steps", "epochs", "time_s", "params")
INTERPOLATION = ("reached", "step", "epoch", "time_s")
HANDLED = {*RUN_FIELDS, "final", "interpolation", "error", "seed", "dataset",
           "model", "corruption", "versions", "resumed_at_steps", "config", "overrides"}


# ---------------------------------------------------------------- finding run directories
def natural_key(text: str) -> list:
    """'10' sorts after '9': job numbers in sweep order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in MARKERS)


def find_run_dirs(paths: list[Path]) -> list[Path]:
    found: dict[Path, None] = {}
    for root in paths:
        if not root.exists():
            raise UserError(f"{root} does not exist",
                            "pass a run directory, a sweep directory or a folder of sweeps")
        if not root.is_dir():
            raise UserError(f"{root} is not a directory", "pass the run or sweep directory")
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if is_run_dir(here):
                found[here.resolve()] = None
                dirnames.clear()  # a run's checkpoints/ and plots/ hold no runs
            else:  # analysis/: what `dgrun analyze` wrote over a sweep's runs, not a run
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "analysis"]
    if not found:
        raise UserError(f"no run directories under {', '.join(map(str, paths))}",
                        "a run directory holds .hydra/config.yaml, summary.json or metrics.csv")
    return sorted(found, key=lambda p: natural_key(str(p)))


# ---------------------------------------------------------------- reading one run
def typed(text: str) -> Any:
    """An override's value as the number, bool or string it spells."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    value = yaml.safe_load(text) if text else None
    return value if isinstance(value, (bool, type(None))) else text


def lookup(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node.get("name") if isinstance(node, dict) else node  # a group: its choice's name


def parse_overrides(lines: list, config: dict) -> dict[str, Any]:
    """`.hydra/overrides.yaml` -> {key: value}, typed as the resolved config types it."""
    swept = {}
    for line in lines or []:
        key, sep, text = str(line).partition("=")
        if not sep or key.startswith("~"):
            continue
        key = key.lstrip("+")
        if key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue
        value = lookup(config, key)
        swept[key] = value if isinstance(value, (int, float, str, bool)) else typed(text)
    return swept


def read_metrics(path: Path) -> Optional[pd.DataFrame]:
    text = readback.metrics_text(path)
    try:
        frame = pd.read_csv(io.StringIO(text)) if text else None
    except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    return frame if frame is not None and len(frame) and "step" in frame else None


def interpolation_from_metrics(curve: pd.DataFrame, trainer: dict) -> dict:
    """For a run whose summary is not written yet: the first evaluation that fit the data."""
    threshold = trainer.get("interpolation_threshold", 1.0)
    loss = trainer.get("interpolation_loss")
    for _, row in curve.iterrows():
        if interpolates(row.to_dict(), threshold, loss):
            return {"reached": True, **{k: v for k, v in row.items() if k != "lr"}}
    return {"reached": False}


def load_run(run_dir: Path) -> tuple[dict, dict, Optional[pd.DataFrame], dict]:
    """One run -> (swept values, the table row, its metrics curve or None, its config).

    A run is described by what it ran: the config and overrides stored in its summary.json
    (written with its checkpoints), and only for runs without one by `.hydra/`.
    """
    curve = read_metrics(run_dir / "metrics.csv")
    summary = readback.read_summary(run_dir / "summary.json")
    config = summary.get("config") or readback.read_config(run_dir) or {}
    overrides = summary.get("overrides")
    if overrides is None:
        overrides = readback.read_overrides(run_dir) or []
    swept = parse_overrides(overrides, config)
    corruption = summary.get("corruption") or {}
    row: dict[str, Any] = {
        "dataset": summary.get("dataset") or lookup(config, "dataset"),
        "model": summary.get("model") or lookup(config, "model"),
        "corruption": corruption.get("name") or lookup(config, "corruption"),
        "prob": _first(corruption.get("prob"), lookup(config, "corruption.prob")),
        "seed": _first(summary.get("seed"), config.get("seed")),
        "corruption_seed": _first(corruption.get("seed"), lookup(config, "corruption.seed"),
                                  summary.get("seed"), config.get("seed")),
        "status": summary.get("status") or ("unknown" if not summary else "running"),
    }
    row.update({k: summary.get(k) for k in RUN_FIELDS[1:]})
    final = dict(summary.get("final") or {})
    interpolation = dict(summary.get("interpolation") or {})
    if not final and curve is not None:  # unfinished: its numbers so far
        last = curve.iloc[-1]
        row.update(steps=last["step"], epochs=last.get("epoch"), time_s=last.get("time_s"))
        final = {k: last[k] for k in curve.columns if k not in ("step", "epoch", "time_s", "lr")}
        interpolation = interpolation_from_metrics(curve, config.get("trainer") or {})
    row.update({f"final_{k}": _number(v) for k, v in final.items()})
    row.update({f"interpolation_{k}": interpolation.get(k) for k in INTERPOLATION})
    row.update({f"interpolation_{k}": _number(v) for k, v in interpolation.items()
                if k not in INTERPOLATION and k != "lr" and _is_scalar(v)})
    row["interpolation_reached"] = bool(interpolation.get("reached"))
    for key, value in summary.items():  # whatever else a newer dgrun writes
        if key in HANDLED:
            continue
        if _is_scalar(value):
            row.setdefault(key, value)
        elif isinstance(value, dict):
            row.update({f"{key}_{k}": v for k, v in value.items() if _is_scalar(v)})
    row["error"] = summary.get("error")
    return swept, row, curve, config


def _first(*values):
    return next((v for v in values if v is not None), None)


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


# ---------------------------------------------------------------- the table
def build_table(run_dirs: list[Path]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], list[str]]:
    """-> (one row per run, {run_dir: metrics curve}, the override keys in first-seen order)."""
    base = Path(os.path.commonpath(run_dirs)) if len(run_dirs) > 1 else run_dirs[0].parent
    rows, curves, keys, configs = [], {}, {}, []
    for run_dir in run_dirs:
        swept, row, curve, config = load_run(run_dir)
        keys.update(dict.fromkeys(swept))
        rows.append({"run": os.path.relpath(run_dir, base), "run_dir": str(run_dir),
                     **swept, **row})
        configs.append(config)
        if curve is not None:
            curves[str(run_dir)] = curve
    # A key one run's command set and another's left at its default: the default is its value.
    for row, config in zip(rows, configs):
        for key in keys:
            if key not in row:
                value = lookup(config, key)
                row[key] = value if isinstance(value, (int, float, str, bool)) else None
    table = pd.DataFrame(rows)
    for column in ("seed", "steps", "params", "interpolation_step", *keys):
        if column in table and (column not in keys or table[column].isna().any()):
            table[column] = _as_int(table[column])
    order = ["run", "run_dir", *keys, *STANDARD, *RUN_FIELDS]
    finals = [c for c in table if c.startswith("final_")]
    interp = [f"interpolation_{k}" for k in INTERPOLATION]
    rest = [c for c in table if c not in {*order, *finals, *interp, "error"}]
    columns = list(dict.fromkeys(order + finals + interp + rest + ["error"]))
    return table[columns], curves, list(keys)


def _as_int(column: pd.Series) -> pd.Series:
    """Whole numbers read back as floats (a NaN in the column) -> nullable integers."""
    if not pd.api.types.is_float_dtype(column) or column.isna().all():
        return column
    values = column.dropna()
    return column.astype("Int64") if (values == values.round()).all() else column


def swept_columns(table: pd.DataFrame, override_keys: list[str]) -> list[str]:
    """The parameters that vary across runs (the seed is the axis averaged over, not one)."""
    candidates = dict.fromkeys([ALIASES.get(k, k) for k in override_keys] + list(STANDARD))
    seeds = {"seed"}
    if "corruption_seed" in table and (table["corruption_seed"].astype(str)
                                       == table["seed"].astype(str)).all():
        seeds.add("corruption_seed")  # follows the seed: not a parameter of its own
    return [c for c in candidates if c not in seeds and c in table
            and table[c].astype(str).nunique() > 1]


def not_completed(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["status"].isin(FINISHED)]


def did_not_fit(table: pd.DataFrame) -> pd.DataFrame:
    """Runs that ended by their own rules without reaching the interpolation threshold."""
    ended = table[table["status"].isin(FINISHED)]
    return ended[~ended["interpolation_reached"].astype(bool)]


def why(row: pd.Series) -> str:
    if isinstance(row.get("error"), str) and row["error"]:
        return row["error"]
    if row["status"] == "unknown":
        return "no summary.json: crashed at start, or not started yet"
    if row["status"] == "running":
        return f"unfinished, {0 if pd.isna(row['steps']) else int(row['steps'])} steps so far"
    return str(row.get("stop_reason") or "")


def write_table(table: pd.DataFrame, out: Path) -> list[str]:
    write_text(out / "runs.csv", table.to_csv(index=False))
    notes = []
    try:
        table.to_parquet(out / "runs.parquet", index=False)
    except ImportError:  # pyarrow / fastparquet not installed: runs.csv has everything
        (out / "runs.parquet").unlink(missing_ok=True)  # never leave a stale one beside it
    except Exception as e:  # a column mixing types parquet cannot store
        (out / "runs.parquet").unlink(missing_ok=True)
        notes.append(f"runs.parquet skipped ({type(e).__name__}: {e})")
    return notes


# ---------------------------------------------------------------- printing
def print_summary(table: pd.DataFrame, swept: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped or logged, rich would cut the table to 80 columns: give it room instead.
    console = Console(width=None if sys.stdout.isatty() else 200)
    shown = swept + (["seed"] if table["seed"].astype(str).nunique() > 1 else [])
    grid = Table(title=f"{len(table)} runs", title_justify="left")
    styles = {"completed": "green", "stopped": "green", "running": "yellow",
              "unknown": "yellow", "preempted": "yellow"}
    columns = [("run", "run"), *[(c, c) for c in shown], ("status", "status"),
               ("final_train_acc", "train acc"), ("final_test_acc", "test acc"),
               ("interpolation_step", "steps to threshold")]
    for key, title in columns:
        numeric = key in table and pd.api.types.is_numeric_dtype(table[key])
        grid.add_column(title, justify="right" if numeric else "left")
    for _, row in table.iterrows():
        cells = [_cell(row.get(key)) for key, _ in columns]
        status = row["status"]
        cells[len(shown) + 1] = f"[{styles.get(status, 'red')}]{status}[/]"
        grid.add_row(*cells)
    console.print(grid)
    bad = not_completed(table)
    if len(bad):
        console.print(f"[bold]{len(bad)} of {len(table)} runs did not complete:[/]")
        for _, row in bad.iterrows():
            console.print(f"  {row['run']}: {row['status']} ({why(row)})", markup=False,
                          soft_wrap=True)
    else:
        console.print(f"all {len(table)} runs completed")
    missed = did_not_fit(table)
    if len(missed):
        console.print(f"[bold]{len(missed)} of {len(table)} runs did not reach the "
                      f"interpolation threshold:[/]")
        for _, row in missed.iterrows():
            console.print(f"  {row['run']}: {row['status']} ({why(row)})", markup=False,
                          soft_wrap=True)


def _cell(value) -> str:
    if value is None or pd.isna(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- the command
class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other dgrun error
        print(f"dgrun: error: {message}; see `dgrun report --help`", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="dgrun report", description="Tables and figures from run directories.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="run directories, sweep directories, or folders holding several sweeps")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where to write (default: <first PATH>/report)")
    p.add_argument("--x", metavar="KEY", help="x axis: a table column (default for the "
                   "corruption figures: prob)")
    p.add_argument("--y", metavar="KEY", help="with --x: also draw <y>_vs_<x>.png")
    p.add_argument("--hue", metavar="KEY", help="one line per value of this column (in every "
                   "figure, curves included)")
    p.add_argument("--curve", metavar="COLUMN", action="append", default=[],
                   help="also draw <COLUMN>_curves.png: a metrics.csv column over training "
                        "(repeatable), e.g. --curve test_worst_group_acc --curve adv_acc")
    p.add_argument("--html", action="store_true",
                   help="also write report.html, interactive and self-contained (needs plotly)")
    p.add_argument("--no-figures", action="store_true", help="only the table")
    return p.parse_args(argv)


def check_keys(table: pd.DataFrame, args: argparse.Namespace) -> None:
    if args.y and not args.x:
        raise UserError("--y needs --x", "e.g. --x prob --y final_test_acc")
    for option in ("x", "y", "hue"):
        key = getattr(args, option)
        if key is not None and key not in table:
            close = difflib.get_close_matches(key, list(table), n=1)
            raise UserError(f"--{option} {key} is not a column of the runs table",
                            (f"did you mean {close[0]}? " if close else "")
                            + "runs.csv lists them: " + ", ".join(table.columns))
    if args.y and not pd.api.types.is_numeric_dtype(table[args.y]):
        raise UserError(f"--y {args.y} is not numeric", "pick a number column, e.g. final_test_acc")


def report(paths: list[Path], out: Optional[Path] = None, x: Optional[str] = None,
           y: Optional[str] = None, hue: Optional[str] = None, html: bool = False,
           figures: bool = True, curve: tuple[str, ...] = ()) -> pd.DataFrame:
    """The report, from Python: writes into `out` and returns the runs table."""
    args = argparse.Namespace(paths=paths, out=out, x=x, y=y, hue=hue, html=html,
                              no_figures=not figures, curve=list(curve))
    return _report(args)


def _report(args: argparse.Namespace) -> pd.DataFrame:
    if args.html:
        try:
            import plotly  # noqa: F401
        except ImportError:
            raise UserError("--html needs plotly, which is not installed",
                            "pip install 'dgrun[report]'") from None
    table, curves, keys = build_table(find_run_dirs(args.paths))
    check_keys(table, args)
    unknown = [c for c in args.curve if not any(c in frame for frame in curves.values())]
    if unknown:
        raise UserError(f"--curve {unknown[0]} is not a metrics.csv column of these runs",
                        "metrics.csv's header lists them, e.g. test_acc")
    out = args.out or args.paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes = write_table(table, out)
    swept = swept_columns(table, keys)
    print_summary(table, swept)
    written = [p for p in (out / "runs.csv", out / "runs.parquet") if p.exists()]
    if not args.no_figures:
        from dgrun import report_figures

        for stale in report_figures.STANDARD:  # from an earlier report; may not apply now
            (out / f"{stale}.png").unlink(missing_ok=True)

        figs, skipped = report_figures.build(table, curves, swept, x=args.x, y=args.y,
                                             hue=args.hue, curve=tuple(args.curve))
        notes += skipped
        written += [report_figures.save_png(fig, out) for fig in figs]
        if args.html:
            written.append(report_figures.save_html(figs, table, swept, out))
    for note in notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in written))
    return table


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed (2)
        return int(e.code or 0)
    try:
        _report(args)
    except (UserError, OSError) as e:
        if isinstance(e, OSError):  # a read-only run, a full disk: one line, like bad input
            e = os_problem(e, "choose another --out DIR" if args.out else
                           "pass --out DIR to write the report elsewhere")
        print(f"dgrun: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
