"""Exact resume: a run killed at any moment and resumed ends exactly like one never killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, dgrun, read_metrics, read_summary, train_here
from dgrun import checkpoint
from dgrun.errors import UserError

# Dropout exercises in-model randomness; a checkpoint every 7 steps (12 steps an epoch) puts
# checkpoints, evaluations and kills inside epochs.
RUN = ["model.dropout=0.1", "trainer.unit=step", "trainer.eval_every=5",
       "trainer.checkpoint_every=7", "trainer.max_epochs=60", *FAST]


def comparable(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock column, which no two runs share."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict:
    return checkpoint.load_latest(run_dir / "checkpoints")["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    dgrun(*RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dgrun.cli", *RUN, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def metrics_rows(run_dir: Path) -> int:
    try:
        return max(0, sum(1 for _ in open(run_dir / "metrics.csv")) - 1)
    except FileNotFoundError:
        return 0


# Killed before the first checkpoint (it starts over), and well into the run.
@pytest.mark.parametrize("kill_after_rows", [1, 40])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference, kill_after_rows):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(lambda: metrics_rows(run_dir) >= kill_after_rows, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_summary(run_dir)
    assert killed["status"] == "running"  # visible as unfinished
    dgrun(*RUN, f"hydra.run.dir={run_dir}")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert comparable(run_dir) == comparable(reference)
    ref, got = final_weights(reference), final_weights(run_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert summary["steps"] == read_summary(reference)["steps"]
    if kill_after_rows == 1:  # killed before its first checkpoint: it starts over
        assert summary["resumed_at_steps"] == []
    else:  # resumed from a checkpoint; kill points land inside epochs (12 steps each)
        assert summary["resumed_at_steps"][0] % 7 == 0


def test_sigusr2_checkpoints_marks_preempted_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(lambda: metrics_rows(run_dir) >= 20, proc)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["stop_reason"] == "SIGUSR2"
    saved = checkpoint.load_latest(run_dir / "checkpoints")
    assert saved["state"]["step"] == summary["steps"] > 0
    time_before = summary["time_s"]
    dgrun(*RUN, f"hydra.run.dir={run_dir}")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["resumed_at_steps"] == [saved["state"]["step"]]
    assert comparable(run_dir) == comparable(reference)
    assert summary["time_s"] > time_before  # training time accumulates across resumes


def test_a_completed_run_is_not_trained_again(tmp_path, reference):
    before = (reference / "metrics.csv").read_text()
    proc = dgrun(*RUN, f"hydra.run.dir={reference}")
    assert "already finished" in proc.stdout + proc.stderr
    assert (reference / "metrics.csv").read_text() == before


def test_resuming_with_another_config_names_the_differences(tmp_path, reference):
    proc = dgrun(*RUN, "model=mlp3", "seed=1", f"hydra.run.dir={reference}", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "model.name: mlp1 -> mlp3" in line and "seed: 0 -> 1" in line
    assert "trainer.resume=false" in line and len(line.splitlines()) == 1
    assert read_summary(reference)["model"] == "mlp1"  # nothing overwritten


def test_resume_false_starts_fresh_and_a_bigger_budget_continues(tmp_path):
    run_dir = tmp_path / "run"
    short = ["trainer.stop_at_interpolation=false", "trainer.max_epochs=3", *FAST]
    train_here(run_dir, *short)
    assert read_summary(run_dir)["steps"] == 36
    train_here(run_dir, "trainer.stop_at_interpolation=false", "trainer.max_epochs=5", *FAST)
    summary = read_summary(run_dir)
    assert summary["steps"] == 60 and summary["resumed_at_steps"] == [36]
    assert [int(r["step"]) for r in read_metrics(run_dir)] == [0, 12, 24, 36, 48, 60]
    train_here(run_dir, *short, "model=mlp3", "trainer.resume=false")
    summary = read_summary(run_dir)
    assert summary["model"] == "mlp3" and summary["steps"] == 36 and not summary["resumed_at_steps"]


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    script = f"""
import os, torch
from pathlib import Path
from dgrun import checkpoint
d = Path({str(ckpt)!r})
checkpoint.save({{"state": {{"step": 1}}, "w": torch.ones(1000)}}, d)
checkpoint.save({{"state": {{"step": 2}}, "w": torch.ones(1000) * 2}}, d)
real_save = torch.save
def dying_save(obj, f):
    real_save(obj, f)
    f.flush()
    f.truncate(f.tell() // 2)   # half the bytes are on disk...
    os.kill(os.getpid(), 9)     # ...when the process is killed
torch.save = dying_save
checkpoint.save({{"state": {{"step": 3}}, "w": torch.ones(1000) * 3}}, d)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    loaded = checkpoint.load_latest(ckpt)
    assert loaded["state"]["step"] == 2 and torch.equal(loaded["w"], torch.ones(1000) * 2)


def flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    d = tmp_path / "checkpoints"
    checkpoint.save({"state": {"step": 1}, "w": torch.ones(10000)}, d)
    checkpoint.save({"state": {"step": 2}, "w": torch.zeros(10000)}, d)
    flip_byte(d / "last.pt")  # inside tensor data: torch.load alone would not notice
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_file(d / "last.pt")
    with caplog.at_level("WARNING", logger="dgrun"):
        assert checkpoint.load_latest(d)["state"]["step"] == 1
    assert "skipping damaged checkpoint" in caplog.text
    (d / "previous.pt").write_bytes((d / "previous.pt").read_bytes()[:500])  # truncated
    with pytest.raises(UserError, match="no usable checkpoint"):
        checkpoint.load_latest(d)


def test_a_run_dir_with_only_damaged_checkpoints_stops_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    dgrun("trainer.max_epochs=2", "trainer.stop_at_interpolation=false", *FAST,
          f"hydra.run.dir={run_dir}")
    flip_byte(run_dir / "checkpoints" / "last.pt")
    proc = dgrun("trainer.max_epochs=4", "trainer.stop_at_interpolation=false", *FAST,
                 f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2
    assert "no usable checkpoint" in proc.stderr and "trainer.resume=false" in proc.stderr
    assert (run_dir / "metrics.csv").exists()  # nothing already written is lost


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DGRUN_PWNED']}",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DGRUN_PWNED", str(marker))
    path = tmp_path / "last.pt"
    torch.save({"state": {"step": 1}, "payload": Exploit(), "digest": "x"}, path)
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load_file(path)
    assert not marker.exists()


def test_snapshots_keep_a_log_spaced_history(tmp_path):
    run_dir = tmp_path / "run"
    dgrun("trainer.snapshots=log", "trainer.max_epochs=10", "trainer.stop_at_interpolation=false",
          *FAST, f"hydra.run.dir={run_dir}")
    steps = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert steps == [1, 2, 3, 6, 10, 18, 32, 56, 100, 120]
    assert checkpoint.load_file(run_dir / "checkpoints" / "step_00000056.pt")["state"]["step"] == 56


def test_sigterm_stops_a_whole_sweep_and_rerunning_it_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", "trainer.unit=step", "trainer.eval_every=5",
            "trainer.checkpoint_every=7", "trainer.max_epochs=60", *FAST,
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "dgrun.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: metrics_rows(sweep / "0") >= 20, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "run the same command again to resume" in proc.stderr.read()
    assert read_summary(sweep / "0")["status"] == "preempted"
    assert not (sweep / "1" / "summary.json").exists()  # the next job never started
    dgrun(*args)
    first, second = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert first["status"] == second["status"] == "completed"
    assert first["resumed_at_steps"] and not second["resumed_at_steps"]


def test_a_second_ctrl_c_exits_at_once():
    from dgrun.preemption import PreemptionGuard

    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signal_name == "SIGINT"  # the first asks the loop to stop after its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
