"""One preprocessing for every path from an image file to the model input, and its round trips through the
checkpoint and export_meta.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

from aoi_lightning.data.preprocess import Preprocessing, PreprocessingError, image_size_hw

SIZE = (64, 64)  # the session fits' input size (conftest TINY_SIZE)
LITE0 = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite0 normalisation of the quick-start backbone


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR uint8 picture with smooth structure and fine noise (so that every interpolation leaves a trace)."""
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(low.astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if path.suffix == ".jpg" else []
    ok, data = cv2.imencode(path.suffix, image, params)
    assert ok
    path.write_bytes(data.tobytes())
    return path


#: name -> (h, w): tall and narrow (h shrinks, w grows: linear), large JPEG (both shrink: area), small (linear)
ODD_IMAGES = {"a_tall.png": (97, 41), "b_wide.jpg": (83, 129), "c_small.png": (23, 29)}


@pytest.fixture(scope="module")
def parts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec tree `<root>/parts` whose train/good and test/good folders hold the odd-sized images."""
    root = tmp_path_factory.mktemp("parts_root")
    for k, (name, (h, w)) in enumerate(ODD_IMAGES.items()):
        picture = _picture(h, w, seed=k)
        for split in ("train", "test"):
            _write(root / "parts" / split / "good" / name, picture)
    return root


@pytest.fixture(scope="module")
def odd_paths(parts_root: Path) -> list[str]:
    return [str(parts_root / "parts" / "test" / "good" / name) for name in ODD_IMAGES]


def reference_input(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The model input as the data set made it before `Preprocessing` existed, written out independently: OpenCV
    decode, RGB, INTER_AREA when neither side grows else INTER_LINEAR, torch float / 255."""
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = size
    shrink = rgb.shape[0] >= h and rgb.shape[1] >= w
    small = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return torch.from_numpy(small).permute(2, 0, 1).float().div_(255.0).numpy()


# -- the Preprocessing object ------------------------------------------------------------------------------------


def test_model_input_matches_the_reference_bit_for_bit(odd_paths: list[str]) -> None:
    for size in (SIZE, (48, 80), (120, 30)):  # square and non-square (h, w)
        pre = Preprocessing(size)
        for path in odd_paths:
            loaded = pre.load(path, keep_original=True)
            assert loaded.error == "" and loaded.model_input.dtype == np.float32
            assert loaded.model_input.shape == (3, *size)
            assert np.array_equal(loaded.model_input, reference_input(path, size)), (path, size)
            assert loaded.original_size == ODD_IMAGES[Path(path).name]
            assert loaded.original.shape == (*ODD_IMAGES[Path(path).name], 3) and loaded.original.dtype == np.uint8
            assert pre.load(path).original is None  # only kept when asked for
    # the three images exercise both interpolations: a wrong choice changes the pixels
    tall = Preprocessing(SIZE).load(odd_paths[0], keep_original=True)
    area = cv2.resize(tall.original, SIZE[::-1], interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / np.float32(255)
    assert not np.array_equal(tall.model_input, area)


def test_stretch_resize_does_not_keep_the_aspect_ratio(odd_paths: list[str]) -> None:
    pre = Preprocessing((40, 40))
    wide = pre.load(odd_paths[1], keep_original=True)  # 83 x 129 -> 40 x 40: whole image, squeezed
    assert wide.model_input.shape == (3, 40, 40)
    expected = cv2.resize(wide.original, (40, 40), interpolation=cv2.INTER_AREA)
    assert np.array_equal(wide.model_input, expected.transpose(2, 0, 1).astype(np.float32) / np.float32(255))


def test_unreadable_file_gives_an_error_string(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image", encoding="utf-8")
    for path in (bad, tmp_path / "missing.png"):
        loaded = Preprocessing(SIZE).load(path, keep_original=True)
        assert loaded.error and str(path) in loaded.error and "\n" not in loaded.error
        assert loaded.model_input is None and loaded.original is None and loaded.original_size == (0, 0)


def test_masks_use_the_same_geometry_with_nearest_neighbour() -> None:
    mask = np.zeros((97, 41), np.uint8)
    mask[10:30, 5:17] = 1
    out = Preprocessing((48, 80)).resize_mask(mask)
    assert out.shape == (48, 80) and set(np.unique(out)) == {0, 1}
    assert np.array_equal(out, cv2.resize(mask, (80, 48), interpolation=cv2.INTER_NEAREST))


def test_to_model_input_refuses_non_rgb_uint8() -> None:
    pre = Preprocessing(SIZE)
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 4), np.uint8)):
        with pytest.raises(ValueError, match="RGB uint8"):
            pre.to_model_input(bad)


