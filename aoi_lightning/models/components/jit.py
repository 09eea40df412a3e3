"""Importing the package's numba kernel modules (their kernels compile on first use, then load from numba's disk
cache), and the lock and thread count their parallel calls share."""

from __future__ import annotations

import importlib
import os
import tempfile
import threading
from types import ModuleType

#: One parallel kernel call at a time: numba's simplest threading layer (workqueue) is not thread-safe.
PARALLEL_LOCK = threading.Lock()
#: Where numba's cache goes when neither the folder of the source nor the user's cache folder is writable.
FALLBACK_CACHE_DIR = os.path.join(tempfile.gettempdir(), "aoi-numba-cache")


def import_kernels(module: str) -> ModuleType:
    """Import `module` (e.g. `aoi_lightning.models.components._coreset_kernel`); its kernels compile on first use
    or load from numba's cache.

    numba caches next to the source or in the user's cache folder; where neither is writable (a read-only
    install and home), the cache goes to `FALLBACK_CACHE_DIR` instead of failing.

    Raises:
        ImportError: numba (or llvmlite) is not installed; any other error of numba's compiler as it is.
    """
    import numba

    try:
        return importlib.import_module(module)
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
        numba.config.CACHE_DIR = FALLBACK_CACHE_DIR
        return importlib.import_module(module)


def parallel_threads() -> int:
    """Threads for a parallel kernel: as many as PyTorch is set to use, within numba's own limit; sets numba's
    count (call it holding `PARALLEL_LOCK`)."""
    import numba
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads
