"""A run directory and the files dgrun writes into it.

    .hydra/             config.yaml (as composed), overrides.yaml, hydra.yaml
    metrics.csv         one row per evaluation
    summary.json        status, final numbers, interpolation point, what was applied, versions
    plots/*.png         the run's figures
    checkpoints/*.pt    last.pt, previous.pt, optional snapshots
    .dgrun/manifest     every file and folder dgrun created here, one relative path a line
    .dgrun/lock         while a command writes here: who (host, pid, since when)

The manifest is what makes `trainer.resume=false` safe in a directory the user also uses
(`hydra.run.dir=.`): only what dgrun wrote is removed, never the user's own `plots/`.

One writer per directory: `RunLock` holds a POSIX record lock (`fcntl.lockf`, i.e. fcntl
F_SETLK) on `.dgrun/lock` for as long as the command runs. The kernel drops it when the process
ends, however it ends (SIGKILL, a crash), so a stale lock never needs clearing by hand. POSIX
locks are the kind NFS (v4, or v3 with lockd) and Lustre/GPFS carry between machines, unlike
flock(2) on some NFS clients. The file also holds the holder's host, pid and start time, for
the message a second command gets.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from dgrun.errors import UserError
from dgrun.files import write_text

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

MANIFEST = ".dgrun/manifest"
LOCK = ".dgrun/lock"
# Temporary files of writes a killed process left half-way: dgrun.files.write_atomic names
# them `.<name>.tmp-<pid>` (a checkpoint's `..last.pt.new.tmp-<pid>` too).
TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")
# Any of these: a dgrun run was here (a user's own checkpoints/ folder is not one).
RECORD = ("summary.json", "metrics.csv", "checkpoints/last.pt", "checkpoints/previous.pt")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: Optional[set[str]] = None
        self._order: list[str] = []  # the manifest's lines, in the order they were noted

    # -------------------------------------------------------------- layout
    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def hydra(self) -> Path:
        return self.path / ".hydra"

    def has_record(self) -> bool:
        return any((self.path / name).exists() for name in RECORD)

    # -------------------------------------------------------------- manifest
    def folder(self, rel: str, whole: bool = False) -> Path:
        """A folder of the run; created (and so owned by dgrun) if it does not exist.

        whole: dgrun (or a tool it drives: TensorBoard, MLflow) owns everything that will be
        written inside a folder it created, so clearing removes the whole tree.
        """
        path = self.path / rel
        missing = []
        for parent in [path, *path.parents]:
            if parent == self.path or parent.exists():
                break
            missing.append(parent)
        for parent in reversed(missing):
            parent.mkdir()
        entries = [os.path.relpath(p, self.path) + "/" for p in reversed(missing)]
        if whole and missing and missing[0] == path:
            entries[-1] += "**"
        self._note(entries)
        return path

    def claim(self, path: Path) -> Path:
        """Note that dgrun writes the file `path` (its folder is created if missing)."""
        path = Path(path)
        rel = path.relative_to(self.path) if path.is_absolute() else path
        if len(rel.parts) > 1:
            self.folder(str(rel.parent))
        self._note([str(rel)])
        return self.path / rel

    def _note(self, entries) -> None:
        known = self._manifest()
        new = [e for e in entries if e not in known]
        if new:
            # Rewritten whole, atomically: a kill mid-write never leaves half a line (the
            # manifest is what `trainer.resume=false` trusts to remove only dgrun's files).
            manifest = self.path / MANIFEST
            manifest.parent.mkdir(parents=True, exist_ok=True)
            lines = self._order + new
            write_text(manifest, "".join(e + "\n" for e in lines))
            self._order = lines
            known.update(new)

    def _manifest(self) -> set[str]:
        if self._known is None:
            try:
                self._order = (self.path / MANIFEST).read_text().splitlines()
            except FileNotFoundError:
                self._order = []
            self._known = set(self._order)
        return self._known

    def owned(self) -> list[str]:
        return sorted(self._manifest())

    def clear(self, analyses: bool = False) -> None:
        """Remove what dgrun wrote here (files, then the folders it made if now empty).

        analyses: also `analysis/`, what `dgrun analyze` wrote about the run being replaced."""
        if analyses:
            shutil.rmtree(self.path / "analysis", ignore_errors=True)
        entries = self._manifest() or self._legacy_record()
        for entry in entries:
            if entry.endswith("/**"):
                shutil.rmtree(self.path / entry[:-3], ignore_errors=True)
            elif not entry.endswith("/"):
                (self.path / entry).unlink(missing_ok=True)
        folders = [e.removesuffix("**") for e in entries if e.endswith(("/", "/**"))]
        for entry in sorted(folders, key=len, reverse=True):
            try:
                (self.path / entry).rmdir()
            except OSError:
                pass  # not empty: the user's files are in it
        (self.path / MANIFEST).unlink(missing_ok=True)
        self._known = None
        try:  # the manifest's own folder
            (self.path / MANIFEST).parent.rmdir()
        except OSError:
            pass

    def _legacy_record(self) -> set[str]:
        """A run written before manifests existed: only the files dgrun names itself."""
        names = {"summary.json", "metrics.csv", "plots/loss.png", "plots/accuracy.png",
                 "checkpoints/last.pt", "checkpoints/previous.pt"}
        if self.checkpoints.is_dir():
            names |= {f"checkpoints/{p.name}" for p in self.checkpoints.glob("step_*.pt")}
        return {n for n in names if (self.path / n).exists()}


# ------------------------------------------------------------------ one writer
class DirectoryHeld(UserError):
    """Another live dgrun command writes into this directory (nothing here was touched)."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder["since"]))
        return f"host {holder['host']}, pid {holder['pid']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


