"""A run directory and the files dgrun writes into it.

    .hydra/             config.yaml (as composed), overrides.yaml, hydra.yaml
    metrics.csv         one row per evaluation
    summary.json        status, final numbers, interpolation point, what was applied, versions
    plots/*.png         the run's figures
    checkpoints/*.pt    last.pt, previous.pt, optional snapshots
    .dgrun/manifest     every file and folder dgrun created here, one relative path a line

The manifest is what makes `trainer.resume=false` safe in a directory the user also uses
(`hydra.run.dir=.`): only what dgrun wrote is removed, never the user's own `plots/`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

MANIFEST = ".dgrun/manifest"
# Any of these: a dgrun run was here (a user's own checkpoints/ folder is not one).
RECORD = ("summary.json", "metrics.csv", "checkpoints/last.pt", "checkpoints/previous.pt")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: Optional[set[str]] = None

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
        new = [e for e in entries if e not in self._manifest()]
        if new:
            manifest = self.path / MANIFEST
            manifest.parent.mkdir(parents=True, exist_ok=True)
            with open(manifest, "a") as f:
                f.writelines(e + "\n" for e in new)
            self._known.update(new)

    def _manifest(self) -> set[str]:
        if self._known is None:
            try:
                self._known = set((self.path / MANIFEST).read_text().splitlines())
            except FileNotFoundError:
                self._known = set()
        return self._known

    def owned(self) -> list[str]:
        return sorted(self._manifest())

    def clear(self) -> None:
        """Remove what dgrun wrote here (files, then the folders it made if now empty)."""
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
