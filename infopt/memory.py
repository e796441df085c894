"""Process memory housekeeping for the streaming jobs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim); False where glibc is not the allocator.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so layer-sized tensors
    later come from the heap, and a fragmented heap keeps freed layers resident: without this, the peak of a
    32-layer GPTQ run grew to 1.7 GiB against 0.74 GiB (measured; 4 layers: 0.78 GiB). Called once per layer.
    A fixed 1 MiB mmap threshold kept the peak flat as well but made the run 25% slower (page faults).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