_HELD_HERE: set[str] = set()  # the directories this process holds


class RunLock:
    """`with RunLock(dir):` the one writer of `dir`, or DirectoryHeld naming the holder.

    The lock file is removed on release; the folders the lock made for itself (`.dgrun/`,
    even the run directory) go too when nothing else was written, so a refused command leaves
    a directory exactly as it was.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: Optional[int] = None
        self._made: list[Path] = []

    def __enter__(self) -> "RunLock":
        if fcntl is None:  # no POSIX locks (Windows): one writer is the user's to ensure
            return self
        # POSIX locks belong to the process: a second RunLock here would be granted, and its
        # release would drop the first. So this process keeps its own list.
        key = os.path.realpath(self.run_dir)
        if key in _HELD_HERE:
            raise DirectoryHeld(f"{self.run_dir} is in use by this process (pid {os.getpid()})",
                                "use another hydra.run.dir")
        self._made = [p for p in (self.path.parent, self.run_dir) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._remove_made()
                raise DirectoryHeld(
                    f"{self.run_dir} is in use by another dgrun command "
                    f"({_holder_text(self.path)})",
                    "wait for it to end (dgrun show shows its progress), or use another "
                    "hydra.run.dir") from None
            # The file may have been unlinked by a holder releasing it just before our lock:
            # then it is no longer the lock file, and we try again on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.time()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        _HELD_HERE.add(key)
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            # Unlink while still holding it, so nobody can lock the old file after us.
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            _HELD_HERE.discard(os.path.realpath(self.run_dir))
            self._remove_made()
        return False

    def _remove_made(self) -> None:
        for folder in self._made:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


def holder(run_dir: Path) -> Optional[str]:
    """Who holds `run_dir` ("host h, pid p, since t"), or None when no live process does.

    Never call it on a directory this process holds: a POSIX lock is per process, and
    closing any descriptor of the file would release it.
    """
    if fcntl is None:
        return None
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder_text(path)
    finally:
        os.close(fd)
    return None


def sweep_temporary(run_dir: Path) -> list[Path]:
    """Remove the temporary files of writes that a killed dgrun process left half-way.

    Call it holding the lock: then no live writer owns any of them. Only dgrun's own names
    (`.<name>.tmp-<pid>`) in the folders dgrun writes are touched."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "plots", run_dir / ".hydra",
                   run_dir / ".dgrun"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
