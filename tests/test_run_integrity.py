"""The run directory stays a true record: one writer (the lock), finished runs repaired,
restored state on the run's device, a full disk in one line, interrupted writes swept, atomic
writes, Ctrl-C (issue 16)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, cli_here, dgrun, read_metrics, read_summary, train_here
from dgrun import checkpoint, files
from dgrun.rundir import LOCK, DirectoryHeld, RunDir, RunLock, holder

QUICK = ["trainer.max_steps=24", "trainer.max_epochs=null", *FAST]


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def held_by_another_process(path: Path):
    """A live process holding `path`'s lock (POSIX locks are per process: not this one)."""
    code = ("import sys, time; from dgrun.rundir import RunLock; "
            "RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- 1. one writer
def test_a_held_directory_is_refused_in_one_line_and_nothing_is_touched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A live run that has no checkpoint yet: a command with another config would decide
    # "fresh" and clear() it, were the directory not held.
    (run_dir / "metrics.csv").write_text("step,train_loss\n1,0.5\n")
    (run_dir / ".dgrun").mkdir()
    (run_dir / ".dgrun" / "manifest").write_text("metrics.csv\n")
    with held_by_another_process(run_dir) as proc:
        before = listing(run_dir)
        out = dgrun(f"hydra.run.dir={run_dir}", "model=mlp3", *QUICK, check=False)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(f"dgrun: error: {run_dir} is in use by another dgrun command")
        assert f"pid {proc.pid}" in lines[0] and "host " in lines[0] and "since " in lines[0]
        assert listing(run_dir) == before


def test_the_lock_dies_with_its_process_even_by_sigkill(tmp_path):
    with held_by_another_process(tmp_path) as proc:
        assert f"pid {proc.pid}" in holder(tmp_path)
        with pytest.raises(DirectoryHeld, match=f"pid {proc.pid}"):
            with RunLock(tmp_path):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK).exists()  # the stale record stays; its lock does not
    assert holder(tmp_path) is None
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_on_a_new_directory_leaves_nothing_behind(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK).exists()
        # The same process cannot hold it twice (a POSIX lock would grant it, and drop both).
        with pytest.raises(DirectoryHeld, match=f"this process \\(pid {os.getpid()}\\)"):
            with RunLock(tmp_path / "new"):
                pass
        assert (tmp_path / "new" / LOCK).exists()
    assert not (tmp_path / "new").exists()


def test_an_ensemble_takes_its_members_locks_too(tmp_path):
    with held_by_another_process(tmp_path / "ens" / "member_1") as proc:
        with pytest.raises(DirectoryHeld, match=f"member_1 is in use .*pid {proc.pid}"):
            train_here(tmp_path / "ens", "trainer.ensemble=2", *QUICK)
    assert not (tmp_path / "ens" / "member_0").exists()


def test_show_tells_a_killed_run_from_a_running_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What SIGKILL leaves: a summary as of the last checkpoint, rows written after it.
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "steps": 1572}))
    (run_dir / "metrics.csv").write_text("step,epoch,train_acc\n1572,1,0.5\n2460,2,0.7\n")
    with held_by_another_process(run_dir):
        code, out, _ = cli_here(capsys, "show", str(run_dir))
        assert code == 0 and "running at step" in out and "killed at" not in out
    code, out, _ = cli_here(capsys, "show", str(run_dir))
    assert code == 0 and "killed at step 2460" in out, out


# ---------------------------------------------------------------- 2. finished-run repair
def test_a_finished_run_missing_its_derived_files_gets_them_without_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = train_here(run_dir, *QUICK)
    rows, ckpt = (run_dir / "metrics.csv").read_bytes(), (run_dir / "checkpoints" / "last.pt")
    stamp = ckpt.stat().st_mtime_ns
    for name in ("summary.json", "plots/loss.png", "plots/accuracy.png"):
        (run_dir / name).unlink()
    capsys.readouterr()
    again = train_here(run_dir, *QUICK)
    err = capsys.readouterr().err
    assert "repaired what was missing (summary.json, plots/accuracy.png, plots/loss.png)" in err
    assert all((run_dir / "plots" / name).is_file() for name in ("loss.png", "accuracy.png"))
    summary = read_summary(run_dir)
    assert summary["status"] == first["status"] == again["status"] == "completed"
    assert summary["final"] == first["final"] and summary["steps"] == first["steps"]
    assert summary["train_size"] == first["train_size"]
    assert (run_dir / "metrics.csv").read_bytes() == rows and ckpt.stat().st_mtime_ns == stamp
    # Once whole, a re-run is "nothing to do" again.
    train_here(run_dir, *QUICK)
    assert "nothing to do" in capsys.readouterr().err


