"""Which errors are refusals (what sphere_pl or Lightning refused, said in one line with what to do)
and which are bugs (a traceback), by type: a `SpherePLError`, a setting Lightning refused, a file
that could not be opened. jsonargparse wraps what a class raises while a config is built, so the
error's chain is searched."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..errors import SpherePLError


def refused_by_sphere_pl(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says what sphere_pl refused (its own error, a setting Lightning
    refused, a file that could not be opened), or None for a bug. jsonargparse wraps what a class raises
    while the config is instantiated, so the chain is searched, by type."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (SpherePLError, MisconfigurationException, OSError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def hint_for(error: BaseException) -> str:
    if isinstance(error, SpherePLError):
        return error.hint
    if isinstance(error, MisconfigurationException):
        return "check the trainer.* settings (trainer.accelerator: auto takes a GPU where there is one)"
    return "check that path in the config or on the command line"


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, MisconfigurationException):
        return "invalid trainer setting: " + text.splitlines()[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) if len(text.splitlines()) <= 3 else text
