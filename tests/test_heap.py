"""`trim_heap` really gives freed heap memory back to the system (glibc only)."""

import os

import pytest

from sphere_pl.heap import trim_heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_trim_heap_returns_the_free_pages_that_live_blocks_pin():
    if not trim_heap():
        pytest.skip("this libc has no malloc_trim")
    # 160 MB of 4 kB blocks come from the heap (below glibc's mmap threshold); keeping every
    # 100th pins the heap's end, so freeing the rest returns nothing to the system by itself
    blocks = [bytearray(4000) for _ in range(40_000)]
    kept = blocks[::100]
    del blocks
    before = _rss_bytes()
    trim_heap()
    released = before - _rss_bytes()
    assert released > 100e6, f"{released / 1e6:.1f} MB released"
    assert len(kept) == 400
