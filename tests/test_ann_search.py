"""Approximate nearest-neighbour search of PatchCore (`ivf_flat`, `hnsw`) against exact search (`flat`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from aoi_lightning.models.components.nearest_neighbors import (
    INDEX_PARAMS,
    FaissSearcher,
    default_nlist,
    index_options,
    knn_torch,
)
from aoi_lightning.models.patchcore.torch_model import PatchcoreModel

NN_LOG = "aoi_lightning.models.components.nearest_neighbors"
RECALL_AT_1 = 0.95  # the bound the default parameters must reach on the clustered bank


@pytest.fixture(scope="module")
def clustered() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """50k x 64 bank of 100 Gaussian clusters, 2000 queries from the same clusters, exact 1-NN indices."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(100, 64, generator=gen) * 3.0
    bank = centers[torch.randint(0, 100, (50_000,), generator=gen)] + torch.randn(50_000, 64, generator=gen)
    queries = centers[torch.randint(0, 100, (2000,), generator=gen)] + torch.randn(2000, 64, generator=gen)
    _, exact = FaissSearcher(bank).search(queries, 1)
    return bank, queries, exact[:, 0]


def _true_distances(queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return (queries.unsqueeze(1) - bank[index]).pow(2).sum(-1).sqrt()


def test_flat_equals_knn_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(5000, 64, generator=gen), torch.randn(500, 64, generator=gen)
    searcher = FaissSearcher(bank, "flat", {})
    assert searcher.kind == "flat" and searcher.params == {}
    for k in (1, 9):
        dist, index = searcher.search(queries, k)
        ref_d, ref_i = knn_torch(queries, bank, k=k, chunk=2048)
        assert torch.equal(index, ref_i)
        torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-4)


def test_knn_torch_distances_alone_equal_the_searched_ones() -> None:
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(5000, 64, generator=gen), torch.randn(3000, 64, generator=gen)
    ref_d, ref_i = knn_torch(queries, bank, k=1, chunk=2048)  # 3 bank chunks, 2 query chunks
    dist, none = knn_torch(queries, bank, k=1, chunk=2048, with_indices=False)
    assert none is None and dist.shape == (3000, 1)
    assert torch.equal(dist, ref_d)  # the same minimum, found without its position
    torch.testing.assert_close(dist, _true_distances(queries, bank, ref_i), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k = 1"):
        knn_torch(queries, bank, k=3, with_indices=False)


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_ann_recall_against_exact(clustered, kind: str) -> None:
    bank, queries, exact = clustered
    searcher = FaissSearcher(bank, kind)
    assert searcher.kind == kind  # no fallback on a 50k bank
    dist, index = searcher.search(queries, 1)
    assert dist.shape == (2000, 1) and index.dtype == torch.int64
    recall = float((index[:, 0] == exact).float().mean())
    assert recall >= RECALL_AT_1, f"{kind} recall@1 {recall:.4f} < {RECALL_AT_1}"
    # the distances are those of the returned rows, and never below the exact nearest distance
    torch.testing.assert_close(dist, _true_distances(queries, bank, index), rtol=1e-4, atol=1e-3)
    exact_d = _true_distances(queries, bank, exact.unsqueeze(1))
    assert bool((dist >= exact_d - 1e-3).all())
    # k > 1: ascending, distinct rows
    d9, i9 = searcher.search(queries[:50], 9)
    assert bool((d9[:, 1:] >= d9[:, :-1]).all())
    assert all(len(set(row.tolist())) == 9 for row in i9)


def test_ann_parameters_change_the_index(clustered) -> None:
    bank, queries, exact = clustered
    ivf = FaissSearcher(bank, "ivf_flat", {"nlist": 100, "nprobe": 100 - 1})
    assert ivf.params == {"nlist": 100, "nprobe": 99} and ivf.index.nlist == 100 and ivf.index.nprobe == 99
    assert float((ivf.search(queries, 1)[1][:, 0] == exact).float().mean()) >= 0.999
    hnsw = FaissSearcher(bank[:5000], "hnsw", {"M": 8, "ef_construction": 20, "ef_search": 10})
    assert hnsw.params == {"M": 8, "ef_construction": 20, "ef_search": 10, "build_threads": 1}
    assert hnsw.index.hnsw.efSearch == 10 and hnsw.index.hnsw.efConstruction == 20


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_ann_build_is_deterministic(clustered, kind: str) -> None:
    bank, queries, _ = clustered
    bank = bank[:20_000]
    params = {"ef_construction": 40} if kind == "hnsw" else None
    first = FaissSearcher(bank, kind, params, seed=3).search(queries, 5)
    second = FaissSearcher(bank, kind, params, seed=3).search(queries, 5)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])


def test_default_nlist_from_bank_size() -> None:
    assert default_nlist(50_000) == 224  # ~sqrt(N)
    assert default_nlist(1000) == 25  # capped: at least 39 training rows per list
    assert default_nlist(50) == 1


