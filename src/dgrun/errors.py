"""The one exception type that reaches a user as a single line (exit code 2, no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: what is wrong, and how to fix it."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
