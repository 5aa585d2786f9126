"""spatial_autocorr (Moran's I, Geary's C) against squidpy's results on the shared real data."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from _spatial_data import normalize_log1p, read_dlpfc, read_xenium
from expkit.errors import InputError, KeyNotFoundError
from expkit.kernels import autocorr as K
from expkit.spatial.autocorr import spatial_autocorr
from expkit.spatial.graph import spatial_neighbors

REF = Path(__file__).resolve().parent / "data" / "squidpy_ref"
CPU = torch.device("cpu")
ATOL = 1e-6


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    """DLPFC 151673 with the protocol of the squidpy reference: median normalize_total + log1p, hex grid
    built from the pixel coordinates (pxl_col, pxl_row) with n_neighs=6, n_rings=1."""
    a = read_dlpfc(shared_data, "151673")
    a.X = normalize_log1p(a.layers["counts"])
    spatial_neighbors(a, coord_type="grid", n_neighs=6, n_rings=1, grid_source="coords")
    return a


@pytest.fixture(scope="module")
def xenium(shared_data):
    a = read_xenium(shared_data)
    a.X = normalize_log1p(a.X)
    spatial_neighbors(a, coord_type="generic", n_neighs=6)
    return a


def _by_symbol(df: pd.DataFrame, genes) -> pd.DataFrame:
    return df.set_index("gene").loc[list(genes)]


def test_moran_matches_squidpy_reference(dlpfc, shared_reference):
    ref = pd.read_csv(shared_reference / "squidpy_moran_151673.tsv.gz", sep="\t").set_index("gene")
    a = dlpfc.copy()
    df = spatial_autocorr(a, mode="moran")
    assert len(df) == a.n_vars == len(ref) == 5000
    got = _by_symbol(df, ref.index)
    for col in ("I", "pval_norm", "var_norm", "pval_norm_fdr_bh"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=0, atol=ATOL, err_msg=col)
    np.testing.assert_allclose(got["I"].to_numpy(), ref["I"].to_numpy(), rtol=1e-5, atol=1e-8)
    assert list(df.columns[:5]) == ["gene", "I", "pval_norm", "var_norm", "pval_rand"]
    assert df["I"].is_monotonic_decreasing  # sorted like squidpy
    # var columns, aligned by var_names
    v = a.var.loc[df.index]
    np.testing.assert_array_equal(v["moranI.I"].to_numpy(), df["I"].to_numpy())
    np.testing.assert_array_equal(v["moranI.pval"].to_numpy(), df["pval_norm"].to_numpy())
    np.testing.assert_array_equal(v["moranI.padj"].to_numpy(), df["pval_norm_fdr_bh"].to_numpy())
    assert a.uns["moranI.params"]["params"]["mode"] == "moran"


def test_moran_from_array_grid_equals_pixel_grid(dlpfc):
    a = dlpfc.copy()
    spatial_neighbors(a, grid_source="array", key_added="arr")
    d1 = spatial_autocorr(a, genes=list(a.var["gene"][:200]), key_added="m1")
    d2 = spatial_autocorr(a, genes=list(a.var["gene"][:200]), connectivity_key="arr.connectivities",
                          key_added="m2")
    pd.testing.assert_frame_equal(d1, d2)


def test_geary_matches_squidpy_fixture(dlpfc):
    f = REF / "geary_151673_n300.tsv.gz"
    if not f.exists():
        pytest.skip("squidpy Geary fixture missing (tests/reference/make_squidpy_refs.py)")
    ref = pd.read_csv(f, sep="\t").set_index("gene")
    a = dlpfc.copy()
    df = spatial_autocorr(a, mode="geary", genes=list(ref.index))
    assert df["C"].is_monotonic_increasing and "gearyC.C" in a.var
    got = _by_symbol(df, ref.index)
    for col in ("C", "pval_norm", "var_norm", "pval_norm_fdr_bh"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=0, atol=ATOL, err_msg=col)


def test_xenium_knn_moran_geary_match_squidpy(xenium):
    f = REF / "xenium_knn6_autocorr.tsv.gz"
    if not f.exists():
        pytest.skip("squidpy Xenium fixture missing (tests/reference/make_squidpy_refs.py)")
    ref = pd.read_csv(f, sep="\t").set_index("gene")
    a = xenium.copy()
    m = _by_symbol(spatial_autocorr(a, mode="moran"), ref.index)
    g = _by_symbol(spatial_autocorr(a, mode="geary"), ref.index)
    for ours, theirs in ((m["I"], "moran_I"), (m["pval_norm"], "moran_pval_norm"),
                         (m["var_norm"], "moran_var_norm"), (g["C"], "geary_C"),
                         (g["pval_norm"], "geary_pval_norm"), (g["var_norm"], "geary_var_norm")):
        np.testing.assert_allclose(ours.to_numpy(), ref[theirs].to_numpy(), rtol=0, atol=ATOL, err_msg=theirs)


def test_sparse_and_dense_paths_agree(dlpfc):
    w = K.row_normalize(dlpfc.obsp["spatial.connectivities"])
    x = dlpfc.X[:, :400]
    for mode in ("moran", "geary"):
        s = K.autocorr_scores(x, w, CPU, mode=mode, method="sparse")
        d = K.autocorr_scores(x, w, CPU, mode=mode, method="dense", chunk_bytes=1 << 22)
        dd = K.autocorr_scores(x.toarray(), w, CPU, mode=mode)
        for key in ("score", "z2", "z4"):
            np.testing.assert_allclose(s[key], d[key], rtol=1e-9, err_msg=f"{mode} {key}")
            np.testing.assert_allclose(dd[key], d[key], rtol=1e-12)


def test_geary_definition_bruteforce_small(dlpfc):
    """C and I from their defining double sums on a 300-spot piece (dense n x n only in the test)."""
    sub = np.arange(300)
    a = dlpfc[sub].copy()
    spatial_neighbors(a, grid_source="array")
    genes = np.nonzero(np.asarray((a.X != 0).sum(0)).ravel() > 30)[0][:50]
    x = a.X[:, genes].toarray().astype(np.float64)
    w = a.obsp["spatial.connectivities"].toarray().astype(np.float64)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    n, s0 = x.shape[0], w.sum()
    z = x - x.mean(0)
    moran = n / s0 * np.einsum("ij,ig,jg->g", w, z, z) / (z * z).sum(0)
    diff2 = (x[:, None, :] - x[None, :, :]) ** 2
    geary = (n - 1) * np.einsum("ij,ijg->g", w, diff2) / (2 * s0 * (z * z).sum(0))
    dm = spatial_autocorr(a, genes=list(a.var_names[genes]), mode="moran").loc[a.var_names[genes]]
    dg = spatial_autocorr(a, genes=list(a.var_names[genes]), mode="geary").loc[a.var_names[genes]]
    np.testing.assert_allclose(dm["I"].to_numpy(), moran, rtol=1e-10)
    np.testing.assert_allclose(dg["C"].to_numpy(), geary, rtol=1e-10)


def test_permutation_pvalues_consistent_with_analytic(dlpfc):
    a = dlpfc.copy()
    rng = np.random.default_rng(0)
    genes = list(a.var_names[np.sort(rng.choice(a.n_vars, 150, replace=False))])
    n_perms = 200
    df = spatial_autocorr(a, genes=genes, n_perms=n_perms, seed=3).loc[genes]
    # the permutation distribution has the analytic null moments: E = -1/(n-1), Var close to var_rand
    w = K.row_normalize(a.obsp["spatial.connectivities"])
    sims = K.autocorr_permutation_scores(a[:, genes].X, w, CPU, n_perms=n_perms, seed=3)
    assert abs(sims.mean() - (-1 / (a.n_obs - 1))) < 5e-4
    ratio = df["var_sim"] / df["var_rand"]
    assert 0.75 < ratio.median() < 1.25 and ratio.between(0.5, 1.6).mean() > 0.95
    np.testing.assert_allclose(df["var_sim"].to_numpy(), sims.var(0), rtol=1e-12)
    # strongly patterned genes: every permutation is smaller, the analytic p is tiny
    strong = df["pval_norm"] < 1e-6
    assert strong.sum() > 10
    assert np.all(df.loc[strong, "pval_sim"] == 1 / (n_perms + 1))
    # elsewhere, for genes expressed widely enough for the normal approximation (genes seen in a handful
    # of spots have a discrete, skewed null), permutation and analytic p-values agree
    frac = np.asarray((a[:, genes].X > 0).mean(0)).ravel()
    weak = (df["pval_norm"] > 1e-3).to_numpy() & (frac > 0.1)
    assert weak.sum() > 20
    r = np.corrcoef(df.loc[weak, "pval_rand"], df.loc[weak, "pval_z_sim"])[0, 1]
    assert r > 0.95
    assert np.all(np.abs(df.loc[weak, "pval_sim"] - df.loc[weak, "pval_rand"]) < 0.12)
    assert np.all(np.abs(df.loc[weak, "pval_sim"] - df.loc[weak, "pval_norm"]) < 0.15)
    # reproducible, independent of chunking
    again = spatial_autocorr(a, genes=genes, n_perms=n_perms, seed=3, chunk_bytes=1 << 21).loc[genes]
    np.testing.assert_allclose(again["pval_sim"], df["pval_sim"], rtol=0, atol=0)
    np.testing.assert_allclose(again["var_sim"], df["var_sim"], rtol=1e-10)


def test_genes_by_symbol_or_id_and_layers(dlpfc):
    a = dlpfc.copy()
    syms = ["MBP", "PLP1", "SNAP25"]
    ids = list(a.var_names[a.var["gene"].isin(syms)])
    d1 = spatial_autocorr(a, genes=syms, key_added="s")
    d2 = spatial_autocorr(a, genes=ids, key_added="i")
    pd.testing.assert_frame_equal(d1.sort_index(), d2.sort_index())
    assert a.var["s.I"].notna().sum() == 3
    a.layers["lognorm"] = a.X.copy()
    a.X = a.layers["counts"]
    d3 = spatial_autocorr(a, genes=syms, layer="lognorm", key_added="l")
    pd.testing.assert_frame_equal(d1.sort_index(), d3.sort_index())
    with pytest.raises(KeyNotFoundError):
        spatial_autocorr(a, genes=["NOT_A_GENE"])
    with pytest.raises(KeyNotFoundError):
        spatial_autocorr(a, connectivity_key="missing")
    with pytest.raises(InputError):
        spatial_autocorr(a, mode="getis")


def test_constant_gene_and_bh(dlpfc):
    a = dlpfc[:, :20].copy()
    a.X = a.X.toarray()
    a.X[:, 0] = 1.0
    df = spatial_autocorr(a)
    assert np.isnan(df.loc[a.var_names[0], "I"]) and np.isnan(df.loc[a.var_names[0], "pval_norm"])
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    np.testing.assert_allclose(K.fdr_bh(p), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, np.nan, 0.5])  # m = 4 tests


def test_uns_dataframe_h5ad_roundtrip(dlpfc, tmp_path):
    a = dlpfc.copy()
    df = spatial_autocorr(a, genes=list(a.var_names[:100]))
    a.write_h5ad(tmp_path / "m.h5ad")
    b = ad.read_h5ad(tmp_path / "m.h5ad")
    pd.testing.assert_frame_equal(b.uns["moranI"], df)
    assert b.uns["moranI.params"]["params"]["n_genes"] == 100


@pytest.mark.gpu
def test_cpu_vs_cuda_autocorr(dlpfc):
    a = dlpfc.copy()
    genes = list(a.var_names[:300])
    c = spatial_autocorr(a, genes=genes, n_perms=50, seed=1, key_added="c")
    g = spatial_autocorr(a, genes=genes, n_perms=50, seed=1, use_gpu=True, key_added="g")
    for col in ("I", "pval_norm", "pval_rand", "var_sim", "pval_z_sim"):
        np.testing.assert_allclose(g[col], c[col], rtol=1e-9, atol=1e-12, err_msg=col)
    np.testing.assert_array_equal(g["pval_sim"], c["pval_sim"])
    w = K.row_normalize(a.obsp["spatial.connectivities"])
    for mode in ("moran", "geary"):
        s_c = K.autocorr_scores(a.X, w, CPU, mode=mode)
        s_g = K.autocorr_scores(a.X, w, torch.device("cuda"), mode=mode)
        np.testing.assert_allclose(s_g["score"], s_c["score"], rtol=1e-9)


@pytest.mark.parametrize("mode", ["moran", "geary"])
def test_permutation_kernel_equals_permuted_values(dlpfc, mode):
    """The batched relabelled-weights product equals the statistic of the permuted values, x[perm]."""
    w = K.row_normalize(dlpfc.obsp["spatial.connectivities"])
    x = dlpfc.X[:, 1000:1200]
    sims = K.autocorr_permutation_scores(x, w, CPU, n_perms=12, seed=5, mode=mode, chunk_bytes=1 << 23)
    perms = K.permutations(dlpfc.n_obs, 12, 5).numpy()
    direct = np.stack([K.autocorr_scores(x[p], w, CPU, mode=mode)["score"] for p in perms])
    np.testing.assert_allclose(sims, direct, rtol=1e-9, atol=1e-12)


def test_input_not_modified(dlpfc):
    """X with unsorted column indices (as products and slices leave them) must come back untouched."""
    a = dlpfc[:, :300].copy()
    x = sp.csr_matrix(a.X, dtype=np.float32, copy=True)
    x.sort_indices()
    # reverse the order of the stored entries within every row: same matrix, unsorted indices
    order = np.concatenate([np.arange(x.indptr[i + 1] - 1, x.indptr[i] - 1, -1) for i in range(x.shape[0])])
    x = sp.csr_matrix((x.data[order], x.indices[order], x.indptr), shape=x.shape)
    assert not x.has_sorted_indices
    a.X = x
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    w_before = a.obsp["spatial.connectivities"].copy()
    d1 = spatial_autocorr(a, mode="moran")
    d2 = spatial_autocorr(a, mode="geary")
    for arr, ref in zip((a.X.data, a.X.indices, a.X.indptr), before):
        np.testing.assert_array_equal(arr, ref)
    assert (a.obsp["spatial.connectivities"] != w_before).nnz == 0
    ref = spatial_autocorr(dlpfc[:, :300].copy(), mode="moran")
    np.testing.assert_allclose(d1.loc[ref.index, "I"], ref["I"], rtol=1e-10)
    dense = K.autocorr_scores(x.toarray(), K.row_normalize(w_before), CPU, mode="geary")["score"]
    np.testing.assert_allclose(d2.loc[a.var_names, "C"], dense, rtol=1e-10)
