"""Sweeps without a cluster: `dgrun slurm` expansion, rendering and submission (with a stand-in
sbatch), the batch script's signal handling, the launcher presets, local joblib determinism,
GPU spreading, and re-running a sweep into its own directory."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, dgrun, read_metrics, read_summary
from dgrun import cli, slurm
from dgrun.runtime import resolve_device

# Long enough to be signalled mid-run (dropout: in-model randomness must survive the resume).
LONG = ["model.dropout=0.1", "trainer.unit=step", "trainer.eval_every=5",
        "trainer.checkpoint_every=7", "trainer.max_epochs=60", *FAST]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in read_metrics(run_dir)]


def slurm_main(*argv: str) -> int:
    """`dgrun slurm ...` in this process: its return code, or the code it exited with."""
    try:
        return slurm.main(list(argv))
    except SystemExit as e:
        return e.code


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch and scontrol stand-ins that log their arguments (sbatch answers job id 77)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "slurm-calls.log"
    for name, answer in (("sbatch", "77"), ("scontrol", "")):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {shlex.quote(str(log))}\n'
                        + (f"echo {answer}\n" if answer else ""))
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


# ---------------------------------------------------------------- dgrun slurm: expansion, script
def test_dry_run_prints_the_array_script_and_the_tasks_and_writes_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = dgrun("slurm", "--dry-run", "--partition", "gpu", "--account", "lab", "--qos", "low",
                 "--gpus", "1", "--parallel", "2", "--time", "00:30:00", "--cpus", "3",
                 "--mem", "6G", "--setup", "module load cuda", "--sweep-dir", str(sweep), "--",
                 "corruption=partial_labels", "corruption.prob=0,0.5,1.0", "seed=0,1")
    out = proc.stdout
    for line in ["#SBATCH --array=0-5%2", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@120",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={sweep}/slurm/%A_%a.out",
                 "#SBATCH --time=00:30:00", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=6G",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=low",
                 "#SBATCH --gres=gpu:1", "module load cuda"]:
        assert line in out.splitlines(), line
    tasks = re.findall(r"^# (\d+): (.*)$", out, re.M)
    assert tasks == [(str(i), f"corruption=partial_labels corruption.prob={p} seed={s}")
                     for i, (p, s) in enumerate((p, s) for p in ("0", "0.5", "1.0") for s in "01")]
    assert "{{" not in out and not sweep.exists()
    script = out[:out.index("\n# ", out.index("exit \"$rc\""))]
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_a_bad_combination_fails_before_submission_with_dgruns_one_line(tmp_path, fake_slurm,
                                                                       capsys):
    sweep = tmp_path / "sweep"
    code = slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1", "model=mlp1,mlp9")
    slurm_err = capsys.readouterr().err.strip()
    with pytest.raises(SystemExit) as e:
        cli.main(["-m", "seed=0,1", "model=mlp1,mlp9"])
    assert code == e.value.code == 2
    assert slurm_err == capsys.readouterr().err.strip()  # the same line as `dgrun -m`
    assert slurm_err.startswith("dgrun: error: unknown model 'mlp9'") and "\n" not in slurm_err
    assert not sweep.exists() and not fake_slurm.exists()  # nothing written, nothing submitted


@pytest.mark.parametrize("args, message", [
    (["--time", "soon"], "--time soon is not a Slurm time"),
    (["--time", "2", "--signal-s", "300"], "--signal-s 300 must be below the time limit"),
    (["--mem", "lots"], "--mem lots is not a Slurm memory size"),
    (["--", "-m", "seed=0,1"], "'-m' after --: only overrides go there"),
    (["--", "hydra.run.dir=/x"], "hydra.run.dir is set per task by dgrun slurm"),
    (["--", "seed=0,1", "+probes.transitions={}\nseed=5"], "the override '+probes.transitions={}"
                                                             "\\nseed=5' holds a line break"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, fake_slurm, capsys, args, message):
    assert slurm_main("--sweep-dir", str(tmp_path / "s"), *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dgrun: error: {message}") and "\n" not in err
    assert not fake_slurm.exists()


def test_without_sbatch_on_path_it_says_so_in_one_line(tmp_path):
    proc = dgrun("slurm", "--sweep-dir", str(tmp_path / "s"), "--", "seed=0,1",
                 env={"PATH": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dgrun: error: sbatch is not on PATH: dgrun slurm submits to Slurm from a login node; "
        "run it where sbatch works, or add --dry-run to see the script"]
    assert not (tmp_path / "s").exists()


def test_submission_writes_the_sweep_and_returns_at_once(tmp_path, fake_slurm, capsys):
    sweep = tmp_path / "sweep"
    assert slurm_main("--sweep-dir", str(sweep), "--parallel", "2", "--",
                      "seed=0,1,2", "trainer.max_epochs=3") == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job array 77: 3 tasks, at most 2 at once")
    for command in ("squeue -j 77", "sacct -j 77", f"dgrun report {sweep}"):
        assert command in out
    assert fake_slurm.read_text() == f"sbatch --parsable {sweep}/slurm/array.sbatch\n"
    assert (sweep / "tasks.txt").read_text().splitlines() == [
        f"seed={s} trainer.max_epochs=3" for s in range(3)]
    assert "#SBATCH --array=0-2%2" in (sweep / "slurm" / "array.sbatch").read_text()
    assert (sweep / "slurm" / "jobs.txt").read_text().startswith("77\t")
    # The same sweep again (a bigger budget is fine) resumes; another sweep there is refused.
    assert slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1,2", "trainer.max_epochs=9") == 0
    assert slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1,3") == 2
    assert "holds another sweep (task 2" in capsys.readouterr().err
    assert len((sweep / "slurm" / "jobs.txt").read_text().splitlines()) == 2


def tasks_file_of(script: Path) -> Path:
    """The task list an array script reads."""
    return Path(shlex.split(re.search(r"^TASKS=(.*)$", script.read_text(), re.M).group(1))[0])


def test_each_submission_writes_its_own_tasks_file_whole(tmp_path, fake_slurm):
    """An array reads its task list while it runs (pending tasks start later): a resubmission
    into the sweep dir writes a new file and leaves the earlier array's file as it was."""
    sweep = tmp_path / "sweep"
    assert slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1", "trainer.max_epochs=3") == 0
    first = tasks_file_of(sweep / "slurm" / "array.sbatch")
    text = first.read_text()
    assert first.parent == sweep / "slurm" and text.splitlines() == [
        "0 seed=0 trainer.max_epochs=3", "1 seed=1 trainer.max_epochs=3"]
    assert slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1", "trainer.max_epochs=9") == 0
    second = tasks_file_of(sweep / "slurm" / "array.sbatch")
    assert second != first and first.read_text() == text
    assert second.read_text().splitlines()[1] == "1 seed=1 trainer.max_epochs=9"
    assert (sweep / "tasks.txt").read_text().splitlines()[1] == "seed=1 trainer.max_epochs=9"
    assert not [p for p in (sweep / "slurm").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["", "1 seed=1", "0 'seed=0"])
