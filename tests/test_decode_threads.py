"""Batches decoded on threads (`AnomalyDataset(decode_threads=N)`, the data module's default) are the batches
decoded one image after the other: same images, masks, paths and error records, in order, also when the next
batch decoded in advance is not the one asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from aoi_lightning.data.datamodule import MVTecDataModule
from aoi_lightning.data.mvtec import AnomalyDataset, DataError, scan_mvtec

SIZE = (64, 64)
QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture(scope="module")
def samples(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny set's test samples, one of them an unreadable file."""
    root = tmp_path_factory.mktemp("decode") / "mvtec"
    shutil.copytree(tiny_mvtec_root, root)
    _, test = scan_mvtec(root, "synthetic")
    Path(test[5].image_path).write_bytes(b"not an image")
    return test


def _batches(loader) -> list[dict]:
    return list(loader)


def _assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["image_path"] == b["image_path"]
        assert a["error"] == b["error"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["original_size"], b["original_size"])


def test_threaded_batches_equal_serial_ones_over_two_passes(samples):
    expected = _batches(DataLoader(AnomalyDataset(samples, SIZE), batch_size=3))
    assert sum(bool(e) for batch in expected for e in batch["error"]) == 1
    loader = DataLoader(AnomalyDataset(samples, SIZE, decode_threads=2), batch_size=3)
    _assert_same(_batches(loader), expected)
    _assert_same(_batches(loader), expected)  # a new pass starts at 0: the batch decoded in advance is dropped


def test_another_order_than_foreseen_gives_the_asked_items(samples):
    order = list(range(len(samples)))[::-1]
    serial = DataLoader(AnomalyDataset(samples, SIZE), batch_size=4, sampler=order)
    threaded = DataLoader(AnomalyDataset(samples, SIZE, decode_threads=3), batch_size=4, sampler=order)
    _assert_same(_batches(threaded), _batches(serial))


def test_worker_processes_with_threads(samples):
    """A dataset with threads pickles into worker processes (each makes its own threads)."""
    expected = _batches(DataLoader(AnomalyDataset(samples, SIZE), batch_size=4))
    got = _batches(DataLoader(AnomalyDataset(samples, SIZE, decode_threads=2), batch_size=4, num_workers=1))
    _assert_same(got, expected)


def test_data_module_defaults_and_bad_value(tiny_mvtec_root):
    dm = MVTecDataModule(root=str(tiny_mvtec_root), image_size=64)
    dm.setup("fit")
    loader = dm.test_dataloader()
    assert (loader.num_workers, loader.dataset.decode_threads) == (0, 2)
    with pytest.raises(DataError, match="decode_threads must be >= 0, got -1"):
        AnomalyDataset(samples=[], preprocessing=SIZE, decode_threads=-1)


@pytest.mark.parametrize("key", ["num_workers", "decode_threads"])
def test_negative_counts_are_one_line(aoi_cli, capsys, key):
    assert aoi_cli(["fit", "--config", QUICKSTART, f"--data.{key}", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"aoi fit: error: data.{key} must be >= 0, got -1"