def test_ivf_nlist_is_lowered_to_the_bank(caplog) -> None:
    caplog.set_level(logging.INFO, logger=NN_LOG)
    bank = torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))
    searcher = FaissSearcher(bank, "ivf_flat", {"nlist": 500, "nprobe": 4})
    assert searcher.kind == "ivf_flat" and searcher.params == {"nlist": 25, "nprobe": 4}
    assert "nlist 500 lowered to 25" in caplog.text


def test_ivf_short_lists_are_completed_exhaustively() -> None:
    """nprobe=1 over lists of ~40 rows cannot give 60 neighbours: those queries are searched over all lists."""
    gen = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(400, 8, generator=gen), torch.randn(30, 8, generator=gen)
    searcher = FaissSearcher(bank, "ivf_flat", {"nlist": 10, "nprobe": 1})
    assert searcher.kind == "ivf_flat"
    dist, index = searcher.search(queries, 60)
    assert bool((index >= 0).all())
    ref_d, ref_i = knn_torch(queries, bank, k=60)
    assert [set(r) for r in index.tolist()] == [set(r) for r in ref_i.tolist()]
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("kind", "params", "rows", "reason"),
    [
        ("hnsw", None, 100, "no larger than ef_search 128"),
        ("hnsw", {"ef_search": 64}, 64, "no larger than ef_search 64"),
        ("ivf_flat", None, 70, "gives 1 list(s)"),
        ("ivf_flat", {"nprobe": 16}, 600, "gives 15 list(s), nprobe 16 would scan them all"),
    ],
)
def test_tiny_banks_fall_back_to_exact(caplog, kind: str, params, rows: int, reason: str) -> None:
    caplog.set_level(logging.INFO, logger=NN_LOG)
    gen = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(rows, 12, generator=gen), torch.randn(25, 12, generator=gen)
    searcher = FaissSearcher(bank, kind, params)
    assert searcher.kind == "flat" and searcher.params == {}
    assert f"{kind} index falls back to exact search" in caplog.text and reason in caplog.text
    dist, index = searcher.search(queries, 3)
    ref_d, ref_i = knn_torch(queries, bank, k=3)
    assert torch.equal(index, ref_i)


