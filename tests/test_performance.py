"""What keeps runs fast and small: thread choice, the throughput record, evaluation that backs
off when memory runs out, pixels kept as uint8."""
from __future__ import annotations

import pytest
import torch

from conftest import NoHooks, dgrun, read_summary, train_here
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


IDLE = runtime.MachineLoad(average=0.1, pressure=0.0)


def no_trial(n):
    raise AssertionError("no trial should run here")


@pytest.mark.parametrize("macs, cpus, jobs, load, trial, expected, why", [
    (5e6, 16, 1, IDLE, no_trial, 1, "small step"),                        # digits MLP
    (3e10, 1, 1, IDLE, no_trial, 1, "1 CPU"),
    (3e10, 16, 16, IDLE, no_trial, 1, "16 CPU(s) for 16 job(s)"),        # a wide local sweep
    (3e10, 2, 1, runtime.MachineLoad(0.2, 45.0), no_trial, 1, "CPU pressure 45%"),
    (3e10, 2, 1, runtime.MachineLoad(1.9, None), no_trial, 1, "load average 1.90"),
    (3e10, 2, 1, runtime.MachineLoad(1.9, 5.0), no_trial, 1, "load average"),
    (3e10, 2, 1, runtime.MachineLoad(1.9, 5.0, running=2), no_trial, 1, "2 other tasks"),
    # A load average left by a run that just ended, nothing running now: the CPUs are free.
    (5e7, 2, 1, runtime.MachineLoad(1.9, 0.5, running=0), lambda n: (1.0, 0.6), 2, "1.67x"),
    (5e7, 2, 1, IDLE, lambda n: (1.0, 0.6), 2, "1.67x"),                 # idle, a real gain
    (5e7, 2, 1, IDLE, lambda n: (1.0, 0.95), 1, "under 1.15x"),          # no gain worth it
    (5e7, 2, 1, IDLE, None, 2, "2 free CPUs"),
    (3e10, 2, 1, IDLE, no_trial, 2, "2 free CPUs"),                      # too big to try
])
def test_auto_threads_choice_under_each_condition(macs, cpus, jobs, load, trial, expected, why):
    threads, reason = runtime.choose_threads(macs, cpus=cpus, parallel_jobs=jobs, load=load,
                                             trial=trial)
    assert threads == expected and why in reason


def test_auto_threads_on_a_half_busy_machine_tries_only_the_free_cpus():
    asked = []

    def trial(n):
        asked.append(n)
        return 1.0, 0.2

    load = runtime.MachineLoad(average=4.2, pressure=3.0)  # 4 of 16 CPUs taken by others
    assert runtime.choose_threads(5e7, cpus=16, load=load, trial=trial)[0] == 12
    assert asked == [12]
    assert runtime.choose_threads(5e7, cpus=16, parallel_jobs=4, load=load, trial=trial)[0] == 4


def test_auto_loads_data_with_one_thread_and_raises_it_only_to_keep_it():
    # A pool started at N threads and set to 1 ran 1-thread steps up to 2x slower.
    assert runtime.start_threads("auto", 1) == 1
    assert runtime.start_threads(3) == 3 and runtime.start_threads(None) is None


def test_machine_load_reads_pressure_and_load_average():
    load = runtime.machine_load()
    assert load.average >= 0
    assert load.pressure is None or 0 <= load.pressure <= 100


