"""dgrun: an experiment runner for studies of delayed generalization."""
import os

# Idle OpenMP threads sleep rather than spin. libgomp's default spins a waiting thread for a
# while, and on a machine other processes keep busy that spinning takes the CPU a thread with
# work needs: benchmarks/README.md measured 2-thread steps 10-40x slower than 1 thread under
# load with the default, and no slower than 1 thread with PASSIVE. libgomp reads this once, when
# torch loads it, so it is set here, before dgrun imports torch; a value already exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