def test_a_task_whose_line_is_not_its_own_fails_loudly_and_trains_nothing(tmp_path, fake_slurm,
                                                                          damage):
    """A missing line, another task's line (a line break split an earlier one) or a line that
    does not parse: before, the task trained the default config into its directory."""
    sweep = tmp_path / "sweep"
    assert slurm_main("--sweep-dir", str(sweep), "--", "seed=0,1") == 0
    script = sweep / "slurm" / "array.sbatch"
    tasks_file_of(script).write_text(damage + "\n" if damage else "")
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "0"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "job 77_0: line 1 of" in proc.stdout and "not training" in proc.stdout
    assert not (sweep / "0").exists()


def test_the_batch_script_forwards_usr2_checkpoints_and_requeues_itself(tmp_path, fake_slurm):
    """The rendered script run by bash as Slurm would run task 0: USR2 reaches dgrun through
    the shell and the task requeues itself; TERM stops it without a requeue; the next start
    resumes. (That the resumed run ends exactly like an uninterrupted one: test_resume.py, and
    on a real cluster test_slurm.py.)"""
    sweep = tmp_path / "sweep"
    assert slurm_main("--sweep-dir", str(sweep), "--", *LONG) == 0
    script = sweep / "slurm" / "array.sbatch"
    run_dir = sweep / "0"

    def task(restart: int, sig=None, after_rows: int = 0) -> int:
        env = {**os.environ, "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "0",
               "SLURM_RESTART_COUNT": str(restart)}
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if sig is not None:
            deadline = time.monotonic() + 120
            while not (run_dir / "metrics.csv").exists() or len(read_metrics(run_dir)) < after_rows:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.01)
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out

    rc, out = task(0, signal.SIGUSR2, after_rows=20)
    summary = read_summary(run_dir)
    assert rc == 0 and summary["status"] == "preempted", out
    assert summary["stop_reason"] == "SIGUSR2"
    assert fake_slurm.read_text().splitlines()[-1] == "scontrol requeue 77_0"
    first_stop = summary["steps"]

    rc, out = task(1, signal.SIGTERM, after_rows=len(read_metrics(run_dir)) + 10)
    summary = read_summary(run_dir)
    assert rc == 0 and summary["status"] == "preempted" and summary["stop_reason"] == "SIGTERM"
    assert "scontrol requeue" not in "".join(fake_slurm.read_text().splitlines()[2:]), out

    rc, out = task(2)
    summary = read_summary(run_dir)
    assert rc == 0 and summary["status"] == "completed", out
    assert summary["resumed_at_steps"][0] == first_stop and len(summary["resumed_at_steps"]) == 2
    assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(0, 721, 5))
    assert "job 77_0: start #2" in out


