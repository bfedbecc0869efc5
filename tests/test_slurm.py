"""Sweeps on a REAL one-node Slurm cluster (slurm/local_cluster.sh): the submitit launcher
(`dgrun -m hydra/launcher=slurm`) and the fire-and-forget job array (`dgrun slurm`), each
finishing a sweep, surviving a preemption signal by requeue + resume, and reporting a crash.

    python -m pytest -m slurm tests/test_slurm.py        # brings the cluster up if it is down

The cluster has as many CPUs as this machine (2 here), so at most that many one-CPU jobs run at
once. Every wait has a timeout; jobs a test submitted are cancelled when it ends.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, ROOT, dgrun, read_metrics, read_summary

pytestmark = pytest.mark.slurm

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
# Submitit launcher resources: one core and 1 GB per job (the local node has 2 cores).
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=10"]
ARRAY = ["--cpus", "1", "--mem", "1G", "--time", "10"]
# ~1,800 steps (15-20 s) with dropout, so a signal lands mid-run and resume must restore RNGs.
LONG = ["model.dropout=0.1", "trainer.unit=step", "trainer.eval_every=5",
        "trainer.checkpoint_every=7", "trainer.max_epochs=150",
        "trainer.stop_at_interpolation=false", *FAST]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# ---------------------------------------------------------------- the cluster and its jobs
@pytest.fixture(scope="session")
def cluster():
    """The local cluster: brought up if it is down, and then taken down at the end."""
    status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    started = False
    if status.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("the local Slurm cluster is down and starting it needs root")
        up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
        if up.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh up failed:\n{up.stderr[-4000:]}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL)


def sh(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def job_ids(sweep: Path) -> list[str]:
    """Array job ids submitted into a sweep dir, by either path."""
    ids = [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()]
    jobs_txt = sweep / "slurm" / "jobs.txt"
    if jobs_txt.exists():
        ids += [line.split("\t")[0] for line in jobs_txt.read_text().splitlines()]
    return ids


@pytest.fixture
def sweeps(cluster):
    """Sweep dirs a test submits into; their jobs are cancelled when it ends, however it ends."""
    dirs: list[Path] = []
    yield dirs
    ids = [i for d in dirs for i in job_ids(d)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def task_states(job_id: str) -> dict[str, tuple[str, str]]:
    """{task id: (state, exit code)} of an array's tasks; pending ones show as ID_[a-b]."""
    out = sh("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode")
    states = {}
    for line in out.splitlines():
        task, state, code = line.split("|")
        states[task] = (state.split()[0], code)  # "CANCELLED by 0" -> CANCELLED
    return states


def wait_for(what: str, predicate, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll)


def wait_for_tasks(job_id: str, n: int, timeout: float = 240) -> list[tuple[str, str]]:
    """Waits until all n tasks have ended: their sorted (state, exit code)s. (A one-task array
    may be listed as ID or ID_0, so the task ids are not compared.)"""
    def finished():
        states = task_states(job_id)
        done = len(states) == n and all(s in TERMINAL and "[" not in t
                                        for t, (s, _) in states.items())
        return sorted(states.values()) if done else None
    return wait_for(f"the {n} task(s) of job {job_id} to end (sacct: {task_states(job_id)})",
                    finished, timeout, poll=1)


def rows(run_dir: Path) -> int:
    try:
        return len(read_metrics(run_dir))
    except (FileNotFoundError, OSError):
        return 0


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


def wait_requeued(job_id: str) -> str:
    """Waits until the job is back in the queue; its id as squeue lists it (ID_0 for a task of
    an array; submitit submits a one-job sweep as a plain job: ID)."""
    def pending():
        lines = sh("squeue", "-h", "-j", job_id, "-o", "%i %T").split()
        return lines[0] if lines[1:2] == ["PENDING"] else None
    return wait_for(f"job {job_id} to be requeued", pending, timeout=60)


def start_now(task: str) -> None:
    """A requeued job may not start for 120 s (Slurm's credential lifetime, AuthInfo
    cred_expire); the tests let it start sooner. Not at once: slurmd revokes the old run's
    credential, and a start in the same second is killed ("Job credential revoked", FAILED)."""
    time.sleep(4)
    sh("scontrol", "update", f"JobId={task}", "StartTime=now")