def test_dict_round_trip_through_json() -> None:
    pre = Preprocessing((48, 80), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = json.loads(json.dumps(pre.to_dict()))
    assert data == {
        "image_size": [48, 80],
        "resize": "stretch",
        "interpolation": "area_linear",
        "channels": "RGB",
        "scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "normalization": "in_model",
    }
    back = Preprocessing.from_dict(data)
    assert back == pre and back.image_size == (48, 80) and back.mean == (0.485, 0.456, 0.406)
    assert Preprocessing.from_dict({"image_size": [64, 64]}) == Preprocessing.from_image_size(64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image_size": [64, 64], "crop": "center"}, "unknown preprocessing key 'crop'"),
        ({"image_size": [64, 64], "interpolation": "cubic"}, "interpolation 'cubic' is not supported"),
        ({"image_size": [64, 64], "resize": "letterbox"}, "resize 'letterbox' is not supported"),
        ({"image_size": [64, 64], "scale": 1.0}, "scale must be 255"),
        ({"image_size": [64, 64], "mean": [0.5, 0.5]}, "mean must be three finite numbers"),
        ({"image_size": [64, 64], "mean": [0.5] * 3}, "given together"),
        ({"image_size": [64, 64], "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"image_size": [0, 64]}, "positive integers"),
        ({"image_size": [64.5, 64]}, "positive integers"),
        ({"image_size": "64"}, r"integer or \[h, w\]"),
        ({}, "no image_size"),
        ([64, 64], "must be a mapping"),
    ],
)
def test_from_dict_refuses_what_it_cannot_honour(data, message: str) -> None:
    with pytest.raises(PreprocessingError, match=message):
        Preprocessing.from_dict(data)


def test_image_size_is_h_w() -> None:
    assert image_size_hw(64) == (64, 64)
    assert image_size_hw([48, 80]) == (48, 80)
    assert Preprocessing([48, 80]).image_size == (48, 80)  # lists become tuples (hashable, comparable)


def test_module_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'lightning', 'timm', 'kornia', 'torchmetrics'):\n"
        "    sys.modules[name] = None\n"
        "from aoi_lightning.data.preprocess import Preprocessing\n"
        "import aoi_lightning.inference.onnx_backend\n"
        "print(Preprocessing((8, 12)).to_dict()['image_size'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[8, 12]"


# -- every path gives the same model input ------------------------------------------------------------------------


def _recording(predictor, seen: list[np.ndarray]):
    real = predictor.predict

    def predict(images: np.ndarray):
        seen.extend(np.array(image) for image in images)
        return real(images)

    predictor.predict = predict
    return predictor


def test_every_path_gives_bit_identical_model_inputs(
    patchcore_run: Path, parts_root: Path, odd_paths: list[str], tmp_path: Path, monkeypatch
) -> None:
    import aoi_lightning.callbacks.onnx_consistency as consistency_callback
    import aoi_lightning.commands.consistency as consistency_command
    from aoi_lightning.callbacks import OnnxConsistencyCheck
    from aoi_lightning.data.datamodule import MVTecDataModule
    from aoi_lightning.inference.folder import run_folder
    from aoi_lightning.inference.onnx_backend import OnnxPredictor
    from aoi_lightning.inference.torch_backend import TorchPredictor
    from aoi_lightning.postprocess.outputs import OutputOptions
    from aoi_lightning.report.gallery import render_model_overlays
    from aoi_lightning.rundir.loading import load_run_model

    expected = {p: reference_input(p, SIZE) for p in odd_paths}
    paths: dict[str, list[np.ndarray]] = {}

    # the data module's dataset items (training and test loaders)
    dm = MVTecDataModule(root=str(parts_root), category="parts", image_size=SIZE[0], num_workers=0)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        items = [loader.dataset[i] for i in range(len(loader.dataset))]
        assert [Path(it["image_path"]).name for it in items] == list(ODD_IMAGES)
        assert all(it["error"] == "" for it in items)
        paths.setdefault("datamodule", []).extend(it["image"].numpy() for it in items)

    # `aoi run`, torch and ONNX back ends: what the predictors are fed
    for name, predictor in (
        ("aoi run torch", TorchPredictor.from_run(patchcore_run)),
        ("aoi run onnx", OnnxPredictor.from_run(patchcore_run)),
    ):
        seen: list[np.ndarray] = []
        run_folder(_recording(predictor, seen), [Path(p) for p in odd_paths], tmp_path / name, OutputOptions(),
                   batch_size=2, num_workers=2, progress=False)  # fmt: skip
        assert not seen[0].any()  # the warm-up forward on a black input, before the images
        paths[name] = seen[1:]

    # the report's overlays drawn by the model
    module, _ = load_run_model(patchcore_run)
    seen = []
    hook = module.model.register_forward_pre_hook(lambda _m, args: seen.extend(args[0].cpu().numpy()))
    try:
        overlays = render_model_overlays(module.model, odd_paths, module.preprocessing)
    finally:
        hook.remove()
    assert sorted(overlays) == sorted(odd_paths)
    paths["report overlays"] = seen

    # the consistency check: `aoi consistency` (on the parts tree) and the fit callback
    def recorder(key: str, real):
        def wrapped(*args, **kwargs):
            for batch in real(*args, **kwargs):
                paths.setdefault(key, []).extend(np.array(batch))
                yield batch

        return wrapped

    run = Path(shutil.copytree(patchcore_run, tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["data"].update(root=str(parts_root), category="parts")
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setattr(
        consistency_command, "image_batches", recorder("aoi consistency", consistency_command.image_batches)
    )
    result = consistency_command.consistency_run(run, batch_size=2)
    assert result["status"] == "PASSED" and result["num_images"] == 3

    monkeypatch.setattr(
        consistency_callback, "image_batches", recorder("fit callback", consistency_callback.image_batches)
    )
    onnx_copy = tmp_path / "fit" / "export" / "model.onnx"
    onnx_copy.parent.mkdir(parents=True)
    shutil.copy(run / "export" / "model.onnx", onnx_copy)
    monkeypatch.setattr(consistency_callback, "fit_export", lambda trainer, module: onnx_copy)
    trainer = SimpleNamespace(is_global_zero=True, interrupted=False, callbacks=[], datamodule=dm,
                              default_root_dir=str(tmp_path / "fit"))  # fmt: skip
    check = OnnxConsistencyCheck()
    check.on_fit_end(trainer, module)
    assert check.result["status"] == "PASSED" and check.result["num_images"] == 3

    want = [expected[p] for p in odd_paths]
    assert set(paths) == {"datamodule", "aoi run torch", "aoi run onnx", "report overlays", "aoi consistency",
                          "fit callback"}  # fmt: skip
    for name, inputs in paths.items():
        if name == "datamodule":
            inputs = inputs[:3]
            assert all(np.array_equal(a, b) for a, b in zip(paths["datamodule"][3:], want, strict=True))
        assert len(inputs) == 3, name
        for got, ref, path in zip(inputs, want, odd_paths, strict=True):
            assert got.dtype == np.float32 and np.array_equal(got, ref), (name, path)


# -- the model owns its preprocessing: checkpoint and export_meta.json ---------------------------------------------


def test_fit_records_the_preprocessing_in_checkpoint_and_export(patchcore_run: Path) -> None:
    from aoi_lightning.inference.onnx_backend import OnnxPredictor
    from aoi_lightning.rundir.loading import load_run_model, read_checkpoint

    expected = Preprocessing(SIZE, mean=LITE0[0], std=LITE0[1])
    ckpt = read_checkpoint(patchcore_run / "weights" / "model.ckpt")
    assert ckpt["aoi"]["preprocessing"] == expected.to_dict()
    module, _ = load_run_model(patchcore_run)
    assert module.preprocessing == expected
    meta = json.loads((patchcore_run / "export" / "export_meta.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"] == expected.to_dict() and meta["image_size"] == list(SIZE)
    assert OnnxPredictor.from_run(patchcore_run).preprocessing == expected


def test_checkpoint_round_trip_of_the_module(tmp_path: Path) -> None:
    from aoi_lightning.models.padim.lightning_model import Padim

    module = Padim(weights="none")
    module.preprocessing = module.make_preprocessing((48, 80))
    assert module.preprocessing == Preprocessing((48, 80), mean=LITE0[0], std=LITE0[1])
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    other = Padim(weights="none")
    assert other.preprocessing is None
    other.on_load_checkpoint(loaded)
    assert other.preprocessing == module.preprocessing
    loaded["aoi"]["preprocessing"]["interpolation"] = "lanczos"
    with pytest.raises(ValueError, match="checkpoint 'aoi.preprocessing': preprocessing interpolation 'lanczos'"):
        Padim(weights="none").on_load_checkpoint(loaded)


def test_runs_written_before_the_key_fall_back_to_image_size(patchcore_run: Path, tmp_path: Path) -> None:
    from aoi_lightning.inference.onnx_backend import OnnxPredictor
    from aoi_lightning.inference.torch_backend import TorchPredictor

    run = Path(shutil.copytree(patchcore_run, tmp_path / "old"))
    ckpt_path = run / "weights" / "model.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["aoi"]["preprocessing"]
    torch.save(ckpt, ckpt_path)
    meta_path = run / "export" / "export_meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["preprocessing"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    expected = Preprocessing(SIZE, mean=LITE0[0], std=LITE0[1])
    assert TorchPredictor.from_run(run).preprocessing == expected  # config.yaml image_size + backbone
    assert OnnxPredictor.from_run(run).preprocessing == expected  # image_size + normalization of export_meta.json


def test_export_meta_with_an_invalid_preprocessing_is_refused(patchcore_run: Path, tmp_path: Path) -> None:
    from aoi_lightning.inference.onnx_backend import OnnxPredictor, OnnxRunError

    export = Path(shutil.copytree(patchcore_run / "export", tmp_path / "export"))
    meta = json.loads((export / "export_meta.json").read_text(encoding="utf-8"))
    meta["preprocessing"]["resize"] = "letterbox"
    (export / "export_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(OnnxRunError, match="resize 'letterbox' is not supported"):
        OnnxPredictor.from_run(export)
