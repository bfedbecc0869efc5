"""Process-wide settings a run depends on: CPU threads, deterministic mode, the device.

Set in full at the start of every run, never only when asked: joblib's launcher reuses worker
processes, so whatever the previous job of a local sweep set (threads, deterministic mode, the
current CUDA device) would otherwise carry into the next one.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from dgrun.errors import UserError

# What torch chose for this process before any run changed it: `threads=null` restores it.
INITIAL_THREADS = torch.get_num_threads()


# Below this much work per training step (multiply-accumulates of the Linear and Conv layers,
# forward pass, whole batch), a second thread costs about what it saves: benchmarks/threads.py
# on an idle 2-core machine measured the digits MLP (5M) no faster with 2 threads, while
# steps of 39M-155M already ran 1.3-1.6x faster. On a busy machine choose_threads takes 1
# whatever the size. See benchmarks/README.md.
SMALL_STEP_MACS = 2e7


def available_cpus() -> int:
    """CPUs this process may use: its affinity, its cgroup's quota and Slurm's allocation."""
    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1]
    try:  # cgroup v2: "max 100000" (no limit) or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            counts.append(math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        counts.append(int(slurm))
    return max(1, min(counts))


def auto_threads(step_macs: float, parallel_jobs: int = 1) -> int:
    """The count `threads=auto` starts from: this job's share of the CPUs, or 1 for a model
    too small to gain. choose_threads then checks it against the machine's load."""
    if step_macs < SMALL_STEP_MACS:
        return 1
    return max(1, available_cpus() // max(1, parallel_jobs))


# A machine is too busy for more threads when tasks waited for a CPU this share of the last
# 10 s (/proc/pressure/cpu "some avg10", in percent): every extra thread then queues behind
# other processes, and a parallel region waits for its slowest thread. On the busy 2-core
# machine of benchmarks/README.md it read 65-99 while the load average was 5-9.
BUSY_PRESSURE = 20.0
# A trial's N threads must beat 1 thread by this factor to be kept: below it the gain is within
# a busy machine's noise, and 1 thread is the choice that never hurts.
TRIAL_GAIN = 1.15
# Above this much work a step gains from free CPUs for certain (1.3-1.6x from 39M on), and a
# trial of 6 steps would cost seconds to minutes: the load checks decide alone.
TRIAL_MAX_MACS = 1e9


@dataclass
class MachineLoad:
    """What the machine is doing besides this run, read once at its start."""
    average: float                 # 1-minute load average (runnable + waiting tasks)
    pressure: Optional[float]      # /proc/pressure/cpu some avg10 (%), None where unavailable
    running: Optional[float] = None  # other tasks runnable right now (median of a few looks)


def machine_load(samples: int = 5) -> MachineLoad:
    pressure = None
    try:  # "some avg10=1.23 avg60=... total=..." (Linux >= 4.20 with PSI)
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        pressure = float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    running = []
    try:  # "0.52 0.58 0.59 3/467 12345": runnable tasks now / all tasks; one of them is this one
        for k in range(samples):
            running.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
            if k + 1 < samples:
                time.sleep(0.01)
    except (OSError, IndexError, ValueError):
        running = []
    return MachineLoad(average, pressure, sorted(running)[len(running) // 2] if running else None)


def choose_threads(step_macs: float, *, cpus: int, parallel_jobs: int = 1,
                   load: Optional[MachineLoad] = None,
                   trial: Optional[Callable[[int], tuple[float, float]]] = None
                   ) -> tuple[int, str]:
    """`threads=auto` for one run: (count, why). Never more than 1 thread unless the step is
    big enough to gain, the CPUs are free, and a timed trial shows the gain.

    trial(n) -> (seconds a step took with 1 thread, with n threads), run only when n > 1.
    """
    share = max(1, cpus // max(1, parallel_jobs))
    if share == 1:
        return 1, f"{cpus} CPU(s) for {parallel_jobs} job(s)"
    if step_macs < SMALL_STEP_MACS:
        return 1, f"a small step ({step_macs / 1e6:.3g}M multiply-adds)"
    if load is not None:
        if load.pressure is not None and load.pressure >= BUSY_PRESSURE:
            return 1, f"a busy machine (CPU pressure {load.pressure:.0f}%)"
        # Other processes' runnable tasks take their CPUs. The load average lags a minute (it
        # still counts a run that just ended, e.g. the previous job of a sweep): the smaller of
        # it and the tasks runnable right now.
        taken = load.average if load.running is None else min(load.average, load.running)
        free = cpus - taken
        if math.floor(free + 0.5) < share:
            share = max(1, math.floor(free + 0.5))
            if share == 1:
                now = "" if load.running is None else f", {load.running} other tasks running"
                return 1, f"a busy machine (load average {load.average:.2f}{now}, {cpus} CPUs)"
    if trial is not None and step_macs < TRIAL_MAX_MACS:
        one, many = trial(share)
        if many * TRIAL_GAIN > one:
            return 1, (f"a trial: {share} threads {one / max(many, 1e-12):.2f}x the speed of 1 "
                       f"(under {TRIAL_GAIN}x)")
        return share, f"a trial: {share} threads {one / max(many, 1e-12):.2f}x the speed of 1"
    return share, f"{share} free CPUs"


def time_step(step: Callable[[], None], threads: int, repeats: int = 2) -> float:
    """Seconds one call of `step` takes with `threads` threads: the best of `repeats` after a
    warm-up call (the first call pays allocation and kernel selection)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)
    finally:
        torch.set_num_threads(before)


def step_trial(model: nn.Module, batch: torch.Tensor) -> Callable[[int], tuple[float, float]]:
    """trial(n) for choose_threads: a forward and backward pass of `batch` through a copy of
    the model (the run's own model, optimizer and random streams are left untouched), timed
    with 1 thread and with n."""
    def trial(n: int) -> tuple[float, float]:
        scratch = copy.deepcopy(model).train()  # only when a trial runs: a large model's copy

        def step() -> None:
            with torch.random.fork_rng(devices=[]):  # dropout draws from the run's generator
                scratch(batch).float().sum().backward()
            scratch.zero_grad(set_to_none=True)

        return time_step(step, 1), time_step(step, n)  # 1 first: see start_threads

    return trial


def resolve_auto_threads(model: nn.Module, batch: torch.Tensor, *, parallel_jobs: int = 1,
                         recorded: Optional[int] = None, members: int = 1) -> tuple[int, str]:
    """`threads=auto` for a run on the CPU, set and returned as (count, why). A resumed run
    keeps the count it started with (`recorded`, from its summary.json): thread counts can
    change the float rounding of a step, and a resume must replay the run exactly."""
    if recorded is not None:
        torch.set_num_threads(int(recorded))
        return int(recorded), "the count this run started with"
    macs = step_macs(model, batch) * members
    threads, why = choose_threads(macs, cpus=available_cpus(), parallel_jobs=parallel_jobs,
                                  load=machine_load(), trial=step_trial(model, batch))
    torch.set_num_threads(threads)
    return threads, why


def start_threads(setting, parallel_jobs: int = 1) -> Optional[int]:
    """The thread count to load data with: `auto` starts with 1 (resolve_auto_threads raises it
    once the model is known and the CPUs are free); N is N; None is torch's own.

    Not the CPUs' share: a thread pool started at 2 threads and then set to 1 ran a 1-thread
    step 1.0-2.2x slower than one started at 1 on a busy 2-core machine (5 of 6 paired runs),
    and a busy machine is where `auto` ends at 1."""
    if setting == "auto":
        return 1
    return setting


def step_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass of `x` through the Linear and Conv layers."""
    total = [0.0]

    def count(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.weight[0].numel()  # in_channels / groups * kernel volume
            total[0] += out.numel() * per_output

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]


def configure(*, threads: Optional[int], deterministic: bool, device: str,
              job_num: Optional[int] = None) -> torch.device:
    torch.set_num_threads(threads or INITIAL_THREADS)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when first used.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        # Only when it changes: the call imports torch's compiler stack (~2 s of start-up).
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    resolved = resolve_device(device, job_num)
    if resolved.type == "cuda":
        # So defaults (streams, events, synchronize, generators) follow this run's device;
        # plain `cuda` is cuda:0 again, whatever a previous job in this worker chose.
        torch.cuda.set_device(resolved.index or 0)
    return resolved


def resolve_device(name: str, job_num: Optional[int] = None) -> torch.device:
    """`auto`: the GPU if there is one. In a sweep (job_num set) with several visible GPUs, job
    k takes cuda:(k % count), so jobs run in parallel (hydra/launcher=local) spread over them."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if job_num is not None and count > 1:
            return torch.device(f"cuda:{job_num % count}")
        return torch.device("cuda")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but no CUDA device is visible",
                            "use device=cpu or auto")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device={name} but only {count} CUDA device(s) are visible "
                            f"(cuda:0..cuda:{count - 1})", "use device=cuda or auto")
        return device
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("device=mps but this machine has no MPS device", "use device=cpu or auto")
    return torch.device(name)
