"""dgrun: an experiment runner for studies of delayed generalization."""
__version__ = "0.1.0"
