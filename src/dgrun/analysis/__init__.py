"""`dgrun analyze RUN_DIR WHAT`: analyses of a run's checkpoints and records.

Each module holds plain functions over explicit arguments (models, tensors, metrics rows,
(step, state_dict) checkpoints) returning a `Result`, a figure writer, and an adapter from a
loaded run registered in ANALYSES under the WHAT name:

    cartography  attribution  transition  bias  gradcam  features  attention  color  dynamics
    robustness  memorization (over the subset models of a sweep or ensemble)  influence
    progress

`analyze(what, run, out_dir, **options)` runs one and writes its tables (CSV), summary.json
and figures (PNG) to out_dir.
"""
from dgrun.analysis.base import ANALYSES, ExampleTrace, Result, RunArtifacts, analyze, write

__all__ = ["ANALYSES", "ExampleTrace", "Result", "RunArtifacts", "analyze", "write"]

# Importing the modules registers their analyses.
from dgrun.analysis import (attention, attribution, cartography, color, dynamics,  # noqa: E402,F401
                            ekfac, features, gradcam, influence, memorization,
                            progress, robustness, transition)
