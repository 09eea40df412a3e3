"""Importing the package's numba kernel modules (their kernels compile on first use, then load from numba's disk
cache), the lazy, give-up-once state of each kernel, and the lock and thread count their parallel calls share."""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
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


class LazyKernel:
    """A numba kernel loaded on first use and given up for good, with one warning, when numba is missing or the
    kernel fails to build or to run; its caller then uses its PyTorch code.

    Args:
        load: returns the kernel (e.g. `lambda: import_kernels(MODULE).name`); called once, under a lock.
        what: the kernel's name in the warnings, e.g. "coreset kernel".
        logger: where the warnings go (the caller's module logger).
    """

    def __init__(self, load: Callable[[], Callable], what: str, logger: logging.Logger) -> None:
        self.load, self.what, self.log = load, what, logger
        self.kernel: Callable | None = None
        self.error: str | None = None  # set once the kernel was given up
        self._lock = threading.Lock()

    def get(self) -> Callable | None:
        """The kernel, loaded on the first call; None once it was given up."""
        if self.kernel is None and self.error is None:
            with self._lock:
                if self.kernel is None and self.error is None:
                    try:
                        self.kernel = self.load()
                    except Exception as exc:  # noqa: BLE001 - any numba/llvmlite problem means: use PyTorch
                        self.give_up(exc, "unavailable")
        return self.kernel

    def give_up(self, exc: BaseException, how: str = "failed") -> None:
        """Stop using the kernel after `exc` (at its build: "unavailable"; at a call: "failed")."""
        self.kernel, self.error = None, f"{type(exc).__name__}: {exc}"
        self.log.warning("%s %s, using PyTorch (%s)", self.what, how, self.error)
