"""Every preset's run figures and every analysis's figures, from real runs, in one folder.

    python experiments/gallery/make_gallery.py            # ~5 minutes on one CPU thread
    python experiments/gallery/make_gallery.py --work /tmp/gallery-runs --only grokking

Trains each run below with `dgrun` (one thread, run directories under --work), runs the
analyses on them with `dgrun analyze`, and copies every PNG they wrote into this folder as
<run>__<figure>.png (run plots) or <run>__<analysis>__<figure>.png. Nothing here is drawn by
hand: re-run it after changing a preset or a figure and look at the result.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (the dgrun overrides, the analyses to run on it as (what, options))
RUNS: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {
    "grokking": (["phenomenon=grokking", "trainer.snapshots=log"],
                 [("features", []), ("transition", []), ("dynamics", [])]),
    "phase_transition": (["phenomenon=phase_transition"], [("dynamics", [])]),
    "rethinking_random_labels": (["phenomenon=rethinking", "corruption=random_labels"], []),
    # The paper's 0.95 decay per *digits* epoch (12 steps): the lr is gone before the labels
    # are fit, and the figure says the run stalled.
    "rethinking_stalled": (["phenomenon=rethinking", "corruption=random_labels",
                            "scheduler.epoch_steps=null"], []),
    "simplicity_bias": (["phenomenon=simplicity_bias", "trainer.snapshots=log"],
                        [("bias", []), ("color", [])]),
    "robustness": (["phenomenon=robustness", "trainer.snapshots=log"], [("robustness", [])]),
    # The README's Analysis commands: noisy labels with per-example tracking, a conv net,
    # Nanda et al.'s transformer.
    "noisy_labels": (["corruption=partial_labels", "corruption.prob=0.3",
                      "trainer.track_examples=true", "trainer.snapshots=log", "optimizer=adam",
                      "trainer.max_epochs=40", "trainer.stop_at_interpolation=false"],
                     [("cartography", []), ("attribution", [])]),
    "alexnet": (["model=alexnet", "trainer.snapshots=log", "trainer.max_epochs=30"],
                [("gradcam", [])]),
    "nanda": (["experiment=nanda2023", "trainer.max_steps=300"], [("attention", [])]),
}


def dgrun(*args: str) -> None:
    command = [sys.executable, "-m", "dgrun.cli", *args]
    print("$ dgrun " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): dgrun {' '.join(args)}\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="where the run directories go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=HERE, help="where the figures go")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="some runs only")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dgrun-gallery-"))
    for name in args.only or RUNS:
        overrides, analyses = RUNS[name]
        run_dir = work / name
        dgrun(*overrides, f"hydra.run.dir={run_dir}", "threads=1", "quiet=true",
              "trainer.progress=none", "trainer.resume=false")
        for what, options in analyses:
            dgrun("analyze", str(run_dir), what, *options)
        for old in args.out.glob(f"{name}__*.png"):
            old.unlink()
        for png in sorted(run_dir.glob("plots/*.png")):
            shutil.copy(png, args.out / f"{name}__{png.name}")
        for png in sorted(run_dir.glob("analysis/*/*.png")):
            shutil.copy(png, args.out / f"{name}__{png.parent.name}__{png.name}")
    print(f"figures in {args.out}; runs in {work}")


if __name__ == "__main__":
    main()
