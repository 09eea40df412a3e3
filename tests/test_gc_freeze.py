"""Start-up objects kept out of the garbage collector (aoi_lightning.allocator.frozen_after_startup): collection
off inside the block, everything alive frozen at its end, the collector on again even after an error, and nothing
frozen in a process that did not ask for it (library use)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from aoi_lightning import allocator

pytestmark = pytest.mark.torchfree


@pytest.fixture
def freeze_enabled(monkeypatch):
    monkeypatch.setattr(allocator, "_freeze_enabled", True)
    yield
    gc.unfreeze()  # give this test process's objects back to the collector


def test_block_turns_collection_off_then_freezes_what_lives(freeze_enabled):
    gc.unfreeze()
    with allocator.frozen_after_startup():
        assert not gc.isenabled()
        made = [[i] for i in range(5000)]  # tracked container objects created inside the block
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)


def test_an_error_inside_still_turns_collection_on(freeze_enabled):
    with pytest.raises(RuntimeError, match="boom"), allocator.frozen_after_startup():
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0


def test_library_use_freezes_nothing():
    """Without `enable_startup_freeze` (tests, notebooks, `cli.main` in-process) the block changes nothing."""
    assert not allocator._freeze_enabled
    before = gc.get_freeze_count()
    with allocator.frozen_after_startup():
        assert gc.isenabled()
    assert gc.get_freeze_count() == before


def test_cli_main_in_process_freezes_nothing(capsys):
    from aoi_lightning.cli import main

    before = gc.get_freeze_count()
    assert main(["run", "--help"]) == 0
    assert gc.get_freeze_count() == before and gc.isenabled()


def test_console_process_freezes_its_imports(tmp_path):
    """The console entry point enables the freeze: after an inspection command's imports the process holds
    frozen objects and collects normally."""
    probe = (
        "import gc, sys\n"
        "from aoi_lightning import cli\n"
        "from aoi_lightning.allocator import enable_startup_freeze\n"
        "enable_startup_freeze()\n"
        "code = cli.main(['run', '--help'])\n"
        "print(code, gc.isenabled(), gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    code, enabled, frozen = out.strip().splitlines()[-1].split()
    assert (code, enabled) == ("0", "True")
    assert int(frozen) > 10_000  # the command module's imports
