"""Atomic file writes: a reader (or a kill) never sees half a file.

Everything dgrun writes into a run directory goes through here (checkpoints, summary.json,
metrics.csv when rewritten, plots, `.hydra/*.yaml`, the manifest, analysis outputs, report
files): the data goes to a temporary file beside the target (`.<name>.tmp-<pid>`, a name
dgrun.rundir sweeps when a killed writer left one), is flushed (and fsynced where a power loss
must not lose it), and `os.replace` puts it in place in one step. Appends (metrics rows) are
fsynced at every checkpoint (`fsync_file`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, IO


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, fsync: bool = True) -> Path:
    """Call `write(f)` on a temporary file, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename durable. Some systems (Windows) cannot open a directory: skip it there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON parsers (JavaScript's) reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict, *, fsync: bool = False) -> Path:
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n"
    return write_text(path, text, fsync=fsync)


def write_text(path: Path, text: str, *, fsync: bool = False) -> Path:
    return write_atomic(Path(path), lambda f: f.write(text.encode()), fsync=fsync)


def write_figure(fig, path: Path, **savefig) -> Path:
    """`fig.savefig` into place atomically (the format from the file's suffix)."""
    path = Path(path)
    return write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png",
                                                    **savefig), fsync=False)


def fsync_file(path: Path) -> None:
    """Make what was appended to `path` durable (a checkpoint's companions: metrics.csv)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
