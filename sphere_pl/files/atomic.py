"""The one way sphere_pl writes a file: to a temporary file beside it, fsynced, renamed over it.

A reader (or a run resumed after a crash, a full disk or a kill) then finds either the old file
or the new one, never a torn one; the directory is fsynced too, so the rename survives a power
loss. Checkpoints, patches, statistics caches, run files and study reports all go through here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` whole.
    On any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent, default=str) + "\n")
