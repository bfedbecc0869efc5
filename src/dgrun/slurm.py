"""`dgrun slurm`: submit a sweep as ONE Slurm job array, print how to watch it, and return.

    dgrun slurm [--partition P] [--time 01:00:00] [--cpus 2] [--mem 4G] [--gpus 0]
                [--parallel P] [--account A] [--qos Q] [--setup 'module load ...']
                [--sweep-dir DIR] [--dry-run] -- corruption.prob=0,0.5,1.0 seed=0,1

The overrides use Hydra's sweep syntax and are expanded exactly as `dgrun -m` expands them
(the config's `hydra.sweeper.params` too); every combination is composed and validated first,
so a bad override stops here with dgrun's usual one line (exit 2) and nothing is submitted.
Task i of the array trains `dgrun <its overrides> hydra.run.dir=<sweep dir>/i`, the layout of
`dgrun -m`. Nothing stays running on the login node: unlike `dgrun -m hydra/launcher=slurm`,
which waits for every job, this exits as soon as sbatch has the array.

Written into the sweep dir: tasks.txt (one shell-quoted override line per task: the sweep, which
a resubmission must match), slurm/tasks-<time>.txt (this submission's own copy, each line
led by its task number, which its array reads: a later submission never changes it),
slurm/array.sbatch (the script submitted, rendered from the template slurm/array.sbatch),
slurm/<array id>_<task>.out (each task's log) and slurm/jobs.txt (one line per submission).
Preemption: Slurm sends USR2 `--signal-s` seconds before the time limit; the task checkpoints
and requeues itself and resumes from its checkpoint. Submitting the same sweep again into the
same --sweep-dir resumes every unfinished task (finished ones end at once).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import Optional

from dgrun.errors import UserError
from dgrun.files import write_text

SBATCH_TIMEOUT_S = 120


class SbatchTemplate(string.Template):
    """`{{name}}` fields, so that the script's own `$VARS` need no escaping."""

    delimiter = "{{"
    # named: {{name}}; invalid: any other "{{" (a typo in the template fails loudly)
    pattern = (r"\{\{(?:(?P<named>[a-z_][a-z0-9_]*)\}\}"
               r"|(?P<escaped>(?!))|(?P<braced>(?!))|(?P<invalid>))")


def template_path() -> Path:
    """The shipped template: `dgrun/templates/array.sbatch` in a wheel, `slurm/` in a checkout."""
    here = Path(__file__).resolve().parent
    candidates = (here / "templates" / "array.sbatch", here.parents[1] / "slurm" / "array.sbatch")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError("the sbatch template array.sbatch is missing from this installation",
                    "pass one with --template FILE, or reinstall dgrun")


# ---------------------------------------------------------------- arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgrun slurm",
        description="Submit a sweep as one Slurm job array and return (fire and forget).",
        epilog="example: dgrun slurm --partition gpu --gpus 1 --time 02:00:00 -- "
               "corruption.prob=0,0.5,1.0 seed=0,1")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                   help="Hydra overrides in sweep syntax (after --), e.g. seed=0,1 model=mlp1,mlp3")
    p.add_argument("--partition", help="sbatch --partition (default: the cluster's default)")
    p.add_argument("--time", default="01:00:00",
                   help="time limit of each task, e.g. 30, 02:00:00, 1-00:00:00 (default 01:00:00)")
    p.add_argument("--cpus", type=int, default=2, help="CPU cores per task (default 2)")
    p.add_argument("--mem", default="4G", help="memory per task, e.g. 4G, 500M (default 4G)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per task, as --gres=gpu:N (default 0)")
    p.add_argument("--parallel", type=int,
                   help="at most this many tasks run at once (--array=0-N%%P; default: all)")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--qos", help="sbatch --qos")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before dgrun, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="any other sbatch option, e.g. --sbatch-arg=--constraint=a100 (repeatable)")
    p.add_argument("--signal-s", type=int, default=120,
                   help="send USR2 this many seconds before the time limit: the task checkpoints "
                        "and requeues itself (default 120)")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeues at the time limit per task before it counts as failed "
                        "(default 10)")
    p.add_argument("--job-name", default="dgrun", help="sbatch --job-name (default dgrun)")
    p.add_argument("--sweep-dir", type=Path,
                   help="where the runs go (default: hydra.sweep.dir, multirun/DATE/TIME)")
    p.add_argument("--template", type=Path, help="another sbatch template (default: the shipped "
                                                  "slurm/array.sbatch)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the task list; write and submit nothing")
    return p


