"""No work done twice: the prediction writer decodes each image once, a single process writes preds.jsonl
directly, and the HTML report's gallery comes from the maps of the test pass (no second forward pass)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aoi_lightning.fileio import read_json, read_jsonl
from aoi_lightning.report.build import GalleryMaps, pick_gallery


def _predict_argv(run: Path, *extra) -> list:
    return ["predict", "--config", run / "config.yaml", "--ckpt_path", run / "weights" / "model.ckpt",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]  # fmt: skip


def test_prediction_writer_decodes_each_image_once_and_writes_no_rank_file(
    aoi_cli, patchcore_run: Path, tiny_mvtec_root: Path, tmp_path: Path, monkeypatch
) -> None:
    import aoi_lightning.data.image_io as image_io
    import aoi_lightning.data.preprocess as preprocess
    from aoi_lightning.postprocess.outputs import PredictionOutputs

    run = tmp_path / "run"
    shutil.copytree(patchcore_run, run, ignore=shutil.ignore_patterns("predictions", "logs", "eval"))
    folder = tmp_path / "in"
    folder.mkdir()
    test_dir = tiny_mvtec_root / "synthetic" / "test"
    images = sorted(test_dir.rglob("*.png"))[:5]
    for i, path in enumerate(images):
        shutil.copy(path, folder / f"{i}.png")
    (folder / "broken.png").write_text("not an image")

    decoded: Counter = Counter()
    real = image_io.read_image_with_size

    def counting(path):
        decoded[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(image_io, "read_image_with_size", counting)  # read_image goes through it too
    monkeypatch.setattr(preprocess, "read_image_with_size", counting)  # the dataset's decoding
    opened: list[str] = []
    real_open = PredictionOutputs.open

    def spy_open(self, *args, **kwargs):
        opened.append(self.jsonl_path.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(PredictionOutputs, "open", spy_open)

    assert aoi_cli(_predict_argv(run, "--data.predict_dir", folder)) == 0
    out = run / "predictions"
    records = read_jsonl(out / "preds.jsonl")
    assert len(records) == 6 and sum("error" in r for r in records) == 1
    assert decoded == Counter({f"{i}.png": 1 for i in range(5)} | {"broken.png": 1})  # once each, no re-read
    for rec in records:
        if "error" not in rec:
            assert (out / rec["overlay_path"]).is_file() and (out / rec["mask_path"]).is_file()
    assert opened == ["preds.jsonl"]  # one process: no rank file, no merge
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["preds.jsonl"]
    assert read_json(out / "report.json")["num_images"] == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gallery_maps_hold_every_picture_the_gallery_can_show(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, size = 40, 3
    records = [
        {
            "image_path": f"{i}.png",
            "gt_label": int(rng.integers(0, 2)),
            "split": "test" if i % 3 else "val",
            "pred_score": float(rng.normal()),
        }
        for i in range(n)
    ]
    keeper = GalleryMaps(size)
    for start in range(0, n, 7):  # batches, the way a test pass offers them
        chunk = records[start : start + 7]
        keeper.update(
            [r["image_path"] for r in chunk],
            [r["gt_label"] for r in chunk],
            [r["split"] for r in chunk],
            np.array([r["pred_score"] for r in chunk]),
            np.stack([np.full((1, 4, 4), r["pred_score"], np.float32) for r in chunk]),
        )
    assert len(keeper) <= 2 * size * 2  # two labels, two splits
    kept = keeper.maps()
    test_records = [r for r in records if r["split"] == "test"]
    for threshold in np.quantile([r["pred_score"] for r in records], [0.0, 0.1, 0.5, 0.9, 1.0]):
        fps, fns, closest = pick_gallery(test_records, float(threshold), size)
        shown = fps + fns + [closest[k] for k, items in (("false_positives", fps), ("false_negatives", fns))
                             if not items and k in closest]  # fmt: skip
        for rec in shown:
            score, amap = kept[rec["image_path"]]
            assert score == rec["pred_score"] and amap.shape == (4, 4) and amap[0, 0] == np.float32(score)


def test_gallery_maps_merged_over_ranks_keep_each_image_once() -> None:
    """What DDP does: every rank's keeper (this rank's own as a pickled copy too) merged into this rank's one."""
    import pickle

    rng = np.random.default_rng(3)
    scores = rng.normal(size=24)

    def keeper(indices) -> GalleryMaps:
        k = GalleryMaps(3)
        k.update([f"{i}.png" for i in indices], [i % 2 for i in indices], ["test"] * len(indices),
                 scores[indices], np.stack([np.full((4, 4), scores[i], np.float32) for i in indices]))  # fmt: skip
        return k

    whole, first, second = keeper(np.arange(24)), keeper(np.arange(12)), keeper(np.arange(12, 24))
    first.merge_from([pickle.loads(pickle.dumps(first)), second])  # all_gather returns a copy of its own share
    assert sorted(first.maps()) == sorted(whole.maps()) and len(first) == len(whole) == 6


def test_html_report_gallery_needs_no_second_forward_pass(
    aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path: Path, monkeypatch
) -> None:
    import aoi_lightning.callbacks.report_writer as report_writer
    import aoi_lightning.report.gallery as gallery

    def no_model_rendering(*args, **kwargs):
        raise AssertionError("the gallery ran the model again")

    monkeypatch.setattr(gallery, "render_model_overlays", no_model_rendering)
    forward_calls: list[int] = []
    requests: list[tuple[list[str], dict]] = []
    real_on_test_end = report_writer.HtmlReport.on_test_end
    real_build = report_writer.build_report_data

    def spy_on_test_end(self, trainer, pl_module):
        handle = pl_module.model.register_forward_hook(lambda *a: forward_calls.append(1))
        try:
            real_on_test_end(self, trainer, pl_module)
        finally:
            handle.remove()

    def spy_build(*args, **kwargs):
        args = list(args)
        source = args[5]

        def overlays(paths):
            result = source(paths)
            requests.append((list(paths), result))
            return result

        args[5] = overlays
        return real_build(*args, **kwargs)

    monkeypatch.setattr(report_writer.HtmlReport, "on_test_end", spy_on_test_end)
    monkeypatch.setattr(report_writer, "build_report_data", spy_build)
    runs = tmp_path / "runs"
    assert aoi_cli(tiny_fit_argv("aoi_lightning.models.Padim", tiny_mvtec_root, runs, "gallery")) == 0
    run = runs / "padim" / "synthetic" / "gallery"
    assert (run / "report.html").is_file()
    assert forward_calls == []
    assert len(requests) == 1
    paths, pictures = requests[0]
    assert paths and set(pictures) == set(paths)  # every gallery picture has the model's overlay
    assert all(p.ndim == 3 and p.shape[2] == 3 for p in pictures.values())


@pytest.mark.parametrize("model", ["Padim", "Patchcore"])
def test_fit_decodes_each_training_image_once_and_scores_it_from_the_fit_pass(
    aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path: Path, monkeypatch, model: str
) -> None:
    """preds_train.jsonl comes from the embeddings of the fit pass: every training image is decoded once in the
    whole `aoi fit`, and the scores equal those of a separate pass over the training images with the saved
    model, to float32 rounding."""
    import aoi_lightning.data.preprocess as preprocess

    decoded: Counter = Counter()
    real = preprocess.read_image_with_size

    def counting(path):
        decoded[str(path)] += 1
        return real(path)

    monkeypatch.setattr(preprocess, "read_image_with_size", counting)
    argv = tiny_fit_argv(f"aoi_lightning.models.{model}", tiny_mvtec_root, tmp_path, "once", "--seed", "0")
    assert aoi_cli(argv) == 0
    run = tmp_path / model.lower() / "synthetic" / "once"
    train = sorted(str(p) for p in (tiny_mvtec_root / "synthetic" / "train").rglob("*.png"))
    assert train and all(decoded[p] == 1 for p in train), {p: decoded[p] for p in train}
    assert read_json(run / "meta.json")["timings"]["score_train_from_fit_s"] >= 0

    from aoi_lightning.data.datamodule import MVTecDataModule
    from aoi_lightning.rundir.loading import load_checkpoint_model
    from aoi_lightning.rundir.scoring import score_loader

    monkeypatch.setattr(preprocess, "read_image_with_size", real)
    module = load_checkpoint_model(run / "weights" / "model.ckpt")
    data = MVTecDataModule(root=str(tiny_mvtec_root), category="synthetic", image_size=64, num_workers=0)
    data.setup("fit")
    second, _ = score_loader(module.model, data.train_eval_dataloader())
    kept = read_jsonl(run / "preds_train.jsonl")
    assert [r["image_path"] for r in kept] == [r["image_path"] for r in second]
    assert [r["defect_type"] for r in kept] == [r["defect_type"] for r in second]
    np.testing.assert_allclose([r["pred_score"] for r in kept], [r["pred_score"] for r in second], rtol=1e-5, atol=1e-5)


