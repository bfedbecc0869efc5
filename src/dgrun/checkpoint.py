"""Checkpoints that survive a kill at any moment and can never run code.

Writes go to a temporary file, are fsynced, then `os.replace`d over `last.pt` (the one before
becomes `previous.pt`; see dgrun.files), so a kill mid-write always leaves a complete checkpoint behind. Each
file carries a digest of its own contents: a truncated or bit-flipped file is detected on load,
and the newest good file is used instead. Loading uses `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import os
import re
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from dgrun.errors import UserError
from dgrun.files import fsync_dir, write_atomic

LAST, PREVIOUS = "last.pt", "previous.pt"
SNAPSHOT = re.compile(r"step_(\d+)\.pt$")


def _digest(obj: Any, h=None) -> str:
    """A content hash over tensors and plain values, independent of pickling details."""
    top = h is None
    h = h or hashlib.blake2b(digest_size=16)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


def save(payload: dict, directory: Path, snapshot_step: Optional[int] = None) -> Path:
    """Write `last.pt` (the one before becomes `previous.pt`) and optionally a snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "digest": _digest(payload)}
    write = lambda f: torch.save(payload, f)  # noqa: E731
    last = directory / LAST
    fresh = write_atomic(directory / f".{LAST}.new", write)
    if last.exists():
        os.replace(last, directory / PREVIOUS)
    os.replace(fresh, last)
    if snapshot_step is not None:
        write_atomic(snapshot_path(directory, snapshot_step), write)
    fsync_dir(directory)
    return last


def snapshot_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def load_file(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and verify one checkpoint file; raise ValueError if it is damaged."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle, an unsafe global...
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(payload, dict) or "digest" not in payload:
        raise ValueError(f"{path} is not a dgrun checkpoint")
    stored = payload.pop("digest")
    if _digest(payload) != stored:
        raise ValueError(f"{path} is corrupt (its contents do not match their digest)")
    return payload


def candidates(directory: Path) -> list[Path]:
    """Checkpoint files, newest first: last, previous, then snapshots by step."""
    if not directory.is_dir():
        return []
    snaps = sorted((p for p in directory.iterdir() if SNAPSHOT.match(p.name)),
                   key=lambda p: int(SNAPSHOT.match(p.name).group(1)), reverse=True)
    return [p for p in (directory / LAST, directory / PREVIOUS) if p.exists()] + snaps


def load_latest(directory: Path, map_location: str | torch.device = "cpu") -> Optional[dict]:
    """The newest checkpoint that verifies, warning about each damaged one skipped.

    None if the directory holds no checkpoint at all; UserError if it holds only damaged ones
    (the files stay where they are for inspection).
    """
    files = candidates(directory)
    if not files:
        return None
    problems = []
    for path in files:
        try:
            payload = load_file(path, map_location)
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            logging.getLogger("dgrun").warning("skipping damaged checkpoint: %s", problem)
        return payload
    raise UserError(f"no usable checkpoint in {directory}: {problems[0]}",
                    "delete the damaged files to start over, or set trainer.resume=false")
