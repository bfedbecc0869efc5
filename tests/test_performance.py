"""What keeps runs fast and small: thread choice, the throughput record, evaluation that backs
off when memory runs out, pixels kept as uint8."""
from __future__ import annotations

import pytest
import torch

from conftest import dgrun, read_summary
from dgrun import runtime


def test_available_cpus_honours_slurms_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert runtime.available_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert runtime.available_cpus() >= 1


def test_auto_threads_gives_small_models_one_and_shares_the_rest(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert runtime.auto_threads(5e6) == 1  # the digits MLP's step
    assert runtime.auto_threads(3e10) == 16
    assert runtime.auto_threads(3e10, parallel_jobs=4) == 4  # a local sweep of 4 jobs
    assert runtime.auto_threads(3e10, parallel_jobs=64) == 1


def test_step_macs_counts_linear_and_conv_work():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 10))
    assert runtime.step_macs(mlp, torch.zeros(128, 1, 8, 8)) == 128 * (64 * 512 + 512 * 10)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert runtime.step_macs(conv, torch.zeros(2, 3, 5, 5)) == 2 * 8 * 25 * (3 * 9)


def test_the_default_job_records_its_threads_and_throughput(run_dir):
    dgrun("trainer.max_epochs=20", "trainer.stop_at_interpolation=false", "quiet=true",
          f"hydra.run.dir={run_dir}")  # threads=auto: the default
    summary = read_summary(run_dir)
    assert summary["threads"] == 1  # the digits MLP is far below SMALL_STEP_MACS
    speed = summary["throughput"]
    assert speed["steps_per_s"] == pytest.approx(240 / summary["time_s"])
    assert speed["train_samples_per_s"] == pytest.approx(20 * 1438 / summary["time_s"])


def test_bad_thread_counts_are_one_line(tmp_path):
    for value in ("abc", "0", "true"):
        proc = dgrun(f"threads={value}", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "threads=" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_evaluation_halves_its_batch_when_memory_runs_out(caplog):
    from dgrun.data.bundle import Split
    from dgrun.probes import Evaluation

    class Picky(torch.nn.Module):
        """Fails like a GPU would on batches above 100 rows."""

        def forward(self, x):
            if len(x) > 100:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return x * 2

    x = torch.arange(1000.0).reshape(500, 2)
    split = Split(x, torch.zeros(500, dtype=torch.long))
    ev = Evaluation(Picky(), split, split, batch_size=4096)
    assert torch.equal(ev.logits("train"), x * 2)
    assert ev.batch_size == 64  # 4096 -> 2048 -> ... -> 64, the first size that fits
    assert "eval_batch_size is now" in caplog.text


def test_images_stay_uint8_on_the_device_and_are_normalized_per_batch(tmp_path):
    from test_vision_data import _write_cifar10

    from dgrun.data import pipeline

    _write_cifar10(tmp_path, per_batch=8)
    bundle = pipeline.load("cifar10", {"root": str(tmp_path)}, seed=0,
                           preprocess="standardize")
    assert bundle.train.x.dtype == torch.uint8  # a quarter of float32's memory
    inputs = bundle.prepare(bundle.train.x)
    assert inputs.dtype == torch.float32
    assert inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # standardized with train statistics
    assert torch.allclose(inputs.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
