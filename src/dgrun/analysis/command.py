"""`dgrun analyze RUN_DIR WHAT [option=value ...]`: one analysis of a run, from its directory.

    dgrun analyze outputs/2026-11-24/10-00-00 cartography
    dgrun analyze outputs/.../run attribution methods=[trak,knn] top_k=5
    dgrun analyze multirun/2026-11-24/10-00-00 dynamics      # every run of a sweep

Writes RUN_DIR/analysis/WHAT/: tables as CSV, figures as PNG, summary.json. Option values are
read as YAML (lists, numbers, null). The run is rebuilt from what it recorded (dgrun.reopen):
its data exactly as it trained on them, its model at each checkpoint it kept, its metrics and
summary, and, with trainer.track_examples=true, its per-example history.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dgrun.errors import UserError


def artifacts(run, device: str = "cpu"):
    """A reopened run -> the RunArtifacts the analyses take."""
    from dgrun import checkpoint
    from dgrun.analysis.base import ExampleTrace, RunArtifacts

    loaded = [(step, checkpoint.load_file(path, map_location=device))
              for step, path in run.checkpoints()]
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


def analyze_paths(paths: list[Path], what: str, options: dict, device: str) -> list[Path]:
    from dgrun.analysis import ANALYSES, analyze
    from dgrun.reopen import reopen
    from dgrun.report import find_run_dirs

    # An unknown WHAT or option fails before any run is loaded (checkpoints take a while).
    allowed = ANALYSES.options(what)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"analysis '{what}' has no option '{unknown[0]}'",
                        f"its options are: {', '.join(allowed) or 'none'}")
    written = []
    for run_dir in find_run_dirs(paths):
        run = reopen(run_dir, device)
        written += analyze(what, artifacts(run, device), run_dir / "analysis" / what, **options)
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
        usage="%(prog)s [-h] [--device DEVICE] RUN_DIR WHAT [OPTION=VALUE ...]",
        description="Analyses of a run from its directory: writes "
        "RUN_DIR/analysis/WHAT/ (CSV tables, PNG figures, summary.json).",
        epilog="WHAT: " + ", ".join(ANALYSES.names()) + ". Options per analysis: "
        "src/dgrun/analysis/README.md, or a wrong one lists them.")
    # RUN_DIR and WHAT are checked below: argparse would list the optional OPTION=VALUE
    # among "the following arguments are required".
    p.add_argument("path", type=Path, metavar="RUN_DIR", nargs="?",
                   help="a run directory (or a sweep: every run in it)")
    p.add_argument("what", metavar="WHAT", nargs="?", help=", ".join(ANALYSES.names()))
    p.add_argument("options", nargs="*", metavar="OPTION=VALUE", help="optional")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
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
                                args.device)
    except UserError as e:
        print(f"dgrun: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
