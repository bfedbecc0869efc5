"""Dataset registry. A builder takes plain keyword options and returns a raw Bundle (see
bundle.py); corruption and preprocessing are applied afterwards by `dgrun.data.pipeline`.
"""
from __future__ import annotations

from dgrun.data.bundle import Bundle, Meta, Split
from dgrun.registry import Registry

DATASETS = Registry("dataset")

__all__ = ["DATASETS", "Bundle", "Meta", "Split"]

# Importing the modules registers their builders.
from dgrun.data import embedded, vision  # noqa: E402,F401
from dgrun.data import algorithmic  # noqa: E402,F401
from dgrun.data import spurious_images, spurious_synthetic  # noqa: E402,F401
