"""Checkpoints that survive a kill at any moment and can never run code.

Writes go to a temporary file, are fsynced, then `os.replace`d over `last.pt` (the one before
becomes `previous.pt`), so a kill mid-write always leaves a complete checkpoint behind. Each
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


def _write_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(payload: dict, directory: Path, snapshot_step: Optional[int] = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "digest": _digest(payload)}
    last = directory / LAST
    tmp = directory / f".{LAST}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if last.exists():
        os.replace(last, directory / PREVIOUS)
    os.replace(tmp, last)
    if snapshot_step is not None:
        _write_atomic(payload, directory / f"step_{snapshot_step:08d}.pt")
    _fsync_dir(directory)
    return last


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