def test_the_thread_trial_times_one_and_n_threads_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.5),
                                torch.nn.Linear(64, 2))
    batch = torch.randn(16, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    one, many = runtime.step_trial(model, batch)(2)
    assert one > 0 and many > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads


def test_a_resumed_run_keeps_the_thread_count_it_started_with(run_dir):
    import json

    train_here(run_dir, "trainer.max_steps=12", "trainer.max_epochs=null")  # threads=auto
    summary = read_summary(run_dir)
    assert summary["threads"] == 1 and "small step" in summary["threads_why"]
    # As if it had started on a free machine with 2 threads for a large step:
    (run_dir / "summary.json").write_text(json.dumps({**summary, "threads": 2}))
    train_here(run_dir, "trainer.max_steps=24", "trainer.max_epochs=null")  # continues
    summary = read_summary(run_dir)
    assert summary["steps"] == 24 and summary["threads"] == 2
    assert summary["threads_why"] == "the count this run started with"


def test_dgrun_makes_idle_openmp_threads_sleep():
    import subprocess
    import sys

    code = "import os, dgrun; print(os.environ['OMP_WAIT_POLICY'])"  # set before torch loads
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a value the user exported wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == "ACTIVE"


def test_step_macs_counts_linear_and_conv_work():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 10))
    assert runtime.step_macs(mlp, torch.zeros(128, 1, 8, 8)) == 128 * (64 * 512 + 512 * 10)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert runtime.step_macs(conv, torch.zeros(2, 3, 5, 5)) == 2 * 8 * 25 * (3 * 9)


def test_the_default_job_records_its_threads_and_throughput(run_dir):
    train_here(run_dir, "trainer.max_epochs=20", "trainer.stop_at_interpolation=false")
    # threads=auto: the default
    summary = read_summary(run_dir)
    assert summary["threads"] == 1  # the digits MLP is far below SMALL_STEP_MACS
    speed = summary["throughput"]
    assert speed["steps_per_s"] == pytest.approx(240 / summary["time_s"])
    assert speed["train_samples_per_s"] == pytest.approx(20 * 1438 / summary["time_s"])


def test_bad_thread_counts_are_one_line(tmp_path):
    from hydra import compose, initialize_config_dir

    from dgrun.config import config_dir, from_hydra, register_schemas
    from dgrun.errors import UserError

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for value in ("0", "true", "auto", "null", "3"):
            cfg = compose("config", overrides=[f"threads={value}"])
            if value in ("0", "true"):
                with pytest.raises(UserError, match="threads="):
                    from_hydra(cfg)
            else:
                from_hydra(cfg)
    proc = dgrun("threads=abc", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "threads='abc' is not a thread count" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


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


def _rows(run_dir):
    from conftest import read_metrics

    return [{k: float(v) for k, v in r.items() if k != "time_s" and v != ""}
            for r in read_metrics(run_dir)]


def _close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=tol, rel=tol), (k, x["step"])


def test_channels_last_and_bf16_match_the_default_and_resume_exactly(tmp_path):
    base = ["model=alexnet", "trainer.max_steps=16", "trainer.unit=step", "trainer.eval_every=8",
            "trainer.stop_at_interpolation=false", "threads=1"]
    train_here(tmp_path / "fp32", *base)
    train_here(tmp_path / "nhwc", *base, "trainer.channels_last=true")
    _close(_rows(tmp_path / "nhwc"), _rows(tmp_path / "fp32"), 1e-4)
    # Exact resume with both on: 8 steps, then on to 16, equals 16 straight; and bf16 stays
    # within rounding of fp32.
    both = [*base, "trainer.precision=bf16", "trainer.channels_last=true"]
    train_here(tmp_path / "straight", *both)
    _close(_rows(tmp_path / "straight"), _rows(tmp_path / "fp32"), 0.05)
    split = tmp_path / "split"
    train_here(split, *[a for a in both if "max_steps" not in a], "trainer.max_steps=8")
    train_here(split, *both)
    assert _rows(split) == _rows(tmp_path / "straight")


