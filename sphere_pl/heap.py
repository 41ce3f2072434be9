"""Giving freed CPU memory back to the operating system between editing phases.

glibc keeps the memory that torch and Python free inside its heap, for reuse. Each editing
phase (value search, key reads, the solve, evaluation) allocates tensors of other sizes than
the phase before, which often do not fit the kept holes, so without a trim every phase's peak
stacks on the free-but-resident memory the earlier phases left (on SmolLM2 about 0.1 GB of
the editing peak: BENCHMARKS.md, "Where the memory goes"). A trim takes milliseconds.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the heap's free pages to the system (glibc's malloc_trim); False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