# ---------------------------------------------------------------- launcher presets
def test_the_launcher_presets_compose_with_the_plugins_keys():
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    from dgrun.config import register_schemas

    register_schemas()
    with initialize_config_dir(str(cli.config_dir()), version_base="1.3"):
        slurm_cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=p",
                                       "hydra.launcher.account=a", "hydra.launcher.qos=q"],
                            return_hydra_config=True).hydra.launcher
        local_cfg = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm_cfg._target_.endswith("SlurmLauncher")
    assert set(slurm_cfg) <= set(SlurmQueueConf.__dataclass_fields__)
    assert (slurm_cfg.partition, slurm_cfg.account, slurm_cfg.qos) == ("p", "a", "q")
    assert slurm_cfg.max_num_timeout > 0 and slurm_cfg.signal_delay_s > 0
    assert local_cfg._target_.endswith("JoblibLauncher") and local_cfg.n_jobs == 2


# ---------------------------------------------------------------- local parallel sweeps
def test_a_joblib_sweep_seeds_each_job_inside_it(tmp_path):
    """seed=1,0,0 with two workers: the third job runs in a reused worker process and still
    gives exactly the numbers of the second."""
    sweep = tmp_path / "sweep"
    dgrun("-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "seed=1,0,0",
          "model.dropout=0.1", "trainer.max_epochs=15", "trainer.stop_at_interpolation=false",
          *FAST)
    runs = [comparable(sweep / str(i)) for i in range(3)]
    assert all(read_summary(sweep / str(i))["status"] == "completed" for i in range(3))
    assert runs[1] == runs[2] and len(runs[1]) == 16
    assert runs[0] != runs[1]


