"""Python's garbage collector, kept out of a training process's way.

torch, its compiler stack (torch._dynamo, which every torch optimizer imports) and matplotlib
leave millions of objects that live as long as the process. Python's full collections walk
all of them each time the heap has grown by a quarter, and once more at exit: 0.8 s of GC in
an 8-s grokking run, plus ~0.6 s at exit (benchmarks/README.md, "fixed cost"). `gc.freeze`
moves every object alive into a generation that collections skip: what a run imports and
builds before it trains is alive until its end anyway.

A frozen object that becomes garbage in a reference cycle is not collected while frozen, so
`settled()` thaws at the end of the run: a sweep of many runs in one process (`dgrun -m`)
keeps no earlier run's cycles.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


def freeze() -> None:
    """Everything alive now is left out of later collections (and the one at exit)."""
    gc.freeze()


@contextlib.contextmanager
def settled() -> Iterator[None]:
    """A run's training and record with what was built before it frozen; thawed after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
