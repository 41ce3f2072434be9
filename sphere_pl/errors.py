"""The errors sphere_pl raises on purpose, and what to do about each.

Every such error derives from `SpherePLError` and carries a `hint`: the CLI prints the message
and the hint as two lines instead of a traceback (`SPHERE_PL_TRACEBACK=1` shows it). Anything
else that escapes is a bug, and keeps its traceback. Each error also derives from the builtin
it refines (`ValueError`, `OSError`, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations


class SpherePLError(Exception):
    """Base of sphere_pl's own errors: a message naming what is wrong, and `hint`, what to do (the class's,
    or one given for this case)."""

    hint = "see the message above"

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class SettingsError(SpherePLError, ValueError):
    """A setting out of range or one that does not fit the model; raised before any edit."""

    hint = "change that value in the config or on the command line (`python -m sphere_pl fit --print_config` shows every setting)"
