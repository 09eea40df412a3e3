"""Memory settings of an `aoi` process: freed memory kept for reuse, and the start-up objects kept out of the
garbage collector's way.

**Freed memory kept in the process** (glibc only), instead of being handed back to the system at once.

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

**Start-up objects frozen.** Importing torch, Lightning and their dependencies creates about 500,000 objects that
live as long as the process. Python's cyclic garbage collector walks all of them in every full collection, and
once more at exit: about 1.5 s of the exit of `aoi fit` and 2 s of collections during it on this 2-core machine.
`frozen_after_startup` turns the collector off while the command imports and loads its model, then moves
everything alive to the collector's permanent generation (`gc.freeze`) and turns it back on, so later collections
and the one at exit skip those objects (exit 1.5 s -> 0.25 s). Forked processes (DataLoader workers) also keep
those memory pages shared. Source: Python documentation, `gc.freeze`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
from collections.abc import Iterator

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


_freeze_enabled = False


def enable_startup_freeze() -> None:
    """Let `frozen_after_startup` freeze in this process. Called by the `aoi` console script and by each serve
    worker: processes of their own, whose start-up objects live until they exit. Library use (tests, notebooks,
    `cli.main` called in-process) leaves it off, since a freeze there would also keep the caller's garbage for good."""
    global _freeze_enabled
    _freeze_enabled = True


@contextlib.contextmanager
def frozen_after_startup() -> Iterator[None]:
    """No cyclic garbage collection inside the block (imports, model loading); at its end, even on an error,
    every object alive is moved to the collector's permanent generation (`gc.freeze`) and the collector is turned
    on again. Nesting and repeating are safe: each block freezes what exists when it ends. Does nothing unless
    `enable_startup_freeze` was called in this process."""
    if not _freeze_enabled:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
