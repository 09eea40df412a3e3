"""ONNX export and the ONNX-vs-torch consistency check: library functions, callbacks and the `aoi` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from aoi_lightning.callbacks import OnnxConsistencyCheck, OnnxExport
from aoi_lightning.cli import main
from aoi_lightning.data.preprocess import Preprocessing
from aoi_lightning.export.consistency import (
    DEFAULT_SAMPLE_SIZE,
    ConsistencyFailed,
    check_consistency,
    spread_over_defect_types,
)
from aoi_lightning.export.onnx_export import META_FILE, MODEL_FILE, ExportError, export_onnx, onnx_input_size
from aoi_lightning.fileio import sha256_of
from aoi_lightning.models.padim.torch_model import PadimModel
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

SIZE = 64


def _images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, SIZE, SIZE) smooth random images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=gen)
    noise = 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=gen)
    return (torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear") * 0.9 + noise).clamp(0, 1)


def _fit(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = PadimModel(weights="none", n_features=40) if kind == "padim" else PatchcoreModel(weights="none")
    model.eval()
    train = _images(8, seed=1)
    model.update(train[:4])
    model.update(train[4:])
    model.finalize()
    with torch.no_grad():
        out = model(_images(4, seed=2))
    model.set_thresholds(float(out.pred_score.median()), float(torch.quantile(out.anomaly_map.flatten(), 0.9)))
    return model


@pytest.fixture(scope="module")
def fitted():
    """Fitted tiny models by kind, built once per module."""
    cache: dict[str, torch.nn.Module] = {}
    return lambda kind: cache[kind] if kind in cache else cache.setdefault(kind, _fit(kind))


@pytest.fixture(scope="module", params=["padim", "patchcore"])
def exported(request, fitted, tmp_path_factory):
    model = fitted(request.param)
    path = tmp_path_factory.mktemp(f"export_{request.param}") / "export" / MODEL_FILE
    meta = {"model": request.param, "category": "synthetic", "run_id": "t", "thresholds": {"method": "test"}}
    export_onnx(model, (SIZE, SIZE), path, meta)
    return model, path


def test_export_consistency_passes_on_any_batch_size(exported):
    model, path = exported
    images = _images(5, seed=3)
    result = check_consistency(model, path, images, float(model.pixel_threshold), batch_size=3)  # batches 3 and 2
    assert result["status"] == "PASSED", result["reasons"]
    assert result["num_images"] == 5
    assert result["score_mae"] <= 1e-3 and result["map_mae"] <= 1e-3 and result["mask_iou"] >= 0.99
    assert result["mask_pixels_torch"] > 0  # the IoU compared real masks, not two empty ones
    assert result["providers"] == ["CPUExecutionProvider"]
    assert sorted(p.name for p in path.parent.iterdir()) == [META_FILE, MODEL_FILE]  # no temporary files left
    assert 1e5 < path.stat().st_size < 2e9
    if isinstance(model, PatchcoreModel):
        assert model.search == "faiss"  # the export's matmul search did not leak into the model


def test_graph_has_no_run_time_padding(exported):
    """The backbone's TensorFlow 'SAME' padding is fixed at export (`fix_same_padding`): no Pad computed from the
    input's shape is left for ONNX Runtime to run as a pass of its own."""
    _, path = exported
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}

    def constant(name: str) -> bool:  # computed from constants alone, never from the input's shape
        node = producer.get(name)
        return name in initializers or (node is not None and all(constant(i) for i in node.input if i))

    pads = [node for node in graph.node if node.op_type == "Pad"]
    assert pads and all(constant(node.input[1]) for node in pads)  # ONNX Runtime folds them into the Conv
    assert "Ceil" not in {node.op_type for node in graph.node}


def test_empty_masks_give_iou_one(exported):
    model, path = exported
    result = check_consistency(model, path, _images(2, seed=4), pixel_threshold=1e30)
    assert result["mask_iou"] == 1.0 and result["mask_pixels_torch"] == 0 and result["status"] == "PASSED"


