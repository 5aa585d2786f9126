"""expkit.tl.knn / leiden / umap on real data, against scanpy reference values.

Inputs: the fixed PCA of tests/reference/nn_inputs.py (DLPFC 151673, Xenium mouse brain). References:
tests/data/scanpy_ref/nn_{dlpfc151673,xenium_mouse_brain}.npz, made by tests/reference/make_scanpy_nn_refs.py with scanpy's
``pp.neighbors(method="umap")`` on exact kNN, ``tl.leiden(flavor="leidenalg")`` and ``tl.umap``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "reference"))
import nn_inputs as N  # noqa: E402

REF = HERE / "data" / "scanpy_ref"
FIXTURES = {"dlpfc": "nn_dlpfc151673.npz", "xenium": "nn_xenium_mouse_brain.npz"}
K = 15

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _ref(name: str) -> dict:
    path = REF / FIXTURES[name]
    if not path.is_file():
        pytest.skip(f"reference fixture {path} missing (run tests/reference/make_scanpy_nn_refs.py)")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


_CACHE: dict = {}


def _adata(shared_data, name):
    """AnnData with obsm['pca'] and expkit's knn (n_neighbors=15), computed once per session."""
    if name not in _CACHE:
        import anndata as ad

        import expkit.tl as tl

        P, barcodes = N.pca_input(shared_data, name)
        adata = ad.AnnData(obs={"barcode": barcodes})
        adata.obs_names = barcodes
        adata.obsm["pca"] = P
        tl.knn(adata, n_neighbors=K, use_rep="pca")
        _CACHE[name] = adata
    return _CACHE[name]


def _check_knn(adata, ref):
    P = adata.obsm["pca"].astype(np.float64)
    np.testing.assert_allclose(P[:5], ref["pca_head"], rtol=1e-4, atol=1e-5)  # same input as the reference
    rows = ref["knn_rows"].astype(np.int64)
    ours = adata.obsm["knn"][rows].astype(np.int64)
    theirs = ref["knn_idx"].astype(np.int64)
    assert (ours[:, 0] == rows).all() and (theirs[:, 0] == rows).all()  # self first
    d_ours = adata.obsm["knn.d"][rows]
    n_swapped = 0
    for r in np.flatnonzero((np.sort(ours, 1) != np.sort(theirs, 1)).any(1)):
        # a differing neighbour is allowed only as a tie at the k-th distance
        missing = np.setdiff1d(theirs[r], ours[r])
        dm = np.linalg.norm(P[missing] - P[rows[r]], axis=1)
        np.testing.assert_allclose(dm, d_ours[r, -1], rtol=1e-5, atol=1e-6)
        n_swapped += 1
    assert n_swapped <= 0.01 * len(rows)
    return n_swapped


def _check_connectivities(adata, ref):
    """Same graph as scanpy's: same sparsity, every stored entry and row sum equal to rtol 1e-5.

    The smooth-kNN bisection stops at |psum - log2 k| < 1e-5, so sigma is sensitive to the last bit of the
    float32 distances; expkit feeds the graph scikit-learn's rounding (float32 sqrt of float32 squared
    distances), which is what makes this exact comparison possible. Entries touching exact duplicate
    points are left out (tie order). Returns the max relative difference of the others.
    """
    C = adata.obsp["connectivities"]
    assert sp.issparse(C) and C.dtype == np.float32 and C.format == "csr"
    assert abs(C - C.T).max() < 1e-6
    assert abs(C.nnz - int(ref["conn_nnz"])) <= 1e-3 * C.nnz
    np.testing.assert_allclose(C.sum(dtype=np.float64), float(ref["conn_total"]), rtol=1e-4)
    rows = ref["dist_rows"].astype(np.int64)
    sub = C[rows]
    sub.sort_indices()
    R = sp.csr_matrix((ref["conn_data"], ref["conn_indices"].astype(np.int64), ref["conn_indptr"].astype(np.int64)),
                      shape=sub.shape)
    R.sort_indices()
    assert (sub.indptr == R.indptr).all() and (sub.indices == R.indices).all()
    rel = np.abs(sub.data.astype(np.float64) - R.data) / np.abs(R.data)
    # exact duplicates (a non-self neighbour at distance 0) make the kNN order among them arbitrary in
    # scanpy (scikit-learn may list a duplicate before the point itself); skip entries touching them
    dup = adata.obsm["knn.d"][:, 1] == 0
    touch = dup[rows][np.repeat(np.arange(len(rows)), np.diff(sub.indptr))] | dup[sub.indices]
    assert touch.mean() <= 0.01
    assert rel[~touch].max() <= 1e-5, rel[~touch].max()
    clean = ~np.add.reduceat(touch, sub.indptr[:-1]).astype(bool) if len(rows) else np.zeros(0, bool)
    np.testing.assert_allclose(np.asarray(sub.sum(1)).ravel()[clean], ref["conn_rowsum"][clean], rtol=1e-5)
    np.testing.assert_allclose(adata.obsm["knn.d"][rows], ref["knn_dist"], rtol=1e-5, atol=1e-6)
    return float(rel[~touch].max())


