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
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

from dgrun.config import config_dir, register_schemas
from dgrun.errors import UserError
from dgrun.rundir import DirectoryHeld

EXIT_FAILED = 1  # the run could not go on (a full disk): not a usage error
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells and schedulers read as "interrupted"
MAX_PREVALIDATED = 256  # sweeps larger than this are validated job by job instead

# The nearest folder above the run directory that existed before this command: a run refused
# before training removes the folders it created (outputs/DATE/TIME) up to there, no further.
_existing_ancestor: Optional[Path] = None
_run_dir: Optional[Path] = None  # the job's directory, once Hydra has made it


def fail(problem: str, fix: str = "") -> None:
    print(f"dgrun: error: {problem}" + (f"; {fix}" if fix else ""), file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _validate_command_line(args):
    """Compose and validate every job this command line would run, before Hydra starts any,
    and check that the run (or sweep) directory can be made. Returns the composed config of
    the command (one run: the very config that run gets)."""
    global _existing_ancestor
    from omegaconf import OmegaConf

    from dgrun.compose import expand

    if args.config_dir and not os.path.isdir(args.config_dir):
        fail(f"--config-dir {os.path.abspath(args.config_dir)} does not exist",
             "pass an existing directory")
    try:
        # One run gets hydra.mode=RUN as hydra.main gives it (its record lists the override).
        mode = [] if args.multirun else ["hydra.mode=RUN"]
        _, master = expand(list(args.overrides) + mode, multirun=bool(args.multirun),
                           config_dir_extra=args.config_dir,
                           config_name=args.config_name or "config", limit=MAX_PREVALIDATED)
    except UserError as e:
        fail(e.problem, e.fix)
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    try:
        target = Path(os.path.abspath(str(OmegaConf.select(master, key))))
    except Exception:  # an interpolation only Hydra's job context can resolve
        return master
    _existing_ancestor = next(p for p in (target, *target.parents) if p.exists())
    if not _existing_ancestor.is_dir():
        fail(f"cannot make {key}={target}: {_existing_ancestor} is a file",
             f"choose another {key}")
    if _existing_ancestor != target:
        try:  # a folder that cannot be made (/proc/x, a read-only disk) fails here, not in Hydra
            os.rmdir(tempfile.mkdtemp(dir=_existing_ancestor, prefix=".dgrun-check-"))
        except OSError as e:
            fail(f"cannot make {key}={target}: {e.strerror}", f"choose a writable {key}")
    return master


# ---------------------------------------------------------------- the training task
def _cleanup_fresh_dir(run_dir: Path) -> None:
    """A run that failed before training leaves no half-written directory behind.

    Only what dgrun wrote for this job is removed, and only when no run record exists: a
    user's own directory (`hydra.run.dir=.`) and earlier results are never touched.
    """
    from dgrun.rundir import RunDir

    record = RunDir(run_dir)
    if record.has_record():
        return
    record.clear()
    log_file = run_dir / "dgrun.log"
    if log_file.is_file():
        log_file.unlink()
    for folder in (run_dir, *run_dir.parents):
        if _existing_ancestor is None or folder == _existing_ancestor or \
                _existing_ancestor not in folder.parents:
            break
        try:
            folder.rmdir()  # only if empty: a folder holding anything stays
        except OSError:
            break


def write_hydra_record(record, hydra_cfg, cfg) -> None:
    """`.hydra/` as Hydra would write it, but only once the run is going to train.

    The root config sets `hydra.output_subdir: null`, so Hydra itself writes nothing into the
    run directory: a command refused there (another config) leaves the record as it was.
    """
    from omegaconf import OmegaConf

    from dgrun.files import write_text

    files = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": OmegaConf.create(list(hydra_cfg.overrides.task))}
    for name, node in files.items():
        write_text(record.claim(record.hydra / name), OmegaConf.to_yaml(node))


def _parallel_jobs(hydra_cfg) -> int:
    """Jobs a local parallel sweep (hydra/launcher=local, joblib) runs at once."""
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "joblib" in str(
        hydra_cfg.launcher.get("_target_", "")) else None
    if n_jobs is None:
        return 1
    return (os.cpu_count() or 1) if int(n_jobs) < 0 else max(1, int(n_jobs))


def train_task(cfg) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dgrun.config import from_hydra, plain
    from dgrun.run import run

    global _run_dir
    hydra_cfg = HydraConfig.get()
    run_dir = _run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    def on_start(record) -> None:
        write_hydra_record(record, hydra_cfg, cfg)
        if not cfg.get("quiet"):
            from dgrun.console import show_config

            show_config(cfg, run_dir)

    try:
        summary = run(from_hydra(cfg), run_dir, plain(cfg),
                      job_num=hydra_cfg.job.num if multirun else None,
                      overrides=list(hydra_cfg.overrides.task), on_start=on_start,
                      parallel_jobs=_parallel_jobs(hydra_cfg) if multirun else 1)
    except DirectoryHeld as e:
        # Another live command owns the directory: not one byte of it is ours to touch.
        if multirun:
            print(f"dgrun: error: job {hydra_cfg.job.num}: {e}", file=sys.stderr)
            raise
        fail(e.problem, e.fix)
    except OSError as e:
        # A full or read-only disk mid-run: what was written stays (the last checkpoint, the
        # rows), the record says failed if it could be written; one line, not a traceback.
        where = f" ({e.filename})" if e.filename else ""
        print(f"dgrun: error: {run_dir}: cannot write{where}: {e.strerror or e}; what was "
              "written before is intact: free space (or fix the disk) and run the same command "
              "again to resume", file=sys.stderr)
        if multirun:
            raise
        sys.exit(EXIT_FAILED)
    except UserError as e:
        if multirun:
            # In a sweep the other jobs go on: record this one as failed, for the report.
            from dgrun.files import write_json

            print(f"dgrun: error: job {hydra_cfg.job.num}: {e}", file=sys.stderr)
            if run_dir.is_dir() and not (run_dir / "summary.json").exists():
                write_json(run_dir / "summary.json", {"status": "failed", "error": str(e)})
            raise
        _cleanup_fresh_dir(run_dir)
        fail(e.problem, e.fix)
    if not cfg.get("quiet") and summary:
        from dgrun.console import show_summary

        show_summary(summary, run_dir)
    if summary.get("status") == "preempted":
        # A signal stops the whole command, not just this job: a sweep must not go on to its
        # next job after SIGTERM. Re-running the same command resumes from the checkpoints.
        # Ctrl-C is the user's interrupt: exit 130 like any interrupted program (a shell's
        # `&&`, `set -e` and schedulers see it); a scheduler's signal is a clean stop (0).
        interrupted = summary.get("stop_reason") == "SIGINT"
        print(f"dgrun: {'interrupted' if interrupted else 'preempted'} by "
              f"{summary.get('stop_reason')} at step {summary.get('steps')}; checkpoint written "
              f"to {run_dir / 'checkpoints'}; run the same command again to resume",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED if interrupted else 0)
    return (summary.get("final") or {}).get("test_acc")


def _hydra_main(conf: Path) -> Callable[[], None]:
    import hydra

    return hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(train_task)


SUBCOMMANDS: dict[str, str] = {  # name -> "module:function", dispatched before Hydra
    "report": "dgrun.report:main",
    "slurm": "dgrun.slurm:main",
    "list": "dgrun.catalog:list_main",
    "inspect": "dgrun.catalog:inspect_main",
    "show": "dgrun.show:main",
    "analyze": "dgrun.analysis.command:main",
}


def _version() -> str:
    import platform

    from dgrun import __version__

    try:
        import hydra
        import torch

        return (f"dgrun {__version__} (torch {torch.__version__}, hydra {hydra.__version__}, "
                f"python {platform.python_version()})")
    except ImportError:
        return f"dgrun {__version__}"


def _check_command(word: str) -> None:
    """A bare word where an override should be is a mistyped subcommand (`dgrun repotr`)."""
    import difflib

    if "=" in word or word.startswith(("-", "+", "~")):
        return
    close = difflib.get_close_matches(word, list(SUBCOMMANDS), n=1, cutoff=0.5)
    hint = f"did you mean `dgrun {close[0]}`? " if close else ""
    fail(f"unknown command '{word}'", f"{hint}commands: {', '.join(SUBCOMMANDS)}; "
         "or give overrides like model=mlp3 (dgrun --help)")


def _interrupted(signum=None, frame=None) -> None:
    """Ctrl-C outside training (imports, composition, data loading): one line, no traceback,
    no half-made run directory. Training has its own handler (dgrun.preemption), which
    checkpoints first.

    It ends the process at once, from the signal handler itself: a KeyboardInterrupt raised in
    the middle of an import can be swallowed there and resurface as an unrelated error."""
    if _run_dir is not None:
        _cleanup_fresh_dir(_run_dir)
    print("dgrun: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def main(argv: Optional[list[str]] = None) -> None:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupted)
    try:
        _main(argv)
    except KeyboardInterrupt:  # a second Ctrl-C during training
        _interrupted()
    finally:  # called from Python (tests, notebooks): leave Ctrl-C as it was
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if argv is None:  # the command itself, about to exit
            _skip_exit_collection()


def _skip_exit_collection() -> None:
    """Spare the exiting command Python's last garbage collection (dgrun.heap): ~0.6 s a
    process after torch. Nothing of the run depends on it: dgrun closes and flushes its files
    itself, and atexit handlers (logging's flush) still run."""
    from dgrun import heap

    heap.freeze()


def _main(argv: Optional[list[str]]) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, func = SUBCOMMANDS[argv[0]].split(":")
        sys.exit(getattr(importlib.import_module(module), func)(argv[1:]))
    if argv and argv[0] in ("--version", "-V"):
        print(_version())
        return
    if argv:
        _check_command(argv[0])

    register_schemas()
    try:
        conf = config_dir()
    except UserError as e:
        fail(e.problem, e.fix)
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    showing = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    modes = sum(map(bool, (args.run, args.cfg, args.multirun, args.shell_completion, args.info)))
    if modes > 1:
        fail("only one of --run, --multirun, --cfg, --info and --shell-completion can be given",
             "drop -m to show the config of one job (dgrun --cfg job ...)")
    if showing:
        sys.argv = [sys.argv[0]] + argv
        _hydra_main(conf)()
        return
    master = _validate_command_line(args)
    from dgrun import heap

    heap.freeze()  # torch, Hydra and the config, alive to the end: no collection walks them
    if args.multirun or args.config_path or args.experimental_rerun:
        sys.argv = [sys.argv[0]] + argv
        _hydra_main(conf)()
    else:  # one run: on the config just composed and checked, not composed twice more
        from dgrun.compose import run_composed

        run_composed(master, train_task, config_dir_extra=args.config_dir,
                     config_name=args.config_name or "config")


if __name__ == "__main__":
    main()
