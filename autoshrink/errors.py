"""The family of errors autoshrink raises for a bad input or an unusable run folder.

Each one is a one-line message that names the problem and the fix; the command prints it as
``autoshrink: error: ...`` with exit code 2. They subclass :class:`AutoshrinkError` (catch them
all at once) and, where the cause is a value the user gave, :class:`ValueError` too.
"""

from __future__ import annotations

__all__ = ["AutoshrinkError", "InputError", "RunNotFoundError"]


class AutoshrinkError(Exception):
    """Base class of autoshrink's own errors: the message is one line, meant for the user."""


class InputError(AutoshrinkError, ValueError):
    """A value the user gave breaks a rule (a count, a budget, a trial number, a name)."""


class RunNotFoundError(AutoshrinkError, FileNotFoundError):
    """A run folder that holds no run (no ``study.db``)."""