def _ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


# --------------------------------------------------------------------------------------------- DLPFC


def test_knn_dlpfc_matches_scanpy(shared_data):
    ref = _ref("dlpfc")
    adata = _adata(shared_data, "dlpfc")
    assert adata.obsm["knn"].dtype == np.int32 and adata.obsm["knn"].shape == (adata.n_obs, K)
    assert adata.obsm["knn.d"].dtype == np.float64
    _check_knn(adata, ref)
    _check_connectivities(adata, ref)
    D = adata.obsp["distances"]
    assert D.dtype == np.float64 and D.format == "csr" and (D.getnnz(1) == K - 1).all()
    u = adata.uns["neighbors"]
    assert u["connectivities_key"] == "connectivities" and u["distances_key"] == "distances"
    assert u["params"]["n_neighbors"] == K and u["params"]["method"] == "umap"


def test_leiden_dlpfc_matches_scanpy(shared_data):
    import expkit.tl as tl

    ref = _ref("dlpfc")
    adata = _adata(shared_data, "dlpfc")
    out = tl.leiden(adata, resolution=1.0, seed=0)
    assert adata.obs["leiden"].dtype == "category"
    assert out["n_clusters"] == adata.obs["leiden"].nunique()
    assert adata.uns["leiden"]["params"]["resolution"] == 1.0
    assert _ari(adata.obs["leiden"].cat.codes, ref["leiden"]) >= 0.9


def test_umap_dlpfc_quality_and_determinism(shared_data):
    import expkit.tl as tl

    ref = _ref("dlpfc")
    adata = _adata(shared_data, "dlpfc")
    tl.umap(adata, min_dist=0.5, seed=0)
    Y = adata.obsm["umap"]
    assert Y.dtype == np.float32 and Y.shape == (adata.n_obs, 2) and np.isfinite(Y).all()
    P = adata.obsm["pca"]
    tw = N.trust(P, Y, None, K)
    assert tw >= float(ref["trust"]) - 0.02, (tw, float(ref["trust"]))
    kp = N.knn_preservation(P, Y, None, K)
    assert kp >= float(ref["knn_pres"]) - 0.05, (kp, float(ref["knn_pres"]))
    a, b = adata.uns["umap"]["params"]["a"], adata.uns["umap"]["params"]["b"]
    assert abs(a - 0.583) < 0.01 and abs(b - 1.334) < 0.01  # the known fit for min_dist=0.5, spread=1
    Y1 = Y.copy()
    tl.umap(adata, min_dist=0.5, seed=0, n_epochs=50, key_added="umap.b")
    tl.umap(adata, min_dist=0.5, seed=0, n_epochs=50, key_added="umap.c")
    np.testing.assert_array_equal(adata.obsm["umap.b"], adata.obsm["umap.c"])
    np.testing.assert_array_equal(adata.obsm["umap"], Y1)


def test_knn_cosine_and_key_added(shared_data):
    import anndata as ad

    import expkit.tl as tl

    P = _adata(shared_data, "dlpfc").obsm["pca"][:600]
    adata = ad.AnnData(obs={"i": np.arange(600)})
    adata.obsm["pca"] = P
    tl.knn(adata, n_neighbors=10, metric="cosine", key_added="cos")
    assert {"cos.connectivities", "cos.distances"} <= set(adata.obsp)
    assert adata.uns["cos"]["connectivities_key"] == "cos.connectivities"
    X = P.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    D = np.clip(1.0 - X @ X.T, 0, 2)
    np.fill_diagonal(D, -1)
    order = np.lexsort((np.broadcast_to(np.arange(600), D.shape), D), axis=1)[:, :10]
    assert (adata.obsm["cos.knn"] == order).mean() > 0.999
    np.fill_diagonal(D, 0)
    np.testing.assert_allclose(adata.obsm["cos.knn.d"], np.take_along_axis(D, order, 1), atol=1e-9)