def test_a_finished_run_whose_trackers_were_not_finished_finishes_them(tmp_path, capsys):
    from dgrun.record import missing_derived

    run_dir = tmp_path / "run"
    train_here(run_dir, *QUICK, "logger=tensorboard")
    state = json.loads((run_dir / "trackers.json").read_text())
    assert state["tensorboard"]["finished"] is True
    del state["tensorboard"]["finished"]  # a kill after the final checkpoint, before finish
    (run_dir / "trackers.json").write_text(json.dumps(state))
    assert missing_derived(RunDir(run_dir)) == ["the trackers' finish"]
    capsys.readouterr()
    train_here(run_dir, *QUICK, "logger=tensorboard")
    assert "repaired what was missing (the trackers' finish)" in capsys.readouterr().err
    assert json.loads((run_dir / "trackers.json").read_text())["tensorboard"]["finished"]
    assert missing_derived(RunDir(run_dir)) == []


def test_an_ensembles_finished_member_is_repaired_like_a_run(tmp_path, capsys):
    ens = tmp_path / "ens"
    train_here(ens, "trainer.ensemble=2", *QUICK)
    member = ens / "member_1"
    first = read_summary(member)
    (member / "plots" / "loss.png").unlink()
    (member / "summary.json").unlink()
    capsys.readouterr()
    train_here(ens, "trainer.ensemble=2", *QUICK)
    err = capsys.readouterr().err
    assert f"{member} already finished" in err and "(summary.json, plots/loss.png)" in err
    assert "member_0 already" not in err
    again = read_summary(member)
    assert again["final"] == first["final"] and again["ensemble"] == {"size": 2, "member": 1}
    assert again["seed"] == first["seed"] == 1


def test_a_summary_that_is_not_an_object_is_remade(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_here(run_dir, *QUICK)
    (run_dir / "summary.json").write_text("[]")
    train_here(run_dir, *QUICK)
    assert "repaired what was missing (summary.json)" in capsys.readouterr().err
    assert read_summary(run_dir)["status"] == "completed"


# ---------------------------------------------------------------- 3. restored state's device
def test_every_piece_of_restored_state_goes_to_the_runs_device_and_dtype(tmp_path):
    from hydra import compose, initialize_config_dir

    from dgrun import ensemble
    from dgrun.assemble import restore_extras
    from dgrun.config import config_dir, from_hydra, register_schemas
    from dgrun.run import build, restore

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = from_hydra(compose("config", overrides=[*QUICK, "trainer.track_examples=true"]))
    parts = build(cfg, torch.device("cpu"))
    n = len(parts.bundle.train)
    payload = {"state": {"step": 12}, "model": parts.model.state_dict(),
               "optimizer": parts.optimizer.state_dict(),
               "scheduler": parts.scheduler.state_dict(), "objective": {},
               "rng": __import__("dgrun.seeding", fromlist=["rng_state"]).rng_state(),
               # as a checkpoint of another run might hold them: float64, another dtype of bool
               "probes": {"examples": {"steps": torch.tensor([6, 12]),
                                       "true_prob": torch.rand(2, n, dtype=torch.float64),
                                       "correct": torch.ones(2, n, dtype=torch.uint8)}}}
    restore(parts, payload)
    (examples,) = [p for p in parts.probes if p.name == "examples"]
    assert {t.dtype for t in examples.prob} == {torch.float16}
    assert {t.dtype for t in examples.correct} == {torch.bool}

    # "meta" stands in for the GPU: every piece of probe and objective state that restore
    # hands over must be on the run's device, in the single run's restore and the ensemble's.
    seen = []

    class Recording:
        name = "rec"

        def load_state_dict(self, state):
            seen.extend(t.device.type for t in state["tensors"])

    parts.probes, parts.objective = [Recording()], Recording()
    restore(parts, {**payload, "probes": {"rec": {"tensors": [torch.ones(2)]}},
                    "objective": {"tensors": (torch.ones(2), torch.zeros(1))}},
            torch.device("meta"))
    assert seen == ["meta", "meta", "meta"]
    seen.clear()
    restore_extras({"probes": {"rec": {"tensors": [torch.ones(2)]}}, "objective": {
        "tensors": [torch.ones(2)]}}, Recording(), [Recording()], torch.device("meta"))
    assert seen == ["meta", "meta"]
    assert "restore_extras" in ensemble.restore.__code__.co_names


# ---------------------------------------------------------------- 6. a full disk mid-run
FULL_DISK = """
import errno, sys
from dgrun import metrics
real = metrics.MetricsFile.append
def append(self, row):
    if row["step"] >= 36:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    real(self, row)
metrics.MetricsFile.append = append
from dgrun.cli import main
main(sys.argv[1:])
"""


def test_a_full_disk_mid_run_is_one_line_and_the_record_says_failed(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "trainer.max_steps=60", "trainer.max_epochs=null",
            "trainer.checkpoint_every=2", *FAST]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith(f"dgrun: error: {run_dir}: cannot write ("), \
        proc.stderr
    assert "No space left on device" in lines[0] and "Traceback" not in proc.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert [int(r["step"]) for r in read_metrics(run_dir)] == [0, 12, 24]  # intact, no half row
    assert checkpoint.load_latest(run_dir / "checkpoints")["state"]["step"] == 24
    # ... and once there is space again, the same command resumes from it.
    dgrun(*args)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["resumed_at_steps"] == [24]


def test_a_failure_that_cannot_be_recorded_still_leaves_the_old_record(tmp_path, monkeypatch):
    from dgrun import record

    run_dir = tmp_path / "run"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_append = record.MetricsFile.append

    def append(self, row):
        if row["step"] >= 36:
            monkeypatch.setattr(record, "write_json", full)  # the summary cannot be written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, row)

    monkeypatch.setattr(record.MetricsFile, "append", append)
    with pytest.raises(OSError):
        train_here(run_dir, "trainer.max_steps=60", "trainer.max_epochs=null",
                   "trainer.checkpoint_every=2", *FAST)
    # The original error, not the second one; the summary as of the last checkpoint.
    assert read_summary(run_dir)["status"] == "running"
    assert read_summary(run_dir)["steps"] == 24


# ---------------------------------------------------------------- 9. interrupted writes
def test_temporary_files_of_dead_writers_are_swept_and_resume_false_removes_analysis(tmp_path):
    run_dir = tmp_path / "run"
    train_here(run_dir, *QUICK)
    ckpts = run_dir / "checkpoints"
    leftovers = [ckpts / ".last.pt.new.tmp-99999", ckpts / ".step_00000010.pt.tmp-99999",
                 run_dir / ".summary.json.tmp-4242", run_dir / "plots" / ".loss.png.tmp-7"]
    mine = [run_dir / ".my.tmp-notes", ckpts / "notes.tmp-1"]  # not dgrun's pattern
    for path in leftovers + mine:
        path.write_bytes(b"half")
    train_here(run_dir, *QUICK)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in mine)
    (run_dir / "analysis" / "cartography").mkdir(parents=True)
    (run_dir / "analysis" / "cartography" / "summary.json").write_text("{}")
    train_here(run_dir, *QUICK, "trainer.resume=false")
    assert not (run_dir / "analysis").exists()


