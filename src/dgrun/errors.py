"""The one exception type that reaches a user as a single line (exit code 2, no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: what is wrong, and how to fix it."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


def os_problem(error: OSError, fix: str) -> UserError:
    """An OSError (read-only disk, disk full, a file where a folder should be) as one line."""
    where = f"{error.filename}: " if error.filename else ""
    return UserError(f"{where}{error.strerror or error}", fix)