def fit_tiny(max_steps: int, is_eval_step, hooks):
    """`fit` on a small MLP with dropout, momentum, a decaying lr and gradient clipping: every
    per-step feature that could read a value back."""
    from dgrun.data.bundle import Split
    from dgrun.losses import LOSSES
    from dgrun.train import Plan, State, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))
    split = Split(torch.randn(256, 8), torch.randint(3, (256,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99 ** s)
    loss, eval_loss = LOSSES.build("cross_entropy")
    plan = Plan(seed=0, batch_size=32, steps_per_epoch=8, max_steps=max_steps, max_time_s=None,
                is_eval_step=is_eval_step, is_checkpoint_step=lambda s: False,
                stop_at_interpolation=False, grad_clip=1.0)
    return fit(model, split, split, opt, sched, lambda o, y, r: loss(o, y), eval_loss, plan,
               State(), hooks)


def test_training_steps_never_wait_for_the_device():
    """Between evaluations nothing reads a tensor's value on the host (.item(), bool(),
    .tolist(), .cpu()): on a GPU each would stall the queue of kernels every step."""
    import dgrun.train

    reads = {"n": 0}
    watching = {"on": False}

    class Watching(NoHooks):
        def on_step(self, state):
            watching["on"] = True  # from the first step's end to the next evaluation

    measure = dgrun.train.measure

    def measuring(*args, **kwargs):  # an evaluation syncs once, by design
        watching["on"] = False
        return measure(*args, **kwargs)

    patched = {}
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            if watching["on"]:
                reads["n"] += 1
            return _original(self, *args, **kwargs)

        patched[name] = original
        setattr(torch.Tensor, name, spy)
    dgrun.train.measure = measuring
    try:
        state = fit_tiny(40, lambda s: s % 20 == 0, Watching())
    finally:
        dgrun.train.measure = measure
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
    assert state.step == 40 and len(state.rows) == 3
    assert reads["n"] == 0


def test_the_profiler_sees_no_scalar_reads_that_grow_with_the_steps():
    """The same check through torch's profiler: every host read of a tensor's value dispatches
    `aten::_local_scalar_dense`. Training 20 more steps between the same evaluations must add
    none of them (a per-step .item() or `if loss.isnan()` would add 20)."""
    from torch.profiler import ProfilerActivity, profile

    def scalar_reads(steps: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fit_tiny(steps, lambda s: s == steps, NoHooks())
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    assert scalar_reads(20) == scalar_reads(40)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    base = ["trainer.max_steps=24", "trainer.unit=step", "trainer.eval_every=8",
            "trainer.stop_at_interpolation=false", "quiet=true", "threads=1"]
    dgrun(*base, f"hydra.run.dir={tmp_path / 'eager'}")
    dgrun(*base, "trainer.compile=true", f"hydra.run.dir={tmp_path / 'compiled'}", timeout=900)
    _close(_rows(tmp_path / "compiled"), _rows(tmp_path / "eager"), 1e-4)


def test_an_ensemble_chooses_its_threads_too(tmp_path):
    from conftest import train_here

    train_here(tmp_path / "ens", "trainer.ensemble=2", "trainer.max_steps=12",
               "trainer.max_epochs=null")  # threads=auto, the default
    for k in range(2):
        summary = read_summary(tmp_path / "ens" / f"member_{k}")
        assert summary["status"] == "completed" and summary["threads"] == 1


def test_a_run_imports_matplotlib_only_when_it_draws():
    import subprocess
    import sys

    code = ("import sys; import dgrun.run, dgrun.probes, dgrun.record; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name, options, classes", [
    ("cross_entropy", {}, 10), ("cross_entropy", {"label_smoothing": 0.1}, 10),
    ("mse", {}, 97), ("hinge", {}, 2), ("hinge", {}, 10)])
def test_erm_takes_the_losss_own_mean_with_the_per_example_gradients(name, options, classes):
    """The one-call mean reduction is cheaper, and leaves every weight update bit for bit as
    the per-example mean made it (so runs record the same numbers as before)."""
    from dgrun.losses import LOSSES
    from dgrun.objectives import OBJECTIVES

    loss, _ = LOSSES.build(name, **options)
    calls = []

    def mean_loss(out, y):
        calls.append(1)
        return loss(out, y)

    erm = OBJECTIVES.build("erm", train=None, num_groups=1, mean_loss=mean_loss,
                           per_example_loss=lambda out, y: loss(out, y, reduction="none"))
    gen = torch.Generator().manual_seed(0)
    for batch in (7, 32, 128):
        out = torch.randn(batch, classes, generator=gen, requires_grad=True)
        y = torch.randint(classes, (batch,), generator=gen)
        fast, = torch.autograd.grad(erm(out, y, None), out)
        slow, = torch.autograd.grad(loss(out, y, reduction="none").mean(), out)
        assert torch.equal(fast, slow)
    assert len(calls) == 3


def test_a_constant_schedule_skips_its_work_and_keeps_lambdalrs_record():
    from dgrun import optim

    model = torch.nn.Linear(3, 2)
    _, fixed = optim.build(model, "sgd", {"lr": 0.1}, "constant", {}, steps_per_epoch=4,
                           total_steps=100)
    _, warm = optim.build(model, "sgd", {"lr": 0.1}, "constant", {"warmup_steps": 5},
                          steps_per_epoch=4, total_steps=100)
    assert type(fixed) is optim.ConstantLR and type(warm) is torch.optim.lr_scheduler.LambdaLR
    reference = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1),
                                                  lambda step: 1.0)
    for _ in range(7):
        fixed.optimizer.step()
        fixed.step()
        reference.optimizer.step()
        reference.step()
    assert fixed.state_dict()["last_epoch"] == reference.state_dict()["last_epoch"] == 7
    assert fixed.get_last_lr() == reference.get_last_lr() == [0.1]


def test_the_step_seed_is_set_only_while_a_step_draws_random_numbers(monkeypatch):
    """A model without dropout needs no per-step seed after the first step shows it draws
    nothing; one with dropout is seeded every step, as before."""
    from dgrun import seeding, train
    from dgrun.data.bundle import Split

    seeded = []

    class Counting(seeding.SeedStream):
        def __call__(self, i):
            seeded.append(i)
            return super().__call__(i)

    monkeypatch.setattr(train, "SeedStream", Counting)
    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(64, 8, generator=gen), torch.randint(2, (64,), generator=gen))

    for dropout, expected in ((0.0, [0]), (0.5, list(range(10)))):
        seeded.clear()
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(dropout),
                                    torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        plan = train.Plan(seed=0, batch_size=16, steps_per_epoch=4, max_steps=10,
                          max_time_s=None, is_eval_step=lambda s: False,
                          is_checkpoint_step=lambda s: False, stop_at_interpolation=False)
        f = torch.nn.functional.cross_entropy
        train.fit(model, data, data, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                  lambda out, y, rows: f(out, y), lambda out, y: f(out, y, reduction="sum"),
                  plan, train.State(), NoHooks())
        assert seeded == expected