def test_fit_over_the_embedding_budget_scores_the_training_images_in_a_second_pass(
    aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    """`fit_embeddings_mb: 0` (or a set too large for the budget) keeps nothing: the same preds_train.jsonl comes
    from a second pass."""
    runs = {}
    for name, budget in (("kept", "1024"), ("none", "0")):
        argv = tiny_fit_argv("aoi_lightning.models.Padim", tiny_mvtec_root, tmp_path, name, "--seed", "0",
                             "--model.fit_embeddings_mb", budget)  # fmt: skip
        assert aoi_cli(argv) == 0
        runs[name] = tmp_path / "padim" / "synthetic" / name
    timings = read_json(runs["none"] / "meta.json")["timings"]
    assert "score_train_from_fit_s" not in timings
    a, b = (read_jsonl(runs[n] / "preds_train.jsonl") for n in ("kept", "none"))
    assert [r["image_path"] for r in a] == [r["image_path"] for r in b] and len(a) == 12
    np.testing.assert_allclose([r["pred_score"] for r in a], [r["pred_score"] for r in b], rtol=1e-5, atol=1e-5)
    assert [r["label"] for r in a] == [r["label"] for r in b]


def test_test_pass_after_fit_reuses_the_validation_outputs(
    aoi_cli, tiny_fit_argv, tiny_mvtec_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """With `val_split: test_half` the validation images are part of the test set: the test pass that follows the
    fit takes their outputs from the validation pass (the model runs on the other images only), and the results
    equal a standalone `aoi test`, which computes every image."""
    from aoi_lightning.models.components.base import AnomalyTorchModel
    from aoi_lightning.models.lightning_base import AnomalyModule

    seen = {"on": False, "images": 0}
    real_forward = AnomalyTorchModel.forward

    def counting_forward(self, images):
        if seen["on"]:
            seen["images"] += int(images.shape[0])
        return real_forward(self, images)

    real_start, real_end = AnomalyModule.on_test_epoch_start, AnomalyModule.on_test_epoch_end

    def start(self):
        seen["on"] = True
        return real_start(self)

    def end(self):
        seen["on"] = False
        return real_end(self)

    monkeypatch.setattr(AnomalyTorchModel, "forward", counting_forward)
    monkeypatch.setattr(AnomalyModule, "on_test_epoch_start", start)
    monkeypatch.setattr(AnomalyModule, "on_test_epoch_end", end)
    argv = tiny_fit_argv("aoi_lightning.models.Padim", tiny_mvtec_root, tmp_path, "reuse", "--seed", "0",
                         "--data.val_split", "test_half")  # fmt: skip
    assert aoi_cli(argv) == 0
    run = tmp_path / "padim" / "synthetic" / "reuse"
    val, test = read_jsonl(run / "preds_val.jsonl"), read_jsonl(run / "preds_test.jsonl")
    assert val and test
    assert seen["images"] == len(test)  # the validation images were not run again

    seen["images"] = 0
    argv = ["test", "--config", run / "config.yaml", "--ckpt_path", run / "weights" / "model.ckpt",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert aoi_cli(argv) == 0
    assert seen["images"] == len(test) + len(val)  # standalone: every image
    (evaluation,) = sorted((run / "eval").glob("test-*"))
    fresh = {r["image_path"]: r["pred_score"] for r in read_jsonl(evaluation / "preds_test.jsonl")}
    fit = {r["image_path"]: r["pred_score"] for r in val + test}
    assert fresh.keys() == fit.keys()
    np.testing.assert_allclose([fit[k] for k in fresh], [fresh[k] for k in fresh], rtol=1e-5, atol=1e-5)
    a, b = read_json(run / "metrics.json"), read_json(evaluation / "metrics.json")
    for split in ("test", "full_test"):
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert a[split][key] == pytest.approx(b[split][key], abs=1e-6), (split, key)
