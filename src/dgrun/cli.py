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

import difflib
import logging
import os
import re
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


# ---------------------------------------------------------------- Hydra errors, in one line
def _known_keys(cfg_node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg_node.keys() if isinstance(cfg_node, DictConfig) else []:
        full = f"{prefix}{k}"
        keys.append(full)
        try:
            keys += _known_keys(cfg_node._get_node(k), full + ".")
        except Exception:
            pass
    return keys


def explain(error: BaseException, base_cfg=None) -> tuple[str, str]:
    """Turn a Hydra/OmegaConf composition error into (problem, fix)."""
    text = str(error)
    cause = str(error.__cause__ or "")
    both = text + "\n" + cause
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, choice = m.groups()
        options = re.findall(r"^\t(\S+)$", text, re.M)
        return (f"unknown {group} '{choice}'",
                f"choose one of: {', '.join(options)}" if options else f"see `dgrun --help`")
    m = re.search(r"Key '([^']+)' is not in struct", both) or re.search(
        r"Could not override '([^']+)'", text)
    if m:
        full = re.search(r"full_key: (\S+)", both)
        key = full.group(1) if full else m.group(1)
        close = difflib.get_close_matches(key, _known_keys(base_cfg), n=1) if base_cfg else []
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown config key '{key}'", f"{hint}`dgrun --cfg job` lists every key"
    m = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", both)
    if m:
        full = re.search(r"full_key: (\S+)", both)
        key = full.group(1) if full else "a value"
        return f"{key}={m.group(1)} is not of type {m.group(2)}", f"give {key} a value of type {m.group(2).lower()}"
    if "Ambiguous value for argument" in text:
        return text.splitlines()[0], "add -m (--multirun) to sweep over several values"
    first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
    return first.strip(), "see `dgrun --help`"


# ---------------------------------------------------------------- validation before Hydra runs
def _compose_all(args, conf: Path) -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from dgrun.config import from_hydra

    search_path = create_config_search_path(str(conf))
    if args.config_dir:
        extra = os.path.abspath(args.config_dir)
        if not os.path.isdir(extra):
            fail(f"--config-dir {extra} does not exist", "pass an existing directory")
        search_path.prepend("command-line", f"file://{extra}")
    hydra = Hydra.create_main_hydra2(task_name="dgrun", config_search_path=search_path)
    name = args.config_name or "config"
    try:
        base = hydra.compose_config(name, [], run_mode=RunMode.RUN)
    except Exception:
        base = None
    try:
        if args.multirun:
            parsed = OverridesParser.create().parse_overrides(args.overrides)
            combos = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        else:
            combos = [list(args.overrides)]
        for overrides in combos[:MAX_PREVALIDATED]:
            mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
            cfg = hydra.compose_config(name, overrides, run_mode=mode)
            from_hydra(cfg)
    except UserError as e:
        fail(e.problem, e.fix)
    except Exception as e:  # Hydra's and OmegaConf's composition errors
        fail(*explain(e, base))
    finally:
        GlobalHydra.instance().clear()


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
        _compose_all(args, conf)
    sys.argv = [sys.argv[0]] + argv
    _hydra_main(conf)()


if __name__ == "__main__":
    main()
