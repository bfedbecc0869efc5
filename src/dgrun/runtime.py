"""Process-wide settings a run depends on: CPU threads, deterministic mode, the device.

Set in full at the start of every run, never only when asked: joblib's launcher reuses worker
processes, so whatever the previous job of a local sweep set (threads, deterministic mode, the
current CUDA device) would otherwise carry into the next one.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from dgrun.errors import UserError

# What torch chose for this process before any run changed it: `threads=null` restores it.
INITIAL_THREADS = torch.get_num_threads()


def configure(*, threads: Optional[int], deterministic: bool, device: str,
              job_num: Optional[int] = None) -> torch.device:
    torch.set_num_threads(threads or INITIAL_THREADS)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when first used.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
