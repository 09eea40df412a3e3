"""Thresholds on small or degenerate data: tiny PatchCore banks, constant scores, the strict tie rule, the
consistency check at the map tolerance, and checkpoints whose structure disagrees with the command's config."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve

from aoi_lightning.export.consistency import check_consistency
from aoi_lightning.metrics.evaluation import EvaluationCollector, image_decision_metrics
from aoi_lightning.models.components.base import InferenceOutput
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel
from aoi_lightning.rundir.artifacts import decorate
from aoi_lightning.thresholds.search import (
    DegenerateScoresError,
    best_f1_threshold,
    check_score_spread,
    conformal_threshold,
    quantile_threshold,
)

SIZE = 64
PATCHCORE = "aoi_lightning.models.Patchcore"

# -- F1 search on torchmetrics: equal to the previous hand-written search and to sklearn --------------------------


def _previous_best_f1(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """The hand-written search this project used before (rule `s >= t`): (F1, lowest NG score, next lower score)."""
    scores = scores.to(torch.float64).flatten()
    labels = labels.to(torch.int64).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order]
    tp = torch.cumsum(y, 0).to(torch.float64)
    fp = torch.cumsum(1 - y, 0).to(torch.float64)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[:-1] != s[1:]
    tp, fp, cand = tp[last], fp[last], s[last]
    fn = float(y.sum()) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = float(f1.max())
    idx = int((f1 == best).nonzero().min())
    lower = float(cand[idx + 1]) if idx + 1 < cand.numel() else -math.inf
    return best, float(cand[idx]), lower


@pytest.mark.parametrize("seed", range(8))
def test_f1_search_equals_previous_implementation_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 400))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    labels[:2] = [0, 1]
    scores = (rng.normal(size=n) + rng.uniform(0.0, 2.0) * labels).astype(np.float32)
    scores[3:9] = scores[11]  # ties across classes
    scores = scores * np.float32(rng.uniform(1, 500))  # far outside [0, 1], as anomaly scores are
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    res = best_f1_threshold(s, y)
    value, best_score, lower = _previous_best_f1(s, y)
    assert res.value == value  # exactly: F1 from recovered integer counts
    precision, recall, _ = precision_recall_curve(labels, scores.astype(np.float64))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    assert res.value == pytest.approx(float(f1.max()), abs=1e-12)
    # same decisions as the previous search (`s >= lowest NG score`), now under the strict rule `s > threshold`
    assert lower <= res.threshold < best_score
    assert np.array_equal(scores > res.threshold, scores >= best_score)
    assert f1_score(labels, scores > res.threshold) == pytest.approx(res.value, abs=1e-12)
    assert res.threshold == float(np.float32(res.threshold))


def test_f1_search_ties_prefer_the_highest_threshold_exactly() -> None:
    # F1 2/3 at 0.9 (tp 1, fp 0, fn 1) and at 0.5 (tp 2, fp 2): equal only when computed from counts
    res = best_f1_threshold(torch.tensor([0.9, 0.7, 0.6, 0.5, 0.1]), torch.tensor([1, 0, 0, 1, 0]))
    assert res.value == pytest.approx(2 / 3)
    assert 0.7 <= res.threshold < 0.9


# -- the tie rule: a threshold taken from an observed good score accepts that score --------------------------------


def test_good_score_used_as_threshold_is_ok_everywhere() -> None:
    good = np.array([3.25, 4.5, 4.75], dtype=np.float32)
    t, guaranteed = conformal_threshold(good, 0.05)  # n = 3 < 1/alpha - 1: the maximum itself
    assert not guaranteed and t == 4.75
    assert quantile_threshold(good, 1.0) == 4.75
    records = [{"image_path": f"{i}.png", "pred_score": float(v), "map_max": 0.0} for i, v in enumerate(good)]
    assert [r["label"] for r in decorate(records, t)] == ["OK", "OK", "OK"]
    metrics = image_decision_metrics(torch.tensor(good, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), t)
    assert metrics["false_reject_rate"] == 0.0
    # one step above the threshold is NG
    above = float(np.nextafter(np.float32(t), np.float32(np.inf)))
    assert decorate([{"pred_score": above}], t)[0]["label"] == "NG"


def test_pixel_on_the_threshold_is_not_defective() -> None:
    collector = EvaluationCollector(num_bins=256)
    amap = torch.zeros(1, 1, 8, 8)
    amap[0, 0, 2, 2] = 2.5  # exactly the pixel threshold
    amap[0, 0, 5, 5] = 3.0  # above it
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 5, 5] = 1
    batch = {
        "split": ["val"], "defect_type": ["scratch"], "label": torch.tensor([1]), "image_path": ["a.png"],
        "has_mask": torch.tensor([True]), "mask": mask,
    }  # fmt: skip
    collector.update(batch, torch.tensor([3.0]), amap, pixel_threshold=2.5)
    tp, fp, fn = collector.confusion["val/scratch"]
    assert (tp, fp, fn) == (1.0, 0.0, 0.0)
    # the histogram puts 2.5 on the same side of edge 2.5 as the strict rule
    hist = collector.hist
    edge = int(round(2.5 / hist.width))
    bins = hist.bin_index(torch.tensor([2.5, 2.5 + hist.width / 2, 3.0]))
    assert bins.tolist()[0] < edge <= min(bins.tolist()[1:])


# -- small memory banks --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(6, 3, 64, 64) smooth random images in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(6, 3, 8, 8, generator=gen)
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _patchcore(images: torch.Tensor, **kwargs) -> PatchcoreModel:
    model = PatchcoreModel(weights="none", **kwargs).eval()
    model.update(images)
    model.finalize()
    return model


def _max_patch_scores(model: PatchcoreModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        emb = model.embed(images)
        dist, _ = model.nearest(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]), 1)
    return dist[:, 0].reshape(images.shape[0], -1).max(dim=1).values


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_bank_of_one_row_gives_the_unweighted_score(images: torch.Tensor, search: str) -> None:
    """With one bank row the re-weighting of eq. 7 is 1 - exp(d)/exp(d) = 0 for every image; the score must
    fall back to the max patch distance, finite, positive and different between images."""
    model = _patchcore(images[:1], coreset_ratio=1e-3, num_neighbors=9, search=search)
    assert model.memory_bank.shape[0] == 1
    queries = images[1:]
    with torch.no_grad():
        scores = model(queries).pred_score
    assert bool(torch.isfinite(scores).all()) and bool((scores > 0).all())
    torch.testing.assert_close(scores, _max_patch_scores(model, queries))
    assert float(scores.max() - scores.min()) > 1e-3 * float(scores.max())


def test_num_neighbors_larger_than_the_bank_is_clamped(images: torch.Tensor) -> None:
    big = _patchcore(images[:1], coreset_ratio=3 / 64, num_neighbors=50)
    assert big.memory_bank.shape[0] == 3
    same = PatchcoreModel(weights="none", coreset_ratio=3 / 64, num_neighbors=3).eval()
    same.load_state_dict(big.state_dict())
    queries = images[1:]
    with torch.no_grad():
        a, b = big(queries).pred_score, same(queries).pred_score
    torch.testing.assert_close(a, b)
    unweighted = _max_patch_scores(big, queries)
    # eq. 7 with k = 3 neighbours: the weight lies in [1 - 1/k, 1)
    assert bool((a >= (1 - 1 / 3) * unweighted - 1e-5).all()) and bool((a < unweighted).all())


def test_num_neighbors_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_neighbors must be an integer >= 1, got 0"):
        PatchcoreModel(weights="none", num_neighbors=0)


# -- constant scores are refused ---------------------------------------------------------------------------------


def test_constant_scores_are_refused_with_one_line() -> None:
    with pytest.raises(DegenerateScoresError) as info:
        check_score_spread(np.zeros(6), "validation image")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("the model gives all 6 validation images the same score (0)")
    assert "more (and more varied) good images" in text and "coreset_ratio" in text and "backbone" in text
    # the same value once stored in float32 is the same score
    with pytest.raises(DegenerateScoresError):
        check_score_spread(np.array([1.0, 1.0 + 1e-12, 1.0 - 1e-12]), "training image")
    check_score_spread(np.array([1.0, float(np.nextafter(np.float32(1.0), np.float32(2.0)))]), "training image")
    check_score_spread(np.array([5.0]), "training image")  # one image: nothing to compare


def _listing(run: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(run).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def _last_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"aoi {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def few_good_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic tree with 2 good training images (64 px)."""
    from aoi_lightning.data.synthetic import generate_synthetic_mvtec

    root = tmp_path_factory.mktemp("few_good")
    return Path(generate_synthetic_mvtec(root, n_train=2, n_test_good=4, n_test_per_defect=2, image_size=SIZE))


