"""Progress of long phases: one timed log line per phase and tqdm bars on stderr (standard library + tqdm, no torch).

A phase logs, when it ends without an error, one INFO line `<name>: <seconds> s (<detail>)` on the logger
`aoi_lightning.progress`, e.g. `finalize: 7.1 s (Padim statistics of 213 images)`. The seconds it measures are
the ones recorded in `meta.json` timings, so the log and the run files agree.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """A running phase: set `detail` inside the block; `seconds` (wall clock) is set when it ends."""

    name: str
    detail: str = ""
    seconds: float = 0.0


def phase_line(name: str, seconds: float, detail: str = "") -> str:
    """`name: 1.2 s (detail)`, the text of a phase's log line."""
    return f"{name}: {seconds:.1f} s" + (f" ({detail})" if detail else "")


@contextlib.contextmanager
def phase(name: str, detail: str = "") -> Iterator[Phase]:
    """Time the block and log one INFO line when it ends without an error (an error is reported by its raiser).

    Args:
        name: the phase as the user knows it (`finalize`, `coreset`, `ONNX export`, `consistency check`, `report`).
        detail: what it worked on; may also be set (or changed) inside the block through the yielded `Phase`.

    Yields:
        The `Phase`; its `seconds` holds the duration after the block.
    """
    current = Phase(name, detail)
    start = time.perf_counter()
    yield current
    current.seconds = time.perf_counter() - start
    log.info(phase_line(current.name, current.seconds, current.detail))


def progress_bar(total: int | None, desc: str, unit: str = "image"):
    """A tqdm bar on stderr for a per-image loop (`bar.update(n)`, `bar.close()`; also a context manager).

    It is drawn only on a terminal (tqdm's `disable=None`), so logs written to files and pipes stay clean.
    """
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
