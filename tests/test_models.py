"""PaDiM and PatchCore torch models on tiny images with random backbone weights."""

from __future__ import annotations

import pytest
import torch

from aoi_lightning.models.components.base import InferenceOutput, NotFittedError
from aoi_lightning.models.padim.torch_model import PadimModel
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

SIZE = 64


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(6, 3, 64, 64) smooth random images in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(6, 3, 8, 8, generator=gen)
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _fit(model, images: torch.Tensor, batch: int = 3):
    model.eval()
    for start in range(0, images.shape[0], batch):
        model.update(images[start : start + batch])
    model.finalize()
    return model


@pytest.fixture(scope="module")
def padim(images: torch.Tensor) -> PadimModel:
    return _fit(PadimModel(weights="none", n_features=40, seed=0), images)


@pytest.fixture(scope="module")
def patchcore(images: torch.Tensor) -> PatchcoreModel:
    return _fit(PatchcoreModel(weights="none", coreset_ratio=0.5, num_neighbors=3), images)


@pytest.mark.parametrize("model_name", ["padim", "patchcore"])
def test_output_shapes(model_name: str, request: pytest.FixtureRequest, images: torch.Tensor) -> None:
    model = request.getfixturevalue(model_name)
    with torch.no_grad():
        out = model(images[:2])
    assert isinstance(out, InferenceOutput)
    assert out.pred_score.shape == (2,)
    assert out.anomaly_map.shape == (2, 1, SIZE, SIZE)
    assert bool(torch.isfinite(out.anomaly_map).all()) and float(out.anomaly_map.min()) >= 0.0


@pytest.mark.parametrize("cls", [PadimModel, PatchcoreModel])
def test_not_fitted_error(cls, images: torch.Tensor) -> None:
    model = cls(weights="none")
    assert not model.is_fitted and not model.has_thresholds
    with pytest.raises(NotFittedError, match="not fitted"):
        model(images[:1])


@pytest.mark.parametrize(
    ("model_name", "fresh"),
    [
        ("padim", lambda: PadimModel(weights="none", n_features=40, seed=0)),
        ("patchcore", lambda: PatchcoreModel(weights="none", coreset_ratio=0.5, num_neighbors=3)),
    ],
)
def test_state_dict_round_trip_gives_identical_outputs(model_name, fresh, request, images: torch.Tensor) -> None:
    model = request.getfixturevalue(model_name)
    model.set_thresholds(1.5, 2.5)
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        other = fresh()
        other.load_state_dict(state, strict=True)  # dynamic buffers take the checkpoint's shapes
        other.eval()
        assert other.is_fitted and other.has_thresholds
        assert float(other.image_threshold) == 1.5 and float(other.pixel_threshold) == 2.5
        with torch.no_grad():
            a, b = model(images), other(images)
        torch.testing.assert_close(a.pred_score, b.pred_score, rtol=0, atol=0)
        torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)
    finally:
        model.set_thresholds(float("nan"), float("nan"))


def test_padim_channel_subset_is_seeded() -> None:
    a = PadimModel(weights="none", n_features=30, seed=1)
    b = PadimModel(weights="none", n_features=30, seed=1)
    c = PadimModel(weights="none", n_features=30, seed=2)
    assert a.channel_index.shape == (30,)
    assert torch.equal(a.channel_index, b.channel_index)
    assert not torch.equal(a.channel_index, c.channel_index)
    assert bool((a.channel_index[1:] > a.channel_index[:-1]).all())  # sorted, distinct
    total = sum(a.feature_extractor.channels)
    assert int(a.channel_index.max()) < total
    everything = PadimModel(weights="none", n_features=10_000)
    assert torch.equal(everything.channel_index, torch.arange(total))


def test_padim_training_images_score_lower_than_unseen(padim: PadimModel, images: torch.Tensor) -> None:
    unseen = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        train_scores = padim(images).pred_score
        new_scores = padim(unseen).pred_score
    assert float(train_scores.max()) < float(new_scores.min())


def test_patchcore_fit_on_x_scores_x_near_zero(images: torch.Tensor) -> None:
    """With the whole bank kept, every training patch is its own nearest neighbour."""
    model = _fit(PatchcoreModel(weights="none", coreset_ratio=1.0, num_neighbors=1), images)
    unseen = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        own = model(images)
        other = model(unseen)
    scale = float(other.pred_score.min())
    assert scale > 0
    assert float(own.pred_score.max()) < 1e-2 * scale
    assert float(own.anomaly_map.max()) < 1e-2 * scale
    stride = model.feature_extractor.strides[0]
    assert model.memory_bank.shape == (6 * (SIZE // stride) ** 2, model.embedding_dim)


def test_patchcore_coreset_size(patchcore: PatchcoreModel) -> None:
    stride = patchcore.feature_extractor.strides[0]
    total = 6 * (SIZE // stride) ** 2
    assert patchcore.memory_bank.shape[0] == round(0.5 * total)


@pytest.mark.parametrize("num_neighbors", [1, 3, 9])
def test_patchcore_reweighted_score_at_most_max_patch_score(images: torch.Tensor, num_neighbors: int) -> None:
    model = _fit(PatchcoreModel(weights="none", coreset_ratio=0.3, num_neighbors=num_neighbors), images[:4])
    queries = images[4:]
    with torch.no_grad():
        out = model(queries)
        emb = model.embed(queries)
        patches = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        dist, _ = model.nearest(patches, 1)
    max_patch = dist[:, 0].reshape(queries.shape[0], -1).max(dim=1).values
    assert bool((out.pred_score <= max_patch + 1e-6).all())
    assert bool((out.pred_score >= 0).all())
    if num_neighbors == 1:
        torch.testing.assert_close(out.pred_score, max_patch)
    else:
        assert bool((out.pred_score < max_patch).all())


def test_patchcore_torch_and_faiss_search_agree(patchcore: PatchcoreModel, images: torch.Tensor) -> None:
    other = PatchcoreModel(weights="none", coreset_ratio=0.5, num_neighbors=3, search="torch")
    other.load_state_dict(patchcore.state_dict())
    other.eval()
    unseen = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = patchcore(unseen), other(unseen)
    scale = float(a.anomaly_map.max())
    torch.testing.assert_close(a.pred_score, b.pred_score, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize(
    "kwargs", [{"coreset_ratio": 0.0}, {"coreset_ratio": 1.5}, {"bank_dtype": "int8"}, {"search": "annoy"}]
)
def test_patchcore_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PatchcoreModel(weights="none", **kwargs)
