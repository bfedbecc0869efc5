"""`dgrun analyze RUN_DIR WHAT [option=value ...]`: one analysis of a run, from its directory.

    dgrun analyze outputs/2026-11-24/10-00-00 cartography
    dgrun analyze outputs/.../run attribution methods=[trak,knn] top_k=5
    dgrun analyze multirun/2026-11-24/10-00-00 dynamics      # every run of a sweep
    dgrun analyze outputs/subsets memorization     # one analysis over a sweep's subset models

Writes RUN_DIR/analysis/WHAT/: tables as CSV, figures as PNG, summary.json; with `--out DIR`
(a read-only run, a shared one) DIR/WHAT/ for one run and DIR/<run's path in the sweep>/WHAT/
for each run of a sweep. Option values are read as YAML (lists, numbers, null) and checked
against the analysis's typed options (dgrun.analysis.options). The run is rebuilt from what
it recorded (dgrun.reopen): its data exactly as it trained on them, its model at each
checkpoint it kept (each file read once), its metrics and summary, and, with
trainer.track_examples=true, its per-example history.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from dgrun.errors import UserError, os_problem


def artifacts(run, device: str = "cpu"):
    """A reopened run -> the RunArtifacts the analyses take."""
    from dgrun.analysis.base import ExampleTrace, RunArtifacts

    loaded = run.load_checkpoints(device)
    examples = None
    if loaded:
        tracked = loaded[-1][1].get("probes", {}).get("examples")
        if tracked and len(tracked["steps"]):
            examples = ExampleTrace([int(s) for s in tracked["steps"]],
                                    tracked["true_prob"].float(), tracked["correct"])
    return RunArtifacts(bundle=run.bundle(), model=run.fresh_model(),
                        checkpoints=[(step, payload["model"]) for step, payload in loaded],
                        rows=run.rows, summary=run.summary, examples=examples,
                        seed=run.cfg.seed)


def out_dir(run_dir: Path, root: Path, what: str, out: Optional[Path]) -> Path:
    """Where one run's analysis goes: inside the run, or under `out` at the run's place in
    the sweep given (the run itself given: out/WHAT)."""
    if out is None:
        return run_dir / "analysis" / what
    return out / os.path.relpath(run_dir, root.resolve()) / what


def analyze_paths(paths: list[Path], what: str, options: dict, device: str,
                  out: Optional[Path] = None) -> list[Path]:
    from dgrun import readback
    from dgrun.analysis import ANALYSES, analyze
    from dgrun.analysis.options import check
    from dgrun.reopen import reopen
    from dgrun.report import find_run_dirs

    # An unknown WHAT, option or value fails before any run is loaded (checkpoints take a while).
    options = check(what, ANALYSES.get(what), options)
    written = []
    if ANALYSES.tags(what).get("over") == "models":  # one analysis over all the runs found
        from dgrun.analysis.subset_models import SubsetModels

        models = SubsetModels.load(find_run_dirs(paths), device)
        return analyze(what, models, paths[0] / "analysis" / what, **options)
    for run_dir in find_run_dirs(paths):
        run = reopen(run_dir, device)
        loaded = artifacts(run, device)
        for note in run.notes:
            readback.note(note)
        written += analyze(what, loaded, out_dir(run_dir, paths[0], what, out), **options)
    return written


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"'{item}' is not an option=value pair", "e.g. top_k=5")
        try:
            options[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            options[key] = value
    return options


def main(argv: list[str]) -> int:
    from dgrun.analysis import ANALYSES

    p = argparse.ArgumentParser(
        prog="dgrun analyze",
        usage="%(prog)s [-h] [--device DEVICE] [--out DIR] RUN_DIR WHAT [OPTION=VALUE ...]",
        description="Analyses of a run from its directory: writes "
        "RUN_DIR/analysis/WHAT/ (CSV tables, PNG figures, summary.json), or --out DIR.",
        epilog="WHAT: " + ", ".join(ANALYSES.names()) + ". Options per analysis: "
        "src/dgrun/analysis/README.md, or a wrong one lists them.")
    # RUN_DIR and WHAT are checked below: argparse would list the optional OPTION=VALUE
    # among "the following arguments are required".
    p.add_argument("path", type=Path, metavar="RUN_DIR", nargs="?",
                   help="a run directory (or a sweep: every run in it)")
    p.add_argument("what", metavar="WHAT", nargs="?", help=", ".join(ANALYSES.names()))
    p.add_argument("options", nargs="*", metavar="OPTION=VALUE", help="optional")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write DIR/WHAT/ (a sweep: DIR/<run>/WHAT/) instead of inside the run: "
                        "for runs you cannot or should not write to")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.what is None:
            missing = "RUN_DIR and WHAT" if args.path is None else "WHAT"
            raise UserError(f"dgrun analyze needs {missing}",
                            f"e.g. dgrun analyze RUN_DIR cartography [OPTION=VALUE ...]; WHAT is "
                            f"one of: {', '.join(ANALYSES.names())}")
        written = analyze_paths([args.path], args.what, parse_options(args.options),
                                args.device, args.out)
    except (UserError, OSError) as e:
        if isinstance(e, OSError):  # a read-only run, a full disk: one line, like bad input
            e = os_problem(e, "choose another --out DIR" if args.out else
                           "pass --out DIR to write the analysis elsewhere")
        print(f"dgrun: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
