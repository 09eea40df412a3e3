"""The process allocator settings of `aoi` (aoi_lightning.allocator): large freed blocks are reused, not handed
back to the system and faulted in again page by page."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.torchfree,
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc mallopt parameters"),
]

#: Allocates, touches and frees 64 MiB twice with the C library's malloc; prints whether the settings applied
#: and the minor page faults of the second round.
PROBE = """
import ctypes, ctypes.util, resource, sys
from aoi_lightning.allocator import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(opt_out: str) -> tuple[str, int]:
    env = {**os.environ, "AOI_SYSTEM_ALLOCATOR": opt_out}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_block_is_reused_without_page_faults():
    applied, faults = _probe("0")
    assert applied == "True"
    assert faults < 1000  # 64 MiB is 16384 pages of 4 KiB: reused, it costs none


def test_opt_out_keeps_glibc_defaults():
    applied, faults = _probe("1")
    assert applied == "False"
    assert faults > 8000  # glibc unmapped the block on free and maps a zeroed one again


def test_the_aoi_command_applies_it():
    code = "import sys; from aoi_lightning import cli, allocator; cli.main(['--help']); print(allocator._applied)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
