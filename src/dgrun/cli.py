"""The `dgrun` command.

    dgrun [overrides]             train one run (Hydra: --help, --cfg job, --info, -m, -sc)
    dgrun -m key=a,b ...          sweep
    dgrun report PATH...          tables and figures from run directories
    dgrun slurm [opts] -- a=1,2   submit a sweep as one Slurm job array and return

Before Hydra starts a run, every override combination is composed and validated here, so a
typo, an unknown choice or an out-of-range value ends with one line (exit code 2) and no run
directory is created.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from dgrun.config import register_schemas
from dgrun.errors import UserError

EXIT_USAGE = 2
MAX_PREVALIDATED = 256  # sweeps larger than this are validated job by job instead


def config_dir() -> Path:
    """The shipped configs: `dgrun/conf` in an installed wheel, the repo's `conf/` in a checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    raise SystemExit("dgrun: error: the config directory is missing from this installation; "
                     "reinstall dgrun")


def fail(problem: str, fix: str = "") -> None:
    print(f"dgrun: error: {problem}" + (f"; {fix}" if fix else ""), file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _validate_command_line(args) -> None:
    """Compose and validate every job this command line would run, before Hydra starts any."""
    from dgrun.compose import expand

    if args.config_dir and not os.path.isdir(args.config_dir):
        fail(f"--config-dir {os.path.abspath(args.config_dir)} does not exist",
             "pass an existing directory")
    try:
        expand(list(args.overrides), multirun=bool(args.multirun), config_dir_extra=args.config_dir,
               config_name=args.config_name or "config", limit=MAX_PREVALIDATED)
    except UserError as e:
        fail(e.problem, e.fix)


# ---------------------------------------------------------------- the training task
def _cleanup_fresh_dir(run_dir: Path) -> None:
    """A run that failed before training leaves no half-written directory behind.

    Only what Hydra wrote for this job is removed, and only when no run record exists yet: a
    user's own directory (`hydra.run.dir=.`) and earlier results are never touched.
    """
    from dgrun.run import RECORD_FILES

    if any((run_dir / f).exists() for f in RECORD_FILES):
        return
    import shutil

    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for log_file in run_dir.glob("dgrun.log"):
        log_file.unlink()
    try:
        run_dir.rmdir()
    except OSError:
        pass


def train_task(cfg) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dgrun.config import from_hydra, plain
    from dgrun.run import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None
        summary = run(from_hydra(cfg), run_dir, plain(cfg), job_num=job_num)
    except UserError as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # In a sweep the other jobs go on: record this one as failed, for the report.
            from dgrun.metrics import write_json

            print(f"dgrun: error: job {hydra_cfg.job.num}: {e}", file=sys.stderr)
            if not (run_dir / "summary.json").exists():
                write_json(run_dir / "summary.json", {"status": "failed", "error": str(e)})
            raise
        _cleanup_fresh_dir(run_dir)
        fail(e.problem, e.fix)
    if summary.get("status") == "preempted":
        # A signal stops the whole command, not just this job: a sweep must not go on to its
        # next job after SIGTERM. Re-running the same command resumes from the checkpoints.
        print(f"dgrun: preempted by {summary.get('stop_reason')}; checkpoint written to "
              f"{run_dir / 'checkpoints'}; run the same command again to resume", file=sys.stderr)
        sys.exit(0)
    return (summary.get("final") or {}).get("test_acc")


def _hydra_main(conf: Path) -> Callable[[], None]:
    import hydra

    return hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(train_task)


SUBCOMMANDS: dict[str, str] = {  # name -> "module:function", dispatched before Hydra
    "report": "dgrun.report:main",
    "slurm": "dgrun.slurm:main",
}


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, func = SUBCOMMANDS[argv[0]].split(":")
        sys.exit(getattr(importlib.import_module(module), func)(argv[1:]))

    register_schemas()
    conf = config_dir()
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    showing = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    modes = sum(map(bool, (args.run, args.cfg, args.multirun, args.shell_completion, args.info)))
    if modes > 1:
        fail("only one of --run, --multirun, --cfg, --info and --shell-completion can be given",
             "drop -m to show the config of one job (dgrun --cfg job ...)")
    if not showing:
        _validate_command_line(args)
    sys.argv = [sys.argv[0]] + argv
    _hydra_main(conf)()


if __name__ == "__main__":
    main()