def time_seconds(text: str) -> Optional[int]:
    """Slurm's --time formats in seconds (None: no limit); ValueError when it is none of them."""
    if text.lower() in ("infinite", "unlimited"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(text)
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # M, M:S


def check_options(args: argparse.Namespace) -> None:
    try:
        limit = time_seconds(args.time)
    except ValueError:
        raise UserError(f"--time {args.time} is not a Slurm time", "use MM, HH:MM:SS or D-HH:MM:SS")
    if limit is not None and not 0 <= args.signal_s < limit:
        raise UserError(f"--signal-s {args.signal_s} must be below the time limit ({limit} s)",
             "lower --signal-s or raise --time")
    if not re.fullmatch(r"\d+[KMGT]?", args.mem):
        raise UserError(f"--mem {args.mem} is not a Slurm memory size", "use e.g. 4G or 500M")
    for name, low in (("cpus", 1), ("gpus", 0), ("parallel", 1), ("max_requeues", 0),
                      ("signal_s", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {low}")
    for name in ("partition", "account", "qos", "job_name"):
        value = getattr(args, name)
        if value is not None and (not value or re.search(r"\s", value)):
            raise UserError(f"--{name.replace('_', '-')} {value!r} must be one word")
    for arg in args.sbatch_arg:
        if not arg.startswith("-") or "\n" in arg:
            raise UserError(f"--sbatch-arg {arg!r} is not an sbatch option",
                 "give it like --sbatch-arg=--constraint=a100")
    for override in args.overrides:
        one_line(override)
        if override.startswith("-"):
            raise UserError(f"'{override}' after --: only overrides go there",
                 "put dgrun slurm's options before --; it always sweeps (no -m needed)")
        if override.split("=", 1)[0].lstrip("+~") == "hydra.run.dir":
            raise UserError("hydra.run.dir is set per task by dgrun slurm (<sweep dir>/<task>)",
                 "choose where the sweep goes with --sweep-dir")


# ---------------------------------------------------------------- the sweep
def expand(overrides: list[str]) -> tuple[list[list[str]], str]:
    """Every task's overrides, as `dgrun -m` would run them, each validated; and hydra.sweep.dir."""
    from dgrun import compose

    tasks, master = compose.expand(overrides, multirun=True)
    return tasks, str(master.hydra.sweep.dir)


def one_line(override: str) -> None:
    """A task is one line of a tasks file: a line break in an override would split it, and
    every later task would read its neighbour's line."""
    if "\n" in override or "\r" in override:
        raise UserError(f"the override {override!r} holds a line break, which would split its "
                        "task's line in tasks.txt", "give the value on one line")


def task_lines(tasks: list[list[str]]) -> list[str]:
    for task in tasks:  # the config's own hydra.sweeper.params too
        for override in task:
            one_line(override)
    return [shlex.join(task) for task in tasks]


def numbered(lines: list[str]) -> str:
    """What an array reads: `<task> <overrides>` per line, so that a task finding another
    number, or none, at its line knows the file is not its own and fails loudly."""
    return "".join(f"{i} {line}".rstrip() + "\n" for i, line in enumerate(lines))


def new_tasks_file(sweep_dir: Path) -> Path:
    """A name no earlier submission into this sweep dir has used."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = sweep_dir / "slurm" / f"tasks-{stamp}.txt", 1
    while path.exists():
        n += 1
        path = sweep_dir / "slurm" / f"tasks-{stamp}-{n}.txt"
    return path


def check_sweep_dir(sweep_dir: Path, lines: list[str]) -> None:
    """A sweep dir that already holds a sweep takes only the same sweep again (to resume it);
    the budget and other keys a resumed run may change (dgrun.resume.RESUMABLE_KEYS) may differ."""
    from dgrun.resume import RESUMABLE_KEYS

    old_file = sweep_dir / "tasks.txt"
    if not old_file.is_file():  # a new sweep dir, or one of `dgrun -m` (same layout: resumes)
        return

    def fixed(line: str) -> dict:
        pairs = (o.split("=", 1) + [""] for o in shlex.split(line))
        return {k: v[0] for k, *v in pairs if k.lstrip("+~") not in RESUMABLE_KEYS}

    old = old_file.read_text().splitlines()
    if len(old) != len(lines):
        raise UserError(f"{sweep_dir} holds another sweep ({len(old)} tasks, this one has {len(lines)})",
             "use a new --sweep-dir, or the same overrides to resume that sweep")
    for i, (a, b) in enumerate(zip(old, lines)):
        if fixed(a) != fixed(b):
            raise UserError(f"{sweep_dir} holds another sweep (task {i}: {a!r} there, {b!r} here)",
                 "use a new --sweep-dir, or the same overrides to resume that sweep")


# ---------------------------------------------------------------- the script
def render(args: argparse.Namespace, n_tasks: int, sweep_dir: Path, workdir: Path,
           tasks_file: Path) -> str:
    options = [f"--partition={args.partition}" if args.partition else None,
               f"--account={args.account}" if args.account else None,
               f"--qos={args.qos}" if args.qos else None,
               f"--gres=gpu:{args.gpus}" if args.gpus else None, *args.sbatch_arg]
    fields = {
        "job_name": args.job_name, "last_task": n_tasks - 1,
        "parallel": args.parallel or n_tasks, "time": args.time, "cpus": args.cpus,
        "mem": args.mem, "signal_s": args.signal_s, "max_requeues": args.max_requeues,
        "sweep_dir": str(sweep_dir), "sweep_dir_q": shlex.quote(str(sweep_dir)),
        "workdir_q": shlex.quote(str(workdir)), "tasks_file_q": shlex.quote(str(tasks_file)),
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options if o),
        "setup": "\n".join(args.setup),
        "python": shlex.quote(sys.executable),
        "dgrun": shlex.join([sys.executable, "-m", "dgrun.cli"]),
    }
    path = args.template or template_path()
    try:
        return SbatchTemplate(path.read_text()).substitute(fields)
    except OSError as e:
        raise UserError(f"cannot read the template {path}: {e.strerror}")
    except KeyError as e:
        raise UserError(f"the template {path} has an unknown field {{{{{e.args[0]}}}}}",
             f"fields: {', '.join(sorted(fields))}")
    except ValueError as e:
        raise UserError(f"the template {path} is malformed: {e}")


def submit(script: Path) -> str:
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                              text=True, timeout=SBATCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer within {SBATCH_TIMEOUT_S} s", "is slurmctld up? try `sinfo`")
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise UserError(f"sbatch refused the job array: {message}", f"the script is {script}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch gave no job id (it printed {proc.stdout.strip()!r})")
    return job_id


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except UserError as e:
        print(f"dgrun: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: dgrun slurm submits to Slurm from a login node",
             "run it where sbatch works, or add --dry-run to see the script")
    check_options(args)
    tasks, default_dir = expand(args.overrides)
    workdir = Path.cwd()
    sweep_dir = Path(os.path.abspath(args.sweep_dir or default_dir))
    if re.search(r"[\s%]", str(sweep_dir)):
        raise UserError(f"the sweep dir {sweep_dir} has a space or a %, which Slurm's --output can't take",
             "choose another --sweep-dir")
    lines = task_lines(tasks)
    tasks_file = new_tasks_file(sweep_dir)
    script = render(args, len(tasks), sweep_dir, workdir, tasks_file)
    if args.dry_run:
        print(script, end="" if script.endswith("\n") else "\n")
        print(f"# {sweep_dir}/tasks.txt ({len(lines)} task{'s' * (len(lines) != 1)}; "
              f"task i trains into {sweep_dir}/i)")
        for i, line in enumerate(lines):
            print(f"# {i}: {line}")
        print(f"# dry run: nothing written; would submit: sbatch --parsable "
              f"{sweep_dir}/slurm/array.sbatch")
        return 0

    check_sweep_dir(sweep_dir, lines)
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    # Whole files or none: an array of an earlier submission may be reading its own file now.
    write_text(tasks_file, numbered(lines), fsync=True)
    write_text(sweep_dir / "tasks.txt", "".join(line + "\n" for line in lines), fsync=True)
    script_path = write_text(sweep_dir / "slurm" / "array.sbatch", script, fsync=True)
    job_id = submit(script_path)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(sweep_dir / "slurm" / "jobs.txt", "a") as f:
        f.write(f"{job_id}\t{stamp}\tdgrun slurm {shlex.join(argv)}\n")
    sweep_q = shlex.quote(str(sweep_dir))
    print(f"submitted job array {job_id}: {len(tasks)} task{'s' * (len(tasks) != 1)}, "
          f"at most {args.parallel or len(tasks)} at once")
    print(f"sweep dir: {sweep_dir}")
    print(f"  squeue -j {job_id}                  # waiting / running tasks")
    print(f"  sacct -j {job_id} -X                # state of every task")
    print(f"  tail -f {sweep_q}/slurm/{job_id}_0.out   # a task's log")
    print(f"  dgrun report {sweep_q}    # tables and figures, for the runs finished so far")
    return 0