def test_ties_are_ordered_by_index():
    import anndata as ad

    import expkit.tl as tl

    # a lattice: many equal distances; duplicates of point 0
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(float)
    X = np.vstack([g, g[:3]])
    adata = ad.AnnData(obs={"i": np.arange(len(X))})
    adata.obsm["pca"] = X
    tl.knn(adata, n_neighbors=6)
    idx, d = adata.obsm["knn"], adata.obsm["knn.d"]
    assert (idx[:, 0] == np.arange(len(X))).all()
    for i in range(len(X)):
        key = list(zip(d[i, 1:], idx[i, 1:]))
        assert key == sorted(key)
    full = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.fill_diagonal(full, -1)
    expect = np.lexsort((np.broadcast_to(np.arange(len(X)), full.shape), full), axis=1)[:, :6]
    np.testing.assert_array_equal(idx, expect)
    assert idx[0, 1] == 36  # the exact duplicate of point 0, at distance 0


def test_knn_chunks_within_budget():
    """A tiny memory budget forces many chunks (and the exact fallback) and changes nothing."""
    from expkit.errors import ResourceError
    from expkit.kernels.knn import knn_exact

    rng = np.random.default_rng(0)
    X = np.round(rng.normal(size=(700, 5)), 1)  # rounded: many near-ties
    i1, d1 = knn_exact(X, 12)
    i2, d2 = knn_exact(X, 12, memory_budget=700 * 8 * 7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    with pytest.raises(ResourceError):
        knn_exact(X, 12, memory_budget=100)


# -------------------------------------------------------------------------------------------- Xenium


@pytest.mark.slow
def test_knn_xenium_matches_scanpy(shared_data):
    ref = _ref("xenium")
    adata = _adata(shared_data, "xenium")
    _check_knn(adata, ref)
    _check_connectivities(adata, ref)


@pytest.mark.slow
def test_leiden_umap_xenium_match_scanpy(shared_data):
    import expkit.tl as tl

    ref = _ref("xenium")
    adata = _adata(shared_data, "xenium")
    tl.leiden(adata, seed=0)
    assert _ari(adata.obs["leiden"].cat.codes, ref["leiden"]) >= 0.9
    tl.umap(adata, seed=0)
    rows = ref["trust_rows"].astype(np.int64)
    tw = N.trust(adata.obsm["pca"], adata.obsm["umap"], rows, K)
    assert tw >= float(ref["trust"]) - 0.02, (tw, float(ref["trust"]))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_matches_cpu(shared_data):
    import anndata as ad

    import expkit.tl as tl

    cpu = _adata(shared_data, "dlpfc")
    gpu = ad.AnnData(obs=cpu.obs[[]].copy())
    gpu.obsm["pca"] = cpu.obsm["pca"]
    tl.knn(gpu, n_neighbors=K, use_gpu=True)
    same = (gpu.obsm["knn"] == cpu.obsm["knn"]).all(1)
    assert same.mean() > 0.999
    np.testing.assert_allclose(gpu.obsm["knn.d"][same], cpu.obsm["knn.d"][same], rtol=1e-9)
    diff = abs(gpu.obsp["connectivities"] - cpu.obsp["connectivities"])
    assert diff.max() < 1e-5
    tl.umap(gpu, seed=0, use_gpu=True)
    tl.umap(cpu, seed=0, key_added="umap.cpu")
    tg = N.trust(gpu.obsm["pca"], gpu.obsm["umap"], None, K)
    tc = N.trust(cpu.obsm["pca"], cpu.obsm["umap.cpu"], None, K)
    assert abs(tg - tc) < 0.02


def test_umap_disconnected_graph_and_registry_contract():
    """A graph of several components gets a spectral start per component; the layout stays finite."""
    import anndata as ad

    import expkit.tl as tl

    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(150, 5)), rng.normal(size=(100, 5)) + 50, rng.normal(size=(8, 5)) - 50])
    adata = ad.AnnData(obs={"i": np.arange(len(X))})
    adata.obsm["pca"] = X
    out = tl.knn(adata, n_neighbors=6)
    assert out["n_components"] == 3
    tl.umap(adata, n_epochs=60, seed=1)
    Y = adata.obsm["umap"]
    assert np.isfinite(Y).all()
    lab = np.repeat([0, 1, 2], [150, 100, 8])
    from sklearn.metrics import silhouette_score

    assert silhouette_score(Y, lab) > 0.5
    res = tl.leiden(adata, resolution=0.1, seed=0)
    assert res["n_clusters"] >= 3