def test_model_with_constant_scores_leaves_no_working_run(
    few_good_root, tmp_path, aoi_cli, tiny_fit_argv, capsys, monkeypatch
) -> None:
    """A model that scores every image alike (here: the bank-of-one-row re-weighting forced back) stops the fit
    with one line; no thresholds.json and no checkpoint are written, so nothing can use the run."""
    monkeypatch.setattr(PatchcoreModel, "_reweight", lambda self, p, s: s.amax(dim=1) * 0.0)
    argv = tiny_fit_argv(PATCHCORE, few_good_root, tmp_path, "constant", "--seed", "0")
    assert aoi_cli(argv) == 2
    line = _last_error_line(capsys, "fit")
    assert "the same score (0)" in line and "cannot tell good from defective parts" in line
    run = tmp_path / "patchcore" / "synthetic" / "constant"
    assert not (run / "thresholds.json").exists()
    assert not (run / "weights" / "model.ckpt").exists()
    assert not (run / "export").exists()


def _decisions(run: Path) -> list[dict]:
    out = []
    for name in ("preds_val.jsonl", "preds_test.jsonl"):
        path = run / name
        if path.is_file():
            out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


@pytest.mark.parametrize("n_train", [1, 2])
def test_patchcore_on_one_or_two_good_images_is_not_everything_ng(
    n_train, tmp_path_factory, tmp_path, aoi_cli, tiny_fit_argv
) -> None:
    """Before: a bank of one row, every score 0.0, image threshold -1e-18 and every image NG, exit 0."""
    from aoi_lightning.data.synthetic import generate_synthetic_mvtec

    root = Path(
        generate_synthetic_mvtec(
            tmp_path_factory.mktemp(f"good{n_train}"), n_train=n_train, n_test_good=4, n_test_per_defect=2,
            image_size=SIZE,
        )
    )  # fmt: skip
    assert aoi_cli(tiny_fit_argv(PATCHCORE, root, tmp_path, "few", "--seed", "0")) == 0
    run = tmp_path / "patchcore" / "synthetic" / "few"
    thresholds = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    assert thresholds["image_threshold"] > 0 and thresholds["pixel_threshold"] > 0
    records = _decisions(run)
    scores = [r["pred_score"] for r in records]
    assert min(scores) > 0 and max(scores) > min(scores)
    assert {r["label"] for r in records} == {"OK", "NG"}  # neither everything NG nor everything OK
    consistency = json.loads((run / "export" / "consistency.json").read_text(encoding="utf-8"))
    assert consistency["status"] == "PASSED"


