"""Process-wide settings a run depends on: CPU threads, deterministic mode, the device.

Set in full at the start of every run, never only when asked: joblib's launcher reuses worker
processes, so whatever the previous job of a local sweep set (threads, deterministic mode, the
current CUDA device) would otherwise carry into the next one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dgrun.errors import UserError

# What torch chose for this process before any run changed it: `threads=null` restores it.
INITIAL_THREADS = torch.get_num_threads()


# Below this much work per training step (multiply-accumulates of the Linear and Conv layers,
# forward pass, whole batch), a second thread costs about what it saves: benchmarks/threads.py
# on an idle 2-core machine measured the digits MLP (5M) no faster with 2 threads, while
# steps of 39M-155M already ran 1.3-1.6x faster. On a busy machine extra threads are much
# slower at any size (threads=1 there). See benchmarks/README.md.
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
    """`threads=auto`: this job's share of the CPUs, or 1 for a model too small to gain."""
    if step_macs < SMALL_STEP_MACS:
        return 1
    return max(1, available_cpus() // max(1, parallel_jobs))


def start_threads(setting, parallel_jobs: int = 1) -> Optional[int]:
    """The thread count to load data with: `auto` starts with this job's share of the CPUs
    (and may drop to 1 once the model is known: auto_threads); N is N; None is torch's own."""
    if setting == "auto":
        return max(1, available_cpus() // max(1, parallel_jobs))
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