def test_metadata_round_trip(exported):
    model, path = exported
    meta = json.loads((path.parent / META_FILE).read_text())
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    # plain strings stay plain, everything else is JSON
    decoded = {k: v if isinstance(meta.get(k), str) else json.loads(v) for k, v in props.items() if k != "format"}
    assert decoded["model"] == meta["model"] and decoded["backbone"] == meta["backbone"]
    for source in (meta, decoded):
        assert source["image_size"] == [SIZE, SIZE]
        assert source["image_threshold"] == pytest.approx(float(model.image_threshold), rel=1e-6)
        assert source["pixel_threshold"] == pytest.approx(float(model.pixel_threshold), rel=1e-6)
        assert source["input"]["name"] == "image" and source["input"]["range"] == [0.0, 1.0]
        assert source["normalization"]["in_graph"] is True
        assert source["normalization"]["mean"] == pytest.approx(model.feature_extractor.mean.flatten().tolist())
        assert source["opset"] == 17 and source["thresholds"] == {"method": "test"}
        # no preprocessing given: the default one at the export size, with the model's normalisation
        lite0 = (0.5, 0.5, 0.5)
        assert Preprocessing.from_dict(source["preprocessing"]) == Preprocessing((SIZE, SIZE), mean=lite0, std=lite0)
    assert meta["sha256"] == sha256_of(path) and meta["size_bytes"] == path.stat().st_size
    assert meta["versions"]["onnxruntime"] and meta["versions"]["torch"]
    assert onnx_input_size(path) == (SIZE, SIZE)
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["pred_score", "anomaly_map"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_export_refuses_a_preprocessing_of_another_size(fitted, tmp_path):
    with pytest.raises(ExportError, match=r"preprocessing size \[48, 80\] differs from the export size \[64, 64\]"):
        export_onnx(fitted("padim"), (SIZE, SIZE), tmp_path / MODEL_FILE, preprocessing=Preprocessing((48, 80)))
    assert not list(tmp_path.iterdir())


def test_large_models_keep_weights_in_external_data(fitted, tmp_path, monkeypatch):
    import aoi_lightning.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were over 2 GB
    model = fitted("patchcore")
    path = export_onnx(model, (SIZE, SIZE), tmp_path / "export" / MODEL_FILE, {"model": "patchcore"})
    meta = json.loads((path.parent / META_FILE).read_text())
    data = path.parent / meta["external_data"]
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    assert meta["external_data_sha256"] == sha256_of(data)
    result = check_consistency(model, path, _images(2, seed=7), float(model.pixel_threshold))
    assert result["status"] == "PASSED", result["reasons"]


def _perturb(path: Path, out: Path) -> Path:
    """Copy of an ONNX file with its largest float weight shifted."""
    proto = onnx.load(str(path))
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    init = max(floats, key=lambda i: np.prod(i.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
    onnx.save(proto, str(out))
    return out


def test_perturbed_onnx_fails(exported, tmp_path):
    model, path = exported
    bad = _perturb(path, tmp_path / "bad.onnx")
    result = check_consistency(model, bad, _images(3, seed=5), float(model.pixel_threshold))
    assert result["status"] == "FAILED"
    assert any("MAE" in r for r in result["reasons"])


def _fake_fit(tmp_path: Path, model: torch.nn.Module, callbacks: list):
    """A finished fit whose datamodule has four test images (PNG files) and the input size only."""
    pictures = (_images(4, seed=6).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    samples = []
    for k, picture in enumerate(pictures):
        path = tmp_path / "test" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), picture[:, :, ::-1])
        samples.append(SimpleNamespace(image_path=str(path)))
    datamodule = SimpleNamespace(image_size=(SIZE, SIZE), category="synthetic", test_samples=samples)
    trainer = SimpleNamespace(
        is_global_zero=True,
        interrupted=False,
        callbacks=callbacks,
        datamodule=datamodule,
        default_root_dir=str(tmp_path / "run"),
    )
    module = SimpleNamespace(model=model, model_name="padim", threshold_info={"method": "test"})
    return trainer, module


def test_consistency_callback_listed_first_uses_the_export_callback(fitted, tmp_path, monkeypatch):
    model = fitted("patchcore")
    check, export = OnnxConsistencyCheck(max_images=3), OnnxExport()
    trainer, module = _fake_fit(tmp_path, model, [check, export])
    calls = []
    import aoi_lightning.callbacks.onnx_export as export_cb

    real = export_cb.export_module
    monkeypatch.setattr(export_cb, "export_module", lambda *a, **k: calls.append(1) or real(*a, **k))
    for cb in trainer.callbacks:
        cb.on_fit_start(trainer, module)
    for cb in trainer.callbacks:
        cb.on_fit_end(trainer, module)
    assert len(calls) == 1  # exported once, by whichever callback came first
    result = json.loads((tmp_path / "run" / "export" / "consistency.json").read_text())
    assert result["status"] == "PASSED" and result["num_images"] == 3
    assert result["num_available"] == 4 and result["sample"] == "evenly spread over defect types"


def test_consistency_callback_max_images_null_checks_every_image(fitted, tmp_path):
    check = OnnxConsistencyCheck(max_images=None)
    trainer, module = _fake_fit(tmp_path, fitted("padim"), [check])
    check.on_fit_end(trainer, module)
    result = json.loads((tmp_path / "run" / "export" / "consistency.json").read_text())
    assert (result["num_images"], result["num_available"], result["sample"]) == (4, 4, "all")
    assert OnnxConsistencyCheck().max_images == DEFAULT_SAMPLE_SIZE == 16


def test_sample_spreads_over_every_defect_type():
    counts = {"good": 40, "broken": 30, "cut": 20, "scratch": 7, "hole": 2, "misplaced": 1}
    paths = [f"/d/test/{kind}/{k:03d}.png" for kind, n in counts.items() for k in range(n)]
    chosen, sample = spread_over_defect_types(paths, 16)
    assert sample == "evenly spread over defect types" and len(chosen) == 16 == len(set(chosen))
    assert chosen == [p for p in paths if p in chosen]  # the order of the test set is kept
    per_type = {kind: sum(f"/{kind}/" in p for p in chosen) for kind in counts}
    # one image of each type per round, in test-set order; misplaced (1) and hole (2) run out early
    assert per_type == {"good": 4, "broken": 3, "cut": 3, "scratch": 3, "hole": 2, "misplaced": 1}
    assert "/d/test/good/000.png" in chosen and "/d/test/good/039.png" in chosen  # spread within a type
    assert spread_over_defect_types(paths, None) == (paths, "all")
    assert spread_over_defect_types(paths[:5], 16) == (paths[:5], "all")
    two, _ = spread_over_defect_types(paths, 2)
    assert [p.split("/")[3] for p in two] == ["good", "broken"]


def test_consistency_callback_failure_modes(fitted, tmp_path):
    model = fitted("patchcore")
    trainer, module = _fake_fit(tmp_path, model, [])
    warn = OnnxConsistencyCheck(max_images=2, score_tol=-1.0, on_failure="warn")  # alone: exports by itself
    warn.on_fit_end(trainer, module)
    assert warn.result["status"] == "FAILED" and (tmp_path / "run" / "export" / MODEL_FILE).is_file()
    trainer.callbacks.append(OnnxExport())  # from here on the export callback's export is used
    with pytest.raises(ConsistencyFailed, match="FAILED"):
        OnnxConsistencyCheck(max_images=2, score_tol=-1.0).on_fit_end(trainer, module)


# -- the commands on a trained quick-start run (conftest's session fit, with the export callbacks) --------------


@pytest.fixture
def trained_run(patchcore_run, tmp_path) -> Path:
    """A private copy of the session's PatchCore run, free to modify."""
    return Path(shutil.copytree(patchcore_run, tmp_path / "run"))


def test_fit_callbacks_wrote_export(patchcore_run, tiny_mvtec_root):
    export = patchcore_run / "export"
    assert (export / MODEL_FILE).is_file()
    check = json.loads((export / "consistency.json").read_text())
    assert check["status"] == "PASSED"
    available = len([p for p in (tiny_mvtec_root / "synthetic" / "test").rglob("*.png")])
    assert check["num_available"] == available
    assert check["num_images"] == min(available, DEFAULT_SAMPLE_SIZE)
    assert check["sample"] == ("all" if available <= DEFAULT_SAMPLE_SIZE else "evenly spread over defect types")
    meta = json.loads((export / META_FILE).read_text())
    thresholds = json.loads((patchcore_run / "thresholds.json").read_text())
    assert meta["image_threshold"] == pytest.approx(thresholds["image_threshold"], rel=1e-6)
    assert meta["thresholds"]["method"] == thresholds["method"]


def test_commands_exit_codes(trained_run, tmp_path, capsys):
    assert main(["export", "--run_dir", str(trained_run)]) == 0
    assert not (trained_run / "export" / "consistency.json").exists()  # the re-export made the old check stale
    assert main(["consistency", "--run_dir", str(trained_run), "--max_images", "5"]) == 0
    result = json.loads((trained_run / "export" / "consistency.json").read_text())
    assert result["status"] == "PASSED" and result["num_images"] == 5
    assert result["sample"] == "evenly spread over defect types" and result["num_available"] > 5
    assert "PASSED" in capsys.readouterr().out

    bad = shutil.copytree(trained_run, tmp_path / "bad")
    _perturb(bad / "export" / MODEL_FILE, bad / "export" / MODEL_FILE)
    assert main(["consistency", "--run_dir", str(bad), "--max_images", "4"]) == 1
    assert json.loads((bad / "export" / "consistency.json").read_text())["status"] == "FAILED"
    assert "FAILED" in capsys.readouterr().out

    resized = shutil.copytree(trained_run, tmp_path / "resized")
    meta_path = resized / "export" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["image_size"] = [SIZE * 2, SIZE * 2]
    meta_path.write_text(json.dumps(meta))
    assert main(["consistency", "--run_dir", str(resized)]) == 2
    assert "export_meta.json" in capsys.readouterr().err

    shutil.rmtree(resized / "export")
    assert main(["consistency", "--run_dir", str(resized)]) == 2
    err = capsys.readouterr().err
    assert "aoi export" in err and len(err.strip().splitlines()) == 1


def test_consistency_counts_an_edited_export_in_its_status_and_log_line(trained_run, tmp_path, capsys, caplog):
    edited = shutil.copytree(trained_run, tmp_path / "edited")
    meta_path = edited / "export" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["image_threshold"] = meta["thresholds"]["image_threshold"] = 40.0
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    (edited / "thresholds.json").unlink()
    caplog.set_level("INFO")
    assert main(["consistency", "--run_dir", str(edited), "--max_images", "2"]) == 1
    result = json.loads((edited / "export" / "consistency.json").read_text())
    assert result["status"] == "FAILED"
    assert any("image_threshold 40.0 differs" in r for r in result["reasons"])
    assert any("sha256 mismatch" in r for r in result["reasons"])
    assert "(2 images, FAILED)" in caplog.text and "PASSED" not in caplog.text  # one verdict everywhere


def test_consistency_refuses_a_thresholds_json_that_aoi_run_refuses(trained_run, tmp_path, capsys):
    bad = shutil.copytree(trained_run, tmp_path / "bad")
    (bad / "thresholds.json").write_text(json.dumps({"image_threshold": -1.0, "pixel_threshold": -1.0}))
    assert main(["consistency", "--run_dir", str(bad), "--max_images", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "thresholds.json" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("stats_dtype", ["float16", "float32"])
def test_float16_statistics_stay_float16_in_the_graph(tmp_path, monkeypatch, stats_dtype):
    """PaDiM's float16 whitening panels are stored as float16 initializers (the file no larger than the
    statistics need), with results identical to the float32-folded graph; float32 statistics stay float32."""
    import onnxruntime as ort

    import aoi_lightning.export.onnx_export as onnx_export

    torch.manual_seed(0)
    model = PadimModel(weights="none", n_features=40, stats_dtype=stats_dtype).eval()
    model.update(_images(6, seed=1))
    model.finalize()
    model.set_thresholds(1.0, 1.0)
    monkeypatch.setattr(onnx_export, "FLOAT16_MIN_BYTES", 1 << 10)  # the tiny model's panels are a few kB
    small = export_onnx(model, (SIZE, SIZE), tmp_path / "small" / MODEL_FILE, {"model": "padim"})
    monkeypatch.setattr(onnx_export, "FLOAT16_MIN_BYTES", 1 << 40)  # nothing converted
    plain = export_onnx(model, (SIZE, SIZE), tmp_path / "plain" / MODEL_FILE, {"model": "padim"})
    halves = [i for i in onnx.load(str(small)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    panel_bytes = model.stats.wt_panels.numel() * 2
    if stats_dtype == "float16":
        # every panel value as float16 (plus any other exact float16 constant, e.g. a tensor of ones)
        assert sum(np.prod(i.dims) for i in halves) * 2 >= panel_bytes
        assert plain.stat().st_size - small.stat().st_size >= panel_bytes * 0.95
    else:
        # the panels stay float32 (only exact constants such as the random backbone's zero biases may shrink)
        assert sum(np.prod(i.dims) for i in halves) * 2 < panel_bytes / 10
    x = _images(3, seed=4).numpy()
    out_small = ort.InferenceSession(str(small)).run(None, {"image": x})
    out_plain = ort.InferenceSession(str(plain)).run(None, {"image": x})
    for a, b in zip(out_small, out_plain):
        np.testing.assert_array_equal(a, b)
