"""Keep freed memory in the process for reuse instead of handing it back to the system at once (glibc only).

Torch on CPU allocates every activation with `posix_memalign`. glibc serves blocks above its mmap threshold
(at most 32 MB) with a fresh `mmap` and unmaps them on free, so each batch's large activations are zero-filled
page by page again: on a 2-core machine EfficientNet-Lite0 at 256 px and batch 32 spends nearly half its forward
time in page faults (27 ms per image against 15 ms once freed memory is reused; `tools/allocator_benchmark.py`).
PyTorch's CPU performance guide answers this with jemalloc or tcmalloc; glibc gets the same effect from two
`mallopt` settings, with no extra library:

- `M_MMAP_MAX = 0`: large blocks come from the heap like small ones, so a freed block is reused as it is;
- `M_TRIM_THRESHOLD = 2 GiB - 1`: the heap's free top is kept (up to 2 GiB) instead of being returned at once.

The cost is a higher resident size after a peak: memory freed by one phase stays with the process for the next
(`aoi fit` of PaDiM on transistor: 3.8 GB peak resident against 3.1 GB, in 0.88x the wall time).
`AOI_SYSTEM_ALLOCATOR=1` in the environment keeps glibc's defaults. Elsewhere than glibc (macOS, Windows, musl)
nothing changes.

Source: glibc manual, "Malloc Tunable Parameters" (`mallopt`); PyTorch Performance Tuning Guide, "Use
OpenMP / switch memory allocator".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: `mallopt` parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The largest trim threshold `mallopt` takes (an int): the heap keeps up to this much free memory at its top.
KEEP_FREED_BYTES = 2**31 - 1
#: Set to 1 to keep glibc's default allocator settings.
OPT_OUT_VARIABLE = "AOI_SYSTEM_ALLOCATOR"

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above to this process (once; later calls return the first answer).

    Returns:
        True when glibc took both settings; False with `AOI_SYSTEM_ALLOCATOR=1`, on another C library, or when
        `mallopt` refused one.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return _applied
