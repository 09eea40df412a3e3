"""Run files of valid syntax but of another shape than `aoi fit` writes (edited or damaged by hand): every
command that reads them answers one line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def copied(patchcore_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(patchcore_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "predictions")))


@pytest.fixture
def images(tiny_mvtec_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next((tiny_mvtec_root / "synthetic" / "test" / "good").glob("*.png")), folder / "a.png")
    return folder


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"aoi {command}: error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "is not a run config"),
        ("data: 5\nmodel: {class_path: aoi_lightning.models.Patchcore}\n", "`data` must be a mapping"),
        ("data: {image_size: null}\nmodel: {class_path: aoi_lightning.models.Patchcore}\n", "data.image_size"),
        ("data: {image_size: [64]}\nmodel: {class_path: aoi_lightning.models.Patchcore}\n", "data.image_size"),
        ("data: {image_size: {a: 1}}\nmodel: {class_path: aoi_lightning.models.Patchcore}\n", "data.image_size"),
    ],
    ids=["list", "data-int", "size-null", "size-one", "size-dict"],
)
def test_config_yaml_of_another_shape(aoi_cli, copied: Path, images: Path, tmp_path: Path, capsys, text, expected):
    (copied / "config.yaml").write_text(text, encoding="utf-8")
    argv = ["run", "--model_dir", copied, "--input_dir", images, "--output_dir", tmp_path / "out", "--backend", "torch"]
    for command, args in (("run", argv[1:]), ("report", ["--run_dir", copied]), ("export", ["--run_dir", copied])):
        assert aoi_cli([command, *args]) == 2
        line = one_line_error(capsys, command)
        assert expected in line and "config.yaml" in line


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_export_meta_that_is_not_an_object(aoi_cli, copied: Path, images: Path, tmp_path: Path, capsys, backend):
    pytest.importorskip(backend)
    (copied / "export" / "export_meta.json").write_text("[1, 2]", encoding="utf-8")
    argv = ["run", "--model_dir", copied, "--input_dir", images, "--output_dir", tmp_path / "o", "--backend", backend]
    assert aoi_cli(argv) == 2
    assert "export_meta.json" in one_line_error(capsys, "run")
    assert aoi_cli(["consistency", "--run_dir", copied]) == 2
    assert "export_meta.json" in one_line_error(capsys, "consistency")


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("thresholds.json", lambda d: []),
        ("metrics.json", lambda d: [1]),
        ("metrics.json", lambda d: {**d, "test": [1, 2]}),
        ("meta.json", lambda d: {**d, "timings": "x"}),
    ],
    ids=["thresholds-list", "metrics-list", "metrics-test-list", "meta-timings-str"],
)
def test_report_and_compare_on_run_files_of_another_shape(
    aoi_cli, copied: Path, patchcore_run: Path, tmp_path: Path, capsys, name, edit
):
    path = copied / name
    path.write_text(json.dumps(edit(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
    code = aoi_cli(["report", "--run_dir", copied])
    if code != 0:  # a file the report can do without (meta.json) may be left out; otherwise one line
        assert code == 2 and str(copied) in one_line_error(capsys, "report")
    argv = ["compare", "--run_dir_a", copied, "--run_dir_b", patchcore_run, "--output_dir", tmp_path / "cmp"]
    code = aoi_cli(argv)
    if code != 0:
        assert code == 2 and one_line_error(capsys, "compare")


def test_export_with_an_opset_this_torch_cannot_write(aoi_cli, copied: Path, capsys):
    assert aoi_cli(["export", "--run_dir", copied, "--opset", "99"]) == 2
    assert "--opset 99 is not supported" in one_line_error(capsys, "export")


def test_api_key_file_with_a_byte_order_mark(tmp_path: Path):
    """Windows editors start a UTF-8 file with a byte-order mark; it is not part of the key."""
    from aoi_lightning.commands.serve import read_api_key

    key = tmp_path / "key"
    key.write_bytes(b"\xef\xbb\xbfs3cret\r\n")
    assert read_api_key(str(key)) == "s3cret"


def test_an_edited_thresholds_json_is_not_presented_as_the_runs(aoi_cli, copied, patchcore_run, tmp_path, capsys):
    """`aoi run` refuses a thresholds.json that differs from the model's; the report refuses it too (its metrics
    were computed at the other value) and the comparison shows the metrics' threshold with a note."""
    path = copied / "thresholds.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    measured = json.loads((copied / "metrics.json").read_text(encoding="utf-8"))["thresholds"]["image_threshold"]
    data["image_threshold"] = 5.0
    path.write_text(json.dumps(data), encoding="utf-8")
    assert aoi_cli(["report", "--run_dir", copied]) == 2
    assert "does not match the threshold the test metrics were computed at" in one_line_error(capsys, "report")
    out = tmp_path / "cmp"
    assert aoi_cli(["compare", "--run_dir_a", copied, "--run_dir_b", patchcore_run, "--output_dir", out]) == 0
    report = json.loads((out / "comparison_report.json").read_text(encoding="utf-8"))
    shown = report["runs"][0]["thresholds"]["image_threshold"]
    assert shown == pytest.approx(measured) and "differs from the metrics'" in (out / "comparison_table.md").read_text()


def test_integer_and_float_tiffs_decode_by_one_value_rule(tmp_path: Path):
    """A 32-bit integer or float TIFF holding 8-bit values decodes to those values (it used to become flat grey,
    or be stretched by its own maximum so that a too-dark part looked normal); [0, 1] floats are scaled by 255;
    values beyond 16 bits are an unreadable file, not a verdict on a made-up picture."""
    from PIL import Image

    from aoi_lightning.data.image_io import ImageReadError, read_image

    grey = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) % 128).astype(np.uint8)  # a dark picture: 0..127
    cases = {
        "int32.tif": grey.astype(np.int32),
        "float_255.tif": grey.astype(np.float32),
        "float_01.tif": grey.astype(np.float32) / 255.0,
    }
    for name, values in cases.items():
        Image.fromarray(values).save(tmp_path / name)
        decoded = read_image(tmp_path / name)
        np.testing.assert_array_equal(decoded[..., 0], grey, err_msg=name)
    Image.fromarray(grey.astype(np.int32) * 100_000).save(tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match="beyond 16 bits"):
        read_image(tmp_path / "wide.tif")


def test_a_damaged_jpeg_that_still_ends_with_its_marker_is_unreadable(tmp_path: Path):
    """A JPEG cut short (or with a block lost) and closed with an end-of-image marker decodes grey-filled: it
    must be an unreadable file, not a part judged with a made-up defect. Intact JPEGs (grey, progressive, CMYK,
    extraneous bytes before a marker, as some cameras write) still decode."""
    import io

    import cv2
    from PIL import Image

    from aoi_lightning.data.image_io import ImageReadError, read_image

    rgb = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    good = cv2.imencode(".jpg", rgb)[1].tobytes()
    damaged = {
        "cut_80.jpg": good[: len(good) * 8 // 10] + b"\xff\xd9",
        "cut_99.jpg": good[: len(good) * 99 // 100] + b"\xff\xd9",
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match="damaged JPEG data"):
            read_image(tmp_path / name)
    intact = {"plain.jpg": good, "extraneous.jpg": good[:-2] + b"\x00\x00\xff\xd9"}
    for mode, options in (("L", {}), ("RGB", {"progressive": True}), ("CMYK", {})):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG", **options)
        intact[f"{mode}.jpg"] = buf.getvalue()
    for name, data in intact.items():
        (tmp_path / name).write_bytes(data)
        assert read_image(tmp_path / name).shape == (96, 128, 3), name
