"""SpaCon (expkit/kernels/spacon.py, expkit/spatial/connectome.py) on a real-derived connectome case:
DLPFC 151673 spots (real counts, coordinates, manual layers) with a functional-connectivity-like matrix from
their real expression within a distance band plus planted communities (tests/data/embeddings/cases.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score as ari

import expkit
from expkit.errors import InputError, KeyNotFoundError, ResourceError
from expkit.kernels import spacon as K
from expkit.spatial.connectome import add_connectivity, spatial_connectome_cluster, spatial_connectome_embed

sys.path.insert(0, str(Path(__file__).parent / "data" / "embeddings"))
from cases import _expression_pcs, connectome_case  # noqa: E402

FAST = dict(connectivity_key="fc", threshold=0.3, k_cutoff=15, hidden=(32, 16, 16), n_pcs=20,
            fanouts=(20, 10, 10), batch_size=256, epochs=1, seed=3)


@pytest.fixture(scope="module")
def case(shared_data):
    expkit.settings.progress = False
    adata, fc, comm = connectome_case(shared_data, n_max=600)
    add_connectivity(adata, matrix=fc, key="fc", threshold=0.3)
    return adata, fc, comm


@pytest.fixture(scope="module")
def embedded(case):
    adata = case[0].copy()
    out = spatial_connectome_embed(adata, **FAST)
    return adata, out


# ------------------------------------------------------------------------------------------
# connectivity and sampling
# ------------------------------------------------------------------------------------------
def test_add_connectivity_thresholds_and_drops_the_diagonal(case):
    adata, fc, _ = case
    m = adata.obsp["fc"]
    assert sp.issparse(m) and m.dtype == np.float32
    off = ~np.eye(fc.shape[0], dtype=bool)
    assert m.nnz == int(((fc > 0.3) & off).sum())
    assert m.diagonal().sum() == 0
    r, c = m.nonzero()
    np.testing.assert_allclose(np.asarray(m[r, c]).ravel(), fc[r, c], rtol=1e-6)
    assert adata.uns["fc"]["symmetric"] is True


def test_add_connectivity_rejects_bad_matrices_before_writing(case):
    adata = case[0][:50].copy()
    with pytest.raises(InputError, match="50 x 50"):
        add_connectivity(adata, matrix=np.zeros((49, 50)), key="bad")
    nan = np.zeros((50, 50))
    nan[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        add_connectivity(adata, matrix=nan, key="bad")
    assert "bad" not in adata.obsp and "bad" not in adata.uns


def test_neighbour_sampling_respects_fanouts(case):
    adata = case[0]
    a = sp.csr_matrix(adata.obsp["fc"])
    ptr, idx = torch.as_tensor(a.indptr, dtype=torch.int64), torch.as_tensor(a.indices, dtype=torch.int64)
    seeds = torch.arange(0, 40)
    gen = torch.Generator().manual_seed(0)
    n_id, src, dst = K.sample_subgraph(ptr, idx, seeds, (5, 3), gen, adata.n_obs)
    assert torch.equal(n_id[:40], seeds) and n_id.unique().numel() == n_id.numel()
    g_src, g_dst = n_id[src].numpy().copy(), n_id[dst].numpy().copy()
    assert np.all(np.asarray(a[g_dst, g_src]).ravel() > 0)  # every sampled edge is a true connection
    per_target = np.bincount(dst.numpy(), minlength=n_id.numel())
    deg = np.diff(a.indptr)[n_id.numpy()]
    hop1 = per_target[:40]
    np.testing.assert_array_equal(hop1, np.minimum(deg[:40], 5))
    assert per_target[40:].max() <= 3
    again = K.sample_subgraph(ptr, idx, seeds, (5, 3), torch.Generator().manual_seed(0), adata.n_obs)
    assert all(torch.equal(u, v) for u, v in zip((n_id, src, dst), again))
    _, s_all, d_all = K.sample_subgraph(ptr, idx, seeds[:3], (-1,), gen, adata.n_obs)
    np.testing.assert_array_equal(np.bincount(d_all.numpy(), minlength=3)[:3], np.diff(a.indptr)[:3])


# ------------------------------------------------------------------------------------------
# what the method must do
# ------------------------------------------------------------------------------------------
def test_embedding_writes_features_and_params(embedded):
    adata, out = embedded
    assert adata.obsm["spacon.spa"].shape == (adata.n_obs, 16)
    assert adata.obsm["spacon.con"].shape == (adata.n_obs, 16)
    assert np.isfinite(adata.obsm["spacon.con"]).all()
    assert adata.uns["spacon"]["params"]["fanouts"] == [20, 10, 10]
    assert len(out["losses"]) == 1 and out["n_connection_edges"] > 0


def test_alpha_one_recovers_the_planted_communities(embedded, case):
    adata = embedded[0]
    comm = case[2]
    res = spatial_connectome_cluster(adata, alpha=1.0, resolution=0.1, seed=0)
    assert res["weight"] == pytest.approx(1.0)
    score = ari(comm, adata.obs["spacon"])
    print(f"ARI planted communities (alpha=1): {score:.3f}")
    assert score > 0.8


def test_alpha_zero_is_the_spatial_clustering(embedded, case):
    adata = embedded[0].copy()
    _, _, comm = case
    layers = adata.obs["layer"].astype(str).to_numpy()
    spatial_connectome_cluster(adata, alpha=0.0, resolution=0.2, seed=0, key_added="a0")
    spatial_connectome_cluster(adata, alpha=1.0, resolution=0.2, seed=0, key_added="a1")
    # alpha=0: exactly the clustering of the spatial features alone
    import anndata as ad

    from expkit.tl import knn, leiden
    ref = ad.AnnData(obs=adata.obs[[]].copy())
    f = adata.obsm["spacon.spa"].astype(np.float64)
    ref.obsm["f"] = (f - f.mean(0)) / f.std(0)
    knn(ref, n_neighbors=40, use_rep="f")
    leiden(ref, resolution=0.2, seed=0)
    assert ari(ref.obs["leiden"], adata.obs["a0"]) == pytest.approx(1.0)
    # ... which follows the tissue (layers), not the planted long-range communities
    l0, l1 = ari(layers, adata.obs["a0"]), ari(layers, adata.obs["a1"])
    c0, c1 = ari(comm, adata.obs["a0"]), ari(comm, adata.obs["a1"])
    print(f"ARI layers alpha=0 {l0:.3f} alpha=1 {l1:.3f}; communities alpha=0 {c0:.3f} alpha=1 {c1:.3f}")
    assert l0 > l1 + 0.05 and l0 > 0.2
    assert c0 < 0.45 < c1


def _small(case, n=250):
    adata = case[0][:n].copy()
    adata.obsm["pcs"] = _expression_pcs(adata.layers["counts"], 10, 0)  # the real expression, reduced
    return adata


def test_same_seed_same_result(case):
    adata = _small(case)
    kw = dict(FAST, hidden=(16, 8, 8), use_rep="pcs", batch_size=64)
    spatial_connectome_embed(adata, **kw)
    first = adata.obsm["spacon.con"].copy()
    spatial_connectome_embed(adata, **kw)
    np.testing.assert_array_equal(first, adata.obsm["spacon.con"])
    spatial_connectome_embed(adata, **dict(kw, seed=kw["seed"] + 1))
    assert not np.array_equal(first, adata.obsm["spacon.con"])


def test_bad_inputs_and_memory_are_refused_before_writing(case):
    adata = _small(case, 100)
    with pytest.raises(ResourceError, match="MiB"):
        spatial_connectome_embed(adata, **dict(FAST, max_memory=1000))
    with pytest.raises(KeyNotFoundError, match="obsm\\['nope'\\]"):
        spatial_connectome_embed(adata, **dict(FAST, use_rep="nope"))
    with pytest.raises(KeyNotFoundError, match="obsp\\['nope'\\]"):
        spatial_connectome_embed(adata, **dict(FAST, connectivity_key="nope"))
    with pytest.raises(InputError, match="fanouts"):
        spatial_connectome_embed(adata, **dict(FAST, fanouts=(0, 3)))
    with pytest.raises(InputError, match="exceeds threshold"):
        spatial_connectome_embed(adata, **dict(FAST, threshold=5.0))
    assert "spacon.spa" not in adata.obsm and "spacon" not in adata.uns
    with pytest.raises(KeyNotFoundError, match="spatial_connectome_embed"):
        spatial_connectome_cluster(adata)
    with pytest.raises(InputError, match="alpha"):
        spatial_connectome_cluster(adata, alpha=2.0)


def test_fuse_weight_is_spacons_curve():
    assert K.fuse_weight(0.0) == 0.0 and K.fuse_weight(1.0) == pytest.approx(1.0)
    assert K.fuse_weight(0.5) == pytest.approx((np.exp(-2) - 1) / (np.exp(-4) - 1))


@pytest.mark.gpu
def test_cpu_and_cuda_agree(case):
    adata = _small(case)
    kw = dict(FAST, hidden=(16, 8, 8), use_rep="pcs", batch_size=64)
    spatial_connectome_embed(adata, **kw)
    cpu = adata.obsm["spacon.con"].copy()
    spatial_connectome_embed(adata, **dict(kw, use_gpu=True))
    np.testing.assert_allclose(adata.obsm["spacon.con"], cpu, rtol=1e-3, atol=1e-3)