@pytest.mark.parametrize(
    ("index", "params", "message"),
    [
        ("annoy", None, "index must be one of 'flat', 'ivf_flat', 'hnsw', got 'annoy'"),
        ("flat", {"nprobe": 4}, "index_params for index 'flat' accepts no parameters; got unknown nprobe"),
        ("hnsw", {"nlist": 4}, "index_params for index 'hnsw' accepts M, ef_construction, ef_search, build_threads"),
        ("ivf_flat", {"nprobe": 0}, "index_params['nprobe'] must be an integer >= 1, got 0"),
        ("ivf_flat", {"nlist": 2.5}, "index_params['nlist'] must be an integer >= 1, got 2.5"),
        ("hnsw", {"M": 1}, "index_params['M'] must be an integer >= 2, got 1"),
        ("hnsw", {"ef_search": True}, "index_params['ef_search'] must be an integer >= 1, got True"),
        ("hnsw", {"build_threads": -1}, "index_params['build_threads'] must be an integer >= 0, got -1"),
        ("hnsw", [("M", 8)], "index_params must be a mapping"),
    ],
)
def test_invalid_index_settings_name_the_argument(index: str, params, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        index_options(index, params)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        PatchcoreModel(weights="none", index=index, index_params=params)


def test_index_options_fill_defaults() -> None:
    assert set(INDEX_PARAMS) == {"flat", "ivf_flat", "hnsw"}
    assert index_options("flat") == {}
    assert index_options("ivf_flat", {"nprobe": 16}) == {"nprobe": 16}  # nlist follows the bank size
    assert index_options("hnsw", {"ef_search": 64}) == {
        "M": 32,
        "ef_construction": 200,
        "ef_search": 64,
        "build_threads": 1,
    }


def test_ann_index_needs_faiss_search() -> None:
    with pytest.raises(ValueError, match="index 'hnsw' needs search='faiss'"):
        PatchcoreModel(weights="none", search="torch", index="hnsw")


def _fitted(index: str = "flat", index_params: dict | None = None, rows: int = 3000) -> PatchcoreModel:
    model = PatchcoreModel(weights="none", index=index, index_params=index_params).eval()
    gen = torch.Generator().manual_seed(6)
    model.memory_bank = torch.randn(rows, model.embedding_dim, generator=gen)
    model.fitted.fill_(True)
    return model


def test_model_index_is_lazy_and_not_in_the_checkpoint() -> None:
    flat = _fitted()
    hnsw = _fitted("hnsw", {"ef_search": 48})
    noise = torch.randn(40, flat.embedding_dim, generator=torch.Generator().manual_seed(7))
    queries = flat.memory_bank[:40] + 0.05 * noise  # the nearest row of query j is row j
    assert hnsw.active_index is None  # built on the first search
    d_h, i_h = hnsw.nearest(queries, 1)
    assert hnsw.active_index == "hnsw"
    assert flat.state_dict().keys() == hnsw.state_dict().keys()  # the index is not a buffer
    assert not any("searcher" in key for key in hnsw.state_dict())
    # a flat-trained state runs with an approximate index: loading resets the index, the next search rebuilds it
    fresh = _fitted("ivf_flat", {"nprobe": 4}, rows=10)
    fresh.nearest(queries, 1)
    fresh.load_state_dict(flat.state_dict())
    assert fresh.active_index is None
    d_i, i_i = fresh.nearest(queries, 1)
    assert fresh.active_index == "ivf_flat"
    d_e, i_e = flat.nearest(queries, 1)
    assert flat.active_index == "flat"
    assert torch.equal(i_e[:, 0], torch.arange(40))
    assert float((i_i == i_e).float().mean()) >= 0.95 and float((i_h == i_e).float().mean()) >= 0.95
    # changing the setting of a model rebuilds its index
    fresh.use_index("flat")
    assert fresh.active_index is None
    assert torch.equal(fresh.nearest(queries, 1)[1], i_e) and fresh.active_index == "flat"
    # the export path is the exact matmul search whatever the index
    with hnsw.export_mode():
        d_x, i_x = hnsw.nearest(queries, 1)
    ref_d, ref_i = knn_torch(queries, hnsw.memory_bank, 1)
    assert torch.equal(i_x, ref_i) and hnsw.search == "faiss"


def test_cli_rejects_an_unknown_index(aoi_cli, tiny_fit_argv, tiny_mvtec_root, tiny_runs_root, capsys) -> None:
    argv = tiny_fit_argv(
        "aoi_lightning.models.Patchcore", tiny_mvtec_root, tiny_runs_root, "bad_index", "--model.init_args.index", "kd"
    )
    assert aoi_cli(argv) != 0
    assert "index must be one of 'flat', 'ivf_flat', 'hnsw', got 'kd'" in capsys.readouterr().err


def test_fit_with_hnsw_index(aoi_cli, tiny_fit_argv, tiny_mvtec_root, tiny_runs_root, caplog) -> None:
    caplog.set_level(logging.INFO, logger=NN_LOG)
    argv = tiny_fit_argv(
        "aoi_lightning.models.Patchcore", tiny_mvtec_root, tiny_runs_root, "patchcore_hnsw",
        "--model.init_args.index", "hnsw", "--model.init_args.index_params", "{ef_search: 40}",
        "--model.init_args.coreset_ratio", "1.0", "--seed", "0",
    )  # fmt: skip
    assert aoi_cli(argv) == 0
    run = tiny_runs_root / "patchcore" / "synthetic" / "patchcore_hnsw"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["index"] == "hnsw"
    assert config["model"]["init_args"]["index_params"] == {"ef_search": 40}
    # a search setting, not saved with the model: test/predict take it from their config or command line
    ckpt = torch.load(run / "weights" / "model.ckpt", map_location="cpu", weights_only=True)
    assert "index" not in ckpt["hyper_parameters"] and "index_params" not in ckpt["hyper_parameters"]
    assert (run / "metrics.json").is_file() and (run / "thresholds.json").is_file()
    # 12 images x 8 x 8 patches, all kept: the graph index is really used
    assert "faiss hnsw index over 768 x" in caplog.text and "ef_search=40" in caplog.text
    # `aoi run` builds the model from the checkpoint and takes the search setting from the run's config.yaml
    from aoi_lightning.rundir.loading import load_run_model

    module, _ = load_run_model(run)
    assert module.model.index == "hnsw" and module.model.index_params == {"ef_search": 40}


def test_flat_run_tested_with_hnsw(aoi_cli, patchcore_run: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=NN_LOG)
    before = set((patchcore_run / "eval").glob("test-*")) if (patchcore_run / "eval").is_dir() else set()
    argv = [
        "test", "--config", patchcore_run / "config.yaml", "--ckpt_path", patchcore_run / "weights" / "model.ckpt",
        "--model.init_args.index", "hnsw", "--model.init_args.index_params", "{ef_search: 4}",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert aoi_cli(argv) == 0
    (new,) = set((patchcore_run / "eval").glob("test-*")) - before
    assert (new / "metrics.json").is_file()
    assert "faiss hnsw index over 8 x" in caplog.text  # 768 patches, coreset 1%: 8 rows, more than ef_search 4


def test_exact_search_context_keeps_the_approximate_index() -> None:
    """What the ONNX consistency check uses: exact results inside the block, the same approximate index after."""
    model = _fitted("ivf_flat", {"nprobe": 1})
    queries = torch.randn(300, model.embedding_dim, generator=torch.Generator().manual_seed(8))
    approx = model.nearest(queries, 1)
    with model.exact_search():
        d, i = model.nearest(queries, 1)
        assert model.active_index == "flat"
    ref_d, ref_i = knn_torch(queries, model.memory_bank, 1)
    assert torch.equal(i, ref_i) and not torch.equal(approx[1], ref_i)  # nprobe 1 of 55 lists misses some
    assert model.index == "ivf_flat" and model.index_params == {"nprobe": 1}
    assert torch.equal(model.nearest(queries, 1)[1], approx[1])
