"""Loading runs from disk: tampered, truncated and foreign checkpoints are refused with one clear error."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from aoi_lightning.rundir.loading import RunError, load_checkpoint_model, load_run_model


class _CreatesFile:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path: Path):
    marker = tmp_path / "executed"
    ckpt = tmp_path / "model.ckpt"
    with open(ckpt, "wb") as handle:
        pickle.dump({"state_dict": _CreatesFile(marker), "hyper_parameters": {}}, handle)
    with pytest.raises(RunError, match="refusing to load .*could run code"):
        load_checkpoint_model(ckpt)
    assert not marker.exists()


def test_random_bytes_are_called_corrupt_not_code(tmp_path: Path):
    """Damaged bytes that the weights-only unpickler rejects are a corrupt file, not a security refusal."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(bytes(torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8).tolist()))  # fmt: skip
    with pytest.raises(RunError, match="truncated or corrupt file") as info:
        load_checkpoint_model(ckpt)
    assert "could run code" not in str(info.value)


def test_truncated_checkpoint_is_one_clear_error(patchcore_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(patchcore_run, run)
    data = (run / "weights" / "model.ckpt").read_bytes()
    (run / "weights" / "model.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(RunError, match="truncated or corrupt"):
        load_run_model(run)


def test_checkpoint_that_is_not_an_aoi_model(tmp_path: Path):
    import torch

    ckpt = tmp_path / "model.ckpt"
    torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(RunError, match="not an AOI model checkpoint"):
        load_checkpoint_model(ckpt)


def test_missing_run_and_missing_checkpoint(tmp_path: Path):
    with pytest.raises(RunError, match="run directory not found"):
        load_run_model(tmp_path / "nope")
    (tmp_path / "config.yaml").write_text("model: {class_path: aoi_lightning.models.Padim}\n", encoding="utf-8")
    with pytest.raises(RunError, match="checkpoint not found"):
        load_run_model(tmp_path)