def test_good_only_calibration_on_two_images_accepts_its_calibration_image(few_good_root, tmp_path, aoi_cli) -> None:
    """The good-only experiment on two good images (one fitted, one held out): before, threshold 5e-324 and every
    image NG. Now the threshold is the held-out image's score, and that image is OK under the strict rule."""
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "patchcore_mvtec_good_only.yaml"
    argv = [
        "fit", "--config", experiment, "--data.root", few_good_root, "--data.category", "synthetic",
        "--data.image_size", str(SIZE), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--runs_root", tmp_path, "--run_id", "good_only", "--seed", "0",
    ]  # fmt: skip
    assert aoi_cli(argv) == 0
    run = tmp_path / "patchcore" / "synthetic" / "good_only"
    thresholds = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    assert thresholds["method"] == "conformal" and thresholds["guaranteed"] is False
    assert thresholds["num_images"] == 1 and thresholds["image_threshold"] > 1e-3
    # the held-out good image, scored again by the saved model, is judged OK
    from aoi_lightning.data.mvtec import AnomalyDataset, apply_policy, scan_mvtec
    from aoi_lightning.rundir.loading import load_run_model

    train, test = scan_mvtec(few_good_root, "synthetic")
    _, held, _ = apply_policy(train, test, "calibration", 0.5, 0.2, 0)
    model, _ = load_run_model(run)
    with torch.no_grad():
        score = float(model.model(AnomalyDataset(held, (SIZE, SIZE))[0]["image"][None]).pred_score[0])
    assert score == thresholds["image_threshold"]
    assert decorate([{"pred_score": score}], thresholds["image_threshold"])[0]["label"] == "OK"
    test = [json.loads(line) for line in (run / "preds_test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["label"] for r in test} == {"OK", "NG"}


# -- the consistency check at the map tolerance ----------------------------------------------------------------------


class _MapModel(torch.nn.Module):
    """Returns a fixed (1, 1, H, W) map for every image (plus 0 x image, so the graph depends on the input)."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base.reshape(1, 1, *base.shape[-2:]).float())

    def forward(self, images: torch.Tensor) -> InferenceOutput:
        amap = images[:, :1] * 0.0 + self.base
        return InferenceOutput(pred_score=amap.amax(dim=(1, 2, 3)), anomaly_map=amap)


def _export(model: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        model, (torch.zeros(1, 3, 16, 16),), str(path), input_names=["image"],
        output_names=["pred_score", "anomaly_map"], dynamic_axes={"image": {0: "batch"}}, opset_version=17,
        dynamo=False,
    )  # fmt: skip
    return path


THRESHOLD, MAP_TOL = 2.0, 1e-3


@pytest.fixture
def reference_map() -> torch.Tensor:
    """A 16 x 16 map of good-looking values well below the threshold whose largest pixel is exactly on it (the
    pixel threshold of a good-only validation split is its largest pixel)."""
    base = torch.linspace(0.2, 1.5, 256).reshape(16, 16)
    base[7, 9] = THRESHOLD
    return base


def _check(torch_map: torch.Tensor, onnx_map: torch.Tensor, tmp_path: Path) -> dict:
    onnx_path = _export(_MapModel(onnx_map), tmp_path / "model.onnx")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return check_consistency(_MapModel(torch_map), onnx_path, images, THRESHOLD, 1e-3, MAP_TOL, 0.99)


def test_consistency_passes_when_only_a_tied_pixel_differs(reference_map, tmp_path) -> None:
    onnx_map = reference_map.clone()
    onnx_map[7, 9] += 5e-5  # ONNX Runtime lands just above, torch on the threshold: within the map tolerance
    result = _check(reference_map, onnx_map, tmp_path)
    assert result["status"] == "PASSED", result["reasons"]
    assert result["mask_iou"] == 1.0
    assert result["mask_pixels_tied"] == 3  # the tied pixel of each of the 3 images, left out of the IoU


def test_consistency_fails_a_map_shifted_by_ten_times_the_tolerance(reference_map, tmp_path) -> None:
    torch_map = reference_map.clone()
    torch_map[0, :8] = THRESHOLD - 5 * MAP_TOL  # decided pixels (outside the tie band) that the shift flips
    result = _check(torch_map, torch_map + 10 * MAP_TOL, tmp_path)
    assert result["status"] == "FAILED"
    assert any(r.startswith("map MAE") for r in result["reasons"])
    assert any(r.startswith("mask IoU") for r in result["reasons"])


def test_consistency_fails_a_local_mask_disagreement_below_the_map_tolerance(reference_map, tmp_path) -> None:
    """Two pixels of a defect region flipping across the threshold by far more than the tolerance: the map MAE
    stays within its tolerance, the IoU over the decided pixels catches it."""
    torch_map = reference_map.clone()
    torch_map[12, :6] = THRESHOLD + 0.05  # a real defect region in torch
    onnx_map = torch_map.clone()
    onnx_map[12, :2] = THRESHOLD - 0.05  # partly missing in ONNX
    result = _check(torch_map, onnx_map, tmp_path)
    assert result["map_mae"] < MAP_TOL
    assert result["status"] == "FAILED"
    assert result["reasons"] == [f"mask IoU {result['mask_iou']:.4f} < 0.99"]
    assert result["mask_iou"] == pytest.approx(4 / 6)


# -- a checkpoint and a config that disagree -------------------------------------------------------------------------


def _argv(command: str, run: Path, *extra: str) -> list:
    return [
        command, "--config", run / "config.yaml", "--ckpt_path", run / "weights" / "model.ckpt",
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["test", "predict"])
@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_other_image_size_is_refused_and_the_run_is_untouched(
    command, model, request, aoi_cli, capsys, tiny_runs_root
) -> None:
    run = request.getfixturevalue(f"{model}_run")
    before = _listing(run)
    runs_before = sorted(p.as_posix() for p in tiny_runs_root.rglob("*"))
    assert aoi_cli(_argv(command, run, "--data.image_size", "96")) == 2
    ckpt = run / "weights" / "model.ckpt"
    assert _last_error_line(capsys, command) == (
        f"aoi {command}: error: {ckpt} was fitted with data.image_size 64 (the command's config has 96): "
        "use the config.yaml of the checkpoint's own run or fit a new model"
    )
    assert _listing(run) == before  # no report.html, eval/, logs/ or predictions/ written or rewritten
    assert sorted(p.as_posix() for p in tiny_runs_root.rglob("*")) == runs_before  # and no new run folder


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--model.init_args.backbone", "resnet18"), "model.init_args.backbone tf_efficientnet_lite0 (the command's "
         "config has resnet18)"),
        (("--model.init_args.layers", "[blocks.2, blocks.5]"), "model.init_args.layers ['blocks.2', 'blocks.4'] "
         "(the command's config has ['blocks.2', 'blocks.5'])"),
        (("--model.init_args.tile_size", "32"), "model.init_args.tile_size null (the command's config has 32)"),
    ],
)  # fmt: skip
def test_other_structure_is_refused_and_the_run_is_untouched(extra, expected, patchcore_run, aoi_cli, capsys) -> None:
    before = _listing(patchcore_run)
    assert aoi_cli(_argv("test", patchcore_run, *extra)) == 2
    ckpt = patchcore_run / "weights" / "model.ckpt"
    assert _last_error_line(capsys, "test") == (
        f"aoi test: error: {ckpt} was fitted with {expected}: use the config.yaml of the checkpoint's own run "
        "or fit a new model"
    )
    assert _listing(patchcore_run) == before


def test_other_model_type_is_refused(padim_run, aoi_cli, capsys) -> None:
    before = _listing(padim_run)
    assert aoi_cli(_argv("predict", padim_run, "--model", PATCHCORE)) == 2
    line = _last_error_line(capsys, "predict")
    assert "holds a Padim model, but the config (--config / --model) builds Patchcore" in line
    assert _listing(padim_run) == before


def test_checkpoint_records_its_input_size_and_agrees_with_its_own_config(patchcore_run: Path, tmp_path) -> None:
    import yaml

    from aoi_lightning.rundir.loading import read_checkpoint, structural_differences

    ckpt_path = patchcore_run / "weights" / "model.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["aoi"]["image_size"] == [SIZE, SIZE]
    config = yaml.safe_load((patchcore_run / "config.yaml").read_text(encoding="utf-8"))
    assert structural_differences(ckpt, ckpt_path, config["model"], config["data"]["image_size"]) == []
    # `layers: null` in the config and the resolved default in the checkpoint are the same structure
    explicit = {**config["model"], "init_args": {**config["model"]["init_args"], "layers": ["blocks.2", "blocks.4"]}}
    assert structural_differences(ckpt, ckpt_path, explicit, SIZE) == []
    # a checkpoint written before the input size was stored: its run's config.yaml says it
    run = Path(shutil.copytree(patchcore_run, tmp_path / "old", ignore=shutil.ignore_patterns("predictions", "eval")))
    del ckpt["aoi"]["image_size"]
    assert structural_differences(ckpt, run / "weights" / "model.ckpt", config["model"], 96) == [
        ("data.image_size", SIZE, 96)
    ]


def test_run_directory_whose_config_disagrees_with_its_checkpoint_is_refused(patchcore_run: Path, tmp_path) -> None:
    """`aoi run` and the other run-directory commands build the input from config.yaml: an edited size is refused."""
    import yaml

    from aoi_lightning.rundir.loading import RunError, load_run_model

    run = Path(shutil.copytree(patchcore_run, tmp_path / "run", ignore=shutil.ignore_patterns("predictions", "eval")))
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["data"]["image_size"] = 96
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(RunError) as info:
        load_run_model(run)
    assert str(info.value) == (
        f"{run / 'weights' / 'model.ckpt'} was fitted with data.image_size 64 ({run / 'config.yaml'} has 96): "
        "use the config.yaml of the checkpoint's own run or fit a new model"
    )
