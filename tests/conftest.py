"""Shared helpers: run the real `dgrun` command in a subprocess and read its run directory."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One torch thread: faster on small CPU jobs and, with a fixed count, bitwise reproducible.
FAST = ["threads=1", "trainer.progress=plain"]


def dgrun(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dgrun.cli", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dgrun {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def train_here(run_dir: Path, *overrides: str) -> dict:
    """One run in this process, composed and trained as `dgrun OVERRIDES` would (without the
    CLI's .hydra/ record): no interpreter start-up, torch import or Hydra launch, ~5 s less
    per run on 2 cores. The CLI's own behaviour is tested through `dgrun` itself."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgrun.config import config_dir, from_hydra, plain, register_schemas
    from dgrun.run import run

    register_schemas()
    given = list(overrides)  # recorded as the command's overrides, as the CLI records them
    overrides = ["trainer.progress=none", "quiet=true", *given]
    if GlobalHydra.instance().is_initialized():  # inside a module's own composer fixture
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    return run(from_hydra(cfg), Path(run_dir), plain(cfg), overrides=given)


def composer(*base: str):
    """A module fixture's body: yields make(*overrides) -> (RunConfig, resolved config),
    composed from the shipped configs with `base` first, inside one Hydra initialization."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgrun.config import config_dir, from_hydra, plain, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        def make(*overrides: str):
            cfg = compose("config", overrides=[*base, *overrides])
            return from_hydra(cfg), plain(cfg)
        yield make
    GlobalHydra.instance().clear()


def train_job(make, run_dir: Path, *overrides: str) -> dict:
    """Train the run `make(*overrides)` composes into `run_dir` (overrides recorded)."""
    from dgrun.run import run

    cfg, config = make(*overrides)
    return run(cfg, run_dir, config, overrides=list(overrides))


def cli_here(capsys, *argv: str) -> tuple[int, str, str]:
    """A `dgrun` subcommand (report, show, list, inspect, analyze, --version) run in this
    process: (exit code, stdout, stderr). Training commands go through `dgrun` itself."""
    from dgrun import cli

    capsys.readouterr()
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


class NoHooks:
    """dgrun.train.fit's hooks for a test that calls the loop directly: nothing recorded."""

    def on_step(self, state): pass
    def on_eval(self, state, row): pass
    def save(self, state, reason): pass
    def stop_requested(self): return None