def assert_sweep_completed(sweep: Path, n: int) -> None:
    for i in range(n):
        summary = read_summary(sweep / str(i))
        assert summary["status"] == "completed" and summary["seed"] == i, summary
        assert (sweep / str(i) / ".hydra" / "config.yaml").exists()
        assert (sweep / str(i) / "checkpoints" / "last.pt").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """LONG trained locally, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    dgrun(*LONG, f"hydra.run.dir={run_dir}", timeout=300)
    return run_dir


# ---------------------------------------------------------------- (a) + (b): a sweep finishes
@pytest.fixture(scope="module")
def launcher_sweep(cluster, tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("launcher") / "sweep"
    try:
        dgrun("-m", *LAUNCHER, f"hydra.sweep.dir={sweep}", "seed=0,1,2", *FAST, timeout=300)
    finally:
        ids = job_ids(sweep)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    return sweep


def test_the_submitit_launcher_runs_a_sweep_into_its_job_dirs(launcher_sweep):
    assert_sweep_completed(launcher_sweep, 3)
    (job_id,) = job_ids(launcher_sweep)
    assert sorted(task_states(job_id).values()) == [("COMPLETED", "0:0")] * 3


def test_dgrun_slurm_submits_one_array_returns_and_the_sweep_finishes(sweeps, tmp_path,
                                                                      launcher_sweep):
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    started = time.monotonic()
    proc = dgrun("slurm", *ARRAY, "--parallel", "2", "--sweep-dir", str(sweep), "--",
                 "seed=0,1,2", *FAST, timeout=120)
    submit_s = time.monotonic() - started
    job_id = re.match(r"submitted job array (\d+): 3 tasks, at most 2 at once", proc.stdout)[1]
    assert f"sacct -j {job_id}" in proc.stdout and f"dgrun report {sweep}" in proc.stdout
    assert "ArrayTaskThrottle=2" in sh("scontrol", "show", "job", job_id)
    assert wait_for_tasks(job_id, 3) == [("COMPLETED", "0:0")] * 3
    assert_sweep_completed(sweep, 3)
    for i in range(3):
        assert (sweep / "slurm" / f"{job_id}_{i}.out").exists()
        # Same overrides by either path: the same numbers.
        assert comparable(sweep / str(i)) == comparable(launcher_sweep / str(i))
    print(f"dgrun slurm returned in {submit_s:.1f} s")


# ---------------------------------------------------------------- (c): preempted, requeued, resumed
def test_dgrun_slurm_task_signalled_near_its_time_limit_requeues_and_resumes(sweeps, tmp_path,
                                                                             reference):
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    proc = dgrun("slurm", *ARRAY, "--sweep-dir", str(sweep), "--", *LONG, timeout=120)
    job_id = re.match(r"submitted job array (\d+)", proc.stdout)[1]
    task, run_dir = f"{job_id}_0", sweep / "0"
    wait_for("20 evaluations", lambda: rows(run_dir) >= 20, timeout=120, poll=0.05)
    # What Slurm does --signal-s before the time limit: USR2 to the batch shell only.
    sh("scancel", "--batch", "--signal=USR2", task)
    signalled = time.monotonic()
    assert wait_requeued(job_id) == task
    delay = time.monotonic() - signalled
    stopped = read_summary(run_dir)
    assert stopped["status"] == "preempted" and stopped["stop_reason"] == "SIGUSR2"
    start_now(task)
    assert wait_for_tasks(job_id, 1, timeout=240) == [("COMPLETED", "0:0")]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["resumed_at_steps"] == [stopped["steps"]]
    assert comparable(run_dir) == comparable(reference)
    log = (sweep / "slurm" / f"{task}.out").read_text()
    assert "requeueing" in log and f"{run_dir}: resuming from step {stopped['steps']}" in log
    print(f"requeued within {delay:.1f} s of USR2; resumed run done "
          f"{time.monotonic() - signalled:.1f} s after the signal")


@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_a_preempted_submitit_job_is_requeued_resumes_and_the_launcher_waits(sweeps, tmp_path,
                                                                            reference, how):
    """usr2: what Slurm does signal_delay_s before the time limit (to the job step: submitit
    runs the job under srun); dgrun checkpoints, submitit's handler requeues. scontrol_requeue:
    what an admin or a preemption does (SIGTERM; Slurm requeues); dgrun checkpoints and the job
    ends without a result, so the launcher waits for the requeued run instead of returning."""
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    launcher = subprocess.Popen([sys.executable, "-m", "dgrun.cli", "-m", *LAUNCHER,
                                 f"hydra.sweep.dir={sweep}", "seed=0", *LONG],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
    try:
        run_dir = sweep / "0"
        wait_for("20 evaluations", lambda: rows(run_dir) >= 20, timeout=120, poll=0.05)
        (job_id,) = job_ids(sweep)
        if how == "usr2":
            sh("scancel", "--signal=USR2", job_id)
        else:
            sh("scontrol", "requeue", job_id)
        task = wait_requeued(job_id)
        stopped = read_summary(run_dir)
        assert stopped["status"] == "preempted"
        assert stopped["stop_reason"] == ("SIGUSR2" if how == "usr2" else "SIGTERM")
        start_now(task)
        assert launcher.poll() is None, "the launcher returned while its job was requeued"
        out, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, out[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["resumed_at_steps"] == [stopped["steps"]]
    assert comparable(run_dir) == comparable(reference)


# ---------------------------------------------------------------- (d): a crash is reported
CRASH = ["dataset=cifar10", "dataset.root=/nonexistent", *FAST]  # valid config, no data files


def test_a_crashing_dgrun_slurm_task_is_failed_in_sacct(sweeps, tmp_path):
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    proc = dgrun("slurm", *ARRAY, "--sweep-dir", str(sweep), "--", *CRASH, timeout=120)
    job_id = re.match(r"submitted job array (\d+)", proc.stdout)[1]
    assert wait_for_tasks(job_id, 1, timeout=120) == [("FAILED", "2:0")]
    log = (sweep / "slurm" / f"{job_id}_0.out").read_text()
    assert "dgrun: error: CIFAR-10 not found" in log


def test_a_crashing_submitit_job_fails_the_launcher_instead_of_hanging(sweeps, tmp_path):
    sweep = tmp_path / "sweep"
    sweeps.append(sweep)
    started = time.monotonic()
    proc = dgrun("-m", *LAUNCHER, f"hydra.sweep.dir={sweep}", *CRASH, timeout=240, check=False)
    assert proc.returncode != 0
    assert "CIFAR-10 not found" in proc.stdout + proc.stderr
    print(f"launcher reported the crash after {time.monotonic() - started:.1f} s")