def test_seed_stream_gives_derive_seeds_numbers():
    from dgrun.seeding import SeedStream, derive_seed

    stream = SeedStream(7, "stream")
    assert [stream(i) for i in (0, 1, 99, 10**9)] == [derive_seed(7, "stream", i)
                                                      for i in (0, 1, 99, 10**9)]


def test_a_run_trains_and_records_with_the_heap_frozen_and_thaws_after(run_dir, monkeypatch):
    """What was built before training is frozen for the collector while the run trains and
    draws (dgrun.heap), and thawed after it, so a sweep in one process keeps no old cycles."""
    import gc

    from dgrun import record, run

    seen = {}

    def spy(name, func):
        def wrapped(*args, **kwargs):
            seen[name] = gc.get_freeze_count()
            return func(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(run, "fit", spy("fit", run.fit))
    monkeypatch.setattr(record.Recorder, "finish", spy("finish", record.Recorder.finish))
    gc.unfreeze()
    train_here(run_dir, *FAST_RUN)
    assert seen["fit"] > 10_000 and seen["finish"] > 10_000   # torch alone is far more
    assert gc.get_freeze_count() == 0


def test_the_command_skips_the_collection_at_exit(monkeypatch):
    """`dgrun` as a command freezes the heap as it returns (Python's last collection walks
    every torch object: ~0.6 s); called from Python with arguments it leaves the heap be."""
    import sys

    from dgrun import cli, heap

    frozen = []
    monkeypatch.setattr(heap, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(sys, "argv", ["dgrun", "--version"])
    cli.main()
    assert frozen == [True]
    frozen.clear()
    cli.main(["--version"])
    assert frozen == []


FAST_RUN = ("threads=1", "trainer.max_steps=30", "trainer.max_epochs=null",
            "trainer.stop_at_interpolation=false")