@pytest.mark.parametrize("count, job_num, expected", [
    (1, None, "cuda"), (1, 3, "cuda"), (4, None, "cuda"),
    (4, 0, "cuda:0"), (4, 1, "cuda:1"), (4, 5, "cuda:1"), (3, 7, "cuda:1"),
])
def test_device_auto_spreads_sweep_jobs_over_the_visible_gpus(monkeypatch, count, job_num,
                                                             expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert resolve_device("auto", job_num) == torch.device(expected)
    assert resolve_device("cuda:0", job_num) == torch.device("cuda:0")  # explicit choice wins


def test_without_cuda_auto_is_the_cpu_whatever_the_job(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == torch.device("cpu")


def test_a_sweep_job_hands_its_number_to_the_run(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    import dgrun.run
    from dgrun.config import register_schemas

    seen = []
    monkeypatch.setattr(dgrun.run, "run", lambda cfg, run_dir, config, job_num=None, **kw:
                        seen.append(job_num) or {"final": {"test_acc": 1.0}})
    register_schemas()
    try:
        for mode in (RunMode.MULTIRUN, RunMode.RUN):
            with initialize_config_dir(str(cli.config_dir()), version_base="1.3"):
                cfg = compose("config", ["seed=1"], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.mode, cfg.hydra.job.num = mode, 6
                cfg.hydra.runtime.output_dir = "unused"
            HydraConfig.instance().set_config(cfg)
            assert cli.train_task(cfg) == 1.0
    finally:
        HydraConfig.instance().cfg = None
    assert seen == [6, None]


# ---------------------------------------------------------------- re-running a sweep
def test_rerunning_a_killed_sweep_into_its_dir_resumes_the_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", "seed=0,1,2", "trainer.max_epochs=40",
            "trainer.stop_at_interpolation=false", "trainer.checkpoint_every=5", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "dgrun.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Kill the whole sweep once job 1 is past its second checkpoint (job 0 has finished).
    while not ((sweep / "1" / "metrics.csv").exists() and len(read_metrics(sweep / "1")) > 12):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done_before = (sweep / "0" / "metrics.csv").read_text()
    assert read_summary(sweep / "0")["status"] == "completed"
    assert read_summary(sweep / "1")["status"] == "running"
    assert not (sweep / "2" / "summary.json").exists()

    rerun = dgrun(*args)
    assert "already finished" in rerun.stdout + rerun.stderr
    summaries = [read_summary(sweep / str(i)) for i in range(3)]
    assert [s["status"] for s in summaries] == ["completed"] * 3
    assert [s["steps"] for s in summaries] == [480] * 3
    assert (sweep / "0" / "metrics.csv").read_text() == done_before  # not trained again
    resumed = summaries[1]["resumed_at_steps"]
    assert len(resumed) == 1 and resumed[0] >= 120 and resumed[0] % 60 == 0
    assert summaries[2]["resumed_at_steps"] == []

    # A bigger budget continues every job where it ended.
    dgrun(*[a.replace("max_epochs=40", "max_epochs=45") for a in args])
    assert [read_summary(sweep / str(i))["resumed_at_steps"][-1] for i in range(3)] == [480] * 3
    assert [read_summary(sweep / str(i))["steps"] for i in range(3)] == [540] * 3


# ---------------------------------------------------------------- preemption inside submitit jobs
def test_in_a_submitit_slurm_job_a_preempted_run_never_ends_with_a_result(monkeypatch):
    """submitit records a job whose function returns as a success, and Hydra's launcher stops
    waiting for it. After a signal the previous handler did not turn into a requeue-and-exit
    (SIGTERM: submitit only logs it), dgrun's job must end without a result."""
    from dgrun.preemption import PreemptionGuard

    seen = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: (lambda *a: seen.append(sig)))
    guard = PreemptionGuard()
    with guard:
        guard._handle(signal.SIGTERM, None)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    guard.forward()  # a plain run: the old handler is called, and the run returns
    assert seen == [signal.SIGTERM]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(SystemExit) as e:
        guard.forward()
    assert e.value.code == 128 + signal.SIGTERM and seen == [signal.SIGTERM] * 2