# ---------------------------------------------------------------- 11. one atomic writer
def test_plots_hydra_record_manifest_and_analysis_go_through_the_atomic_writer(tmp_path,
                                                                                monkeypatch):
    written = []
    real = files.write_atomic

    def spy(path, write, **kw):
        written.append(Path(path).name)
        return real(path, write, **kw)

    monkeypatch.setattr(files, "write_atomic", spy)
    from dgrun.analysis.base import Result, write
    from dgrun.plots import plot_run, save_figure

    plot_run([{"step": 1, "train_loss": 1.0, "test_loss": 1.0, "train_acc": 0.1,
               "test_acc": 0.1}], tmp_path, interpolation_step=None, log_x=False, title="t")
    assert {"loss.png", "accuracy.png"} <= set(written)
    import pandas as pd
    write(Result(tables={"t": pd.DataFrame({"a": [1]})}, summary={"x": 1}), tmp_path / "an")
    assert {"t.csv", "summary.json"} <= set(written)
    RunDir(tmp_path).claim(tmp_path / "x.txt")
    assert "manifest" in written

    # A figure whose drawing fails leaves the previous file whole and no temporary behind.
    import matplotlib.pyplot as plt
    (tmp_path / "old.png").write_bytes(b"previous")
    fig = plt.figure()
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (a[0].write(b"half"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_figure(fig, tmp_path / "old.png")
    assert (tmp_path / "old.png").read_bytes() == b"previous"
    assert not list(tmp_path.glob(".old.png.tmp-*"))


def test_a_checkpoint_makes_metrics_and_summary_durable(tmp_path, monkeypatch):
    from dgrun import record

    synced, saves = [], []
    monkeypatch.setattr(record, "fsync_file", lambda path: synced.append(Path(path).name))
    real, real_save = record.write_json, record.checkpoint.save
    monkeypatch.setattr(record, "write_json", lambda path, data, fsync=False: (
        synced.append(f"{Path(path).name}:{fsync}"), real(path, data, fsync=fsync))[1])
    monkeypatch.setattr(record.checkpoint, "save",
                        lambda *a, **k: (saves.append(1), real_save(*a, **k))[1])
    train_here(tmp_path / "run", *QUICK, "trainer.checkpoint_every=1")
    assert len(saves) >= 2
    assert synced.count("metrics.csv") == synced.count("summary.json:True") == len(saves)


# ---------------------------------------------------------------- 12. Ctrl-C
def test_ctrl_c_during_training_checkpoints_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "trainer.max_steps=100000", "trainer.max_epochs=null",
            "threads=1", "trainer.progress=none", "quiet=true"]
    proc = subprocess.Popen([sys.executable, "-m", "dgrun.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.csv").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("dgrun: interrupted by SIGINT at step "), err
    assert "run the same command again to resume" in line
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["stop_reason"] == "SIGINT"
    step = checkpoint.load_latest(run_dir / "checkpoints")["state"]["step"]
    assert step == summary["steps"] and f"at step {step};" in line
