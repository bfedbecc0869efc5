"""dgrun: an experiment runner for studies of delayed generalization."""
import os

# Idle OpenMP threads sleep rather than spin. libgomp's default spins a waiting thread for a
# while, and on a machine other processes keep busy that spinning takes the CPU a thread with
# work needs: benchmarks/README.md measured 2-thread steps 4-46x slower than 1 thread under
# load with the default, and 0.70-4.4x the speed of 1 thread with PASSIVE. libgomp reads it
# once, when torch loads it, so it is set here, before dgrun imports torch; a value already
# exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
