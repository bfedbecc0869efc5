"""Reading a run directory's records back (`show`, `report`, `analyze`, `reopen`).

A run may be read while it writes, after a kill, or after someone edited its files. What a
kill can leave (a half-written last row of metrics.csv) is tolerated: dropped, with a note. A
file that is damaged otherwise (summary.json that is not a JSON object, a `.hydra/*.yaml` of
the wrong shape) is refused in one line naming it and the fix, never a traceback further on.
A missing file is not damage: each reader says what it gives then.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from dgrun.errors import UserError

REMAKE = ("restore it, or move it aside: dgrun then reads the run from its checkpoint, "
          "metrics.csv and .hydra/")
KEEPS_CONFIG = ("restore it, or move it aside: summary.json and the checkpoints record the "
                "config too")


def note(text: str) -> None:
    """Something a reader skipped or dropped: on stderr, so tables on stdout stay clean."""
    print(f"dgrun: note: {text}", file=sys.stderr)


def damaged(path: Path, what: str, fix: str = REMAKE) -> UserError:
    return UserError(f"{path} is damaged: {what}", fix)


def read_summary(path: Path) -> dict:
    """summary.json as a dict; {} when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise damaged(path, "it is not text") from None
    try:
        summary = json.loads(text)
    except ValueError as e:
        raise damaged(path, f"not JSON ({e})") from None
    if not isinstance(summary, dict):
        raise damaged(path, f"a JSON {type(summary).__name__}, not an object")
    for key, kind in (("config", dict), ("overrides", list)):  # what readers rebuild a run from
        if summary.get(key) is not None and not isinstance(summary[key], kind):
            raise damaged(path, f"its '{key}' is not a {'mapping' if kind is dict else 'list'}")
    return summary


def read_yaml(path: Path, kind: type, what: str) -> Any:
    """A `.hydra/` file that must hold a `kind` (dict or list); None when there is none."""
    try:
        value = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise damaged(path, f"not YAML ({str(e).splitlines()[0]})",
                      KEEPS_CONFIG) from None
    if value is None:
        return None
    if not isinstance(value, kind):
        raise damaged(path, f"{what}, not a {type(value).__name__}",
                      KEEPS_CONFIG)
    return value


def read_config(run_dir: Path) -> Optional[dict]:
    return read_yaml(run_dir / ".hydra" / "config.yaml", dict, "the config must be a mapping")


def read_overrides(run_dir: Path) -> Optional[list]:
    return read_yaml(run_dir / ".hydra" / "overrides.yaml", list,
                     "the overrides must be a list")


def metrics_text(path: Path) -> Optional[str]:
    """metrics.csv's complete rows, as text; None when there is no file.

    Each row is appended as one line ending in a newline: a last line without one was cut off
    (a kill mid-write, or a run writing it right now) and is dropped, with a note."""
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except UnicodeDecodeError:
        raise damaged(path, "it is not text", "restore it, or move it aside") from None
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        note(f"{path}: dropped a half-written last row ({text[cut:][:40]!r}): the run was "
             "killed while writing it, or is writing it now")
        text = text[:cut]
    return text


def read_metrics_rows(path: Path) -> list[dict]:
    """metrics.csv's complete rows as dicts of numbers (text where a cell is not a number,
    None where it is blank); [] when there is no file."""
    text = metrics_text(path)
    return [{k: _number(v) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text or ""))]


def _number(text: Optional[str]) -> Any:
    if text is None or text == "":  # None: a row with fewer cells than the header
        return None
    try:
        return float(text)
    except ValueError:
        return text
