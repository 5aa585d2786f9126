"""Spatial label statistics against squidpy 1.8.2 (fixtures in tests/data/squidpy_stats_ref/, made by
benchmarks/compare_squidpy_stats.py on real subsets: 2,687 Xenium mouse brain cells with expkit leiden labels,
DLPFC 151673's 3,611 spots with their manual layers), and their own invariants and errors."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull

from expkit.errors import InputError, KeyNotFoundError
from expkit.kernels import ripley as KR
from expkit.kernels import spatial_stats as KS
from expkit.spatial import stats_graph as sg
from expkit.spatial import stats_ripley as sr
from expkit.spatial import stats_shape as ss

REF = Path(__file__).resolve().parent / "data" / "squidpy_stats_ref"
NAMES = ("xenium", "dlpfc")


def _natural(values):
    return sorted(values, key=lambda v: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(v))])


def load(name: str):
    """The fixture's cells as an AnnData with squidpy's graph in obsp['spatial.connectivities']."""
    if name == "xenium":
        df = pd.read_csv(REF / "xenium_cells.csv.gz", dtype={"leiden": str})
        lab = df["leiden"]
    else:
        df = pd.read_csv(REF / "dlpfc_151673_cells.csv.gz")
        lab = df["layer"].astype(str)
    a = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(lab, categories=_natural(lab.unique()))},
                                    index=[str(i) for i in range(len(df))]))
    a.obsm["spatial"] = df[["x", "y"]].to_numpy(np.float64)
    a.obsp["spatial.connectivities"] = sp.load_npz(REF / f"{name}_graph.npz").tocsr()
    return a


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return request.param, load(request.param), np.load(REF / f"{request.param}_squidpy.npz")


def test_interaction_matrix_equals_squidpy(case):
    name, a, ref = case
    assert list(ref["labels"]) == list(a.obs["label"].cat.categories)
    m = sg.interaction_matrix(a, cluster_key="label")
    np.testing.assert_array_equal(m, ref["interactions"])
    mn = sg.interaction_matrix(a, cluster_key="label", normalized=True, key_added="x")
    np.testing.assert_allclose(mn, ref["interactions_norm"], rtol=0, atol=1e-15)
    assert a.uns["label.interactions"]["params"]["normalized"] is False
    np.testing.assert_array_equal(a.uns["x"]["matrix"], mn)


def test_centrality_equals_squidpy(case):
    name, a, _ = case
    ref = pd.read_csv(REF / f"{name}_centrality.csv", index_col=0)
    ref.index = ref.index.astype(str)
    got = sg.centrality(a, cluster_key="label")
    assert list(got.columns) == list(ref.columns)
    np.testing.assert_allclose(got.loc[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-12, atol=1e-14)
    one = sg.centrality(a, cluster_key="label", score="degree_centrality", key_added="c1")
    np.testing.assert_array_equal(one["degree_centrality"], got["degree_centrality"])


def test_nhood_enrichment_matches_squidpy(case):
    name, a, ref = case
    res = sg.nhood_enrichment(a, cluster_key="label", n_perms=1000, seed=0)
    np.testing.assert_array_equal(res["count"], ref["nhood_count"])
    z, zr = res["zscore"], ref["nhood_zscore"]
    ok = np.isfinite(z) & np.isfinite(zr)
    assert ok.mean() > 0.95
    assert np.corrcoef(z[ok], zr[ok])[0, 1] >= 0.99
    # permutation noise: the z-scores differ by a few tenths of a unit, relatively ~1 / sqrt(n_perms)
    assert np.median(np.abs(z[ok] - zr[ok])) < 0.1 * max(1.0, np.median(np.abs(zr[ok])))
    assert a.uns["label.nhood"]["params"]["n_perms"] == 1000


def test_co_occurrence_matches_squidpy(case):
    name, a, ref = case
    res = sg.co_occurrence(a, cluster_key="label")
    np.testing.assert_array_equal(res["interval"], ref["occ_interval"])
    assert res["occ"].shape == ref["occ"].shape
    np.testing.assert_allclose(res["occ"], ref["occ"], rtol=0, atol=1e-6)
    fixed = sg.co_occurrence(a, cluster_key="label", interval=ref["occ_fixed_interval"], key_added="co2")
    np.testing.assert_allclose(fixed["occ"], ref["occ_fixed"], rtol=0, atol=1e-6)
    # rings are the differences of the cumulative pair counts
    ring = sg.co_occurrence(a, cluster_key="label", interval=ref["occ_fixed_interval"], cumulative=False,
                            key_added="co3")
    cum = fixed["pairs"]
    np.testing.assert_array_equal(ring["pairs"][:, :, 1:], cum[:, :, 1:] - cum[:, :, :-1])


def _sims_agree(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Fraction of support points where the simulated means differ by more than 4 standard errors."""
    se = np.sqrt(ours.var(0) / len(ours) + theirs.var(0) / len(theirs))
    live = se > 0
    z = np.abs(ours.mean(0) - theirs.mean(0))[live] / se[live]
    assert np.all(ours.mean(0)[~live] == theirs.mean(0)[~live])
    return float((z > 4).mean())


@pytest.mark.parametrize("mode", ["L", "G"])
def test_ripley_matches_squidpy(case, mode):
    name, a, ref = case
    res = sr.ripley(a, cluster_key="label", mode=mode, n_simulations=100 if mode == "G" else 40, seed=0)
    np.testing.assert_allclose(res["bins"], ref[f"ripley_{mode}_bins"], rtol=1e-12)
    stat = res["stat"].loc[list(ref[f"ripley_{mode}_labels"])].to_numpy()
    np.testing.assert_allclose(stat, ref[f"ripley_{mode}_stat"], rtol=1e-6, atol=1e-6)
    # simulation envelopes: the same distribution as squidpy's (unseeded) simulations
    assert _sims_agree(res["sims"], ref[f"ripley_{mode}_sims"]) <= 0.05
    assert np.all(res["envelope_low"] <= res["envelope_high"])
    assert res["pvalues"].shape == stat.shape and np.all(res["pvalues"] <= 0.5)


def test_ripley_f_matches_squidpy(case):
    name, a, ref = case
    labels = np.asarray(a.obs["label"])
    got = np.vstack([KR.fg_stat(KR.knn_distances(a.obsm["spatial"][labels == c], ref["ripley_F_points"], 2).ravel(),
                                ref["ripley_F_bins"]) for c in ref["ripley_F_labels"]])
    np.testing.assert_allclose(got, ref["ripley_F_stat"], rtol=0, atol=1e-12)
    res = sr.ripley(a, cluster_key="label", mode="F", n_simulations=100, seed=0)
    assert _sims_agree(res["sims"], ref["ripley_F_sims"]) <= 0.05


def test_same_seed_same_result_and_seeds_differ():
    a = load("dlpfc")
    r1 = sg.nhood_enrichment(a, cluster_key="label", n_perms=50, seed=3, key_added="n1")
    r2 = sg.nhood_enrichment(a, cluster_key="label", n_perms=50, seed=3, key_added="n2")
    r3 = sg.nhood_enrichment(a, cluster_key="label", n_perms=50, seed=4, key_added="n3")
    np.testing.assert_array_equal(r1["zscore"], r2["zscore"])
    assert not np.allclose(r1["zscore"], r3["zscore"], equal_nan=True)
    p1 = sr.ripley(a, cluster_key="label", mode="L", n_simulations=10, n_observations=300, seed=1, key_added="r1")
    p2 = sr.ripley(a, cluster_key="label", mode="L", n_simulations=10, n_observations=300, seed=1, key_added="r2")
    np.testing.assert_array_equal(p1["sims"], p2["sims"])
    assert not np.array_equal(p1["sims"][0], p1["sims"][1])  # independent simulations


def test_permutations_within_libraries_keep_library_labels():
    codes = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    groups = np.array([0] * 5 + [1] * 5)
    perms = KS.permuted_labels(codes, 200, np.random.default_rng(0), groups)
    for g in (0, 1):
        want = np.sort(codes[groups == g])
        assert all(np.array_equal(np.sort(p[groups == g]), want) for p in perms)
    assert len({tuple(p) for p in perms}) > 50
    u = KS.within_unit_permutations(codes, groups, 200, np.random.default_rng(0))
    assert all(np.array_equal(np.sort(p[groups == 1]), np.sort(codes[groups == 1])) for p in u)


def test_co_occurrence_3d_brute_force():
    rng = np.random.default_rng(0)
    xyz = rng.random((300, 3)).astype(np.float32) * 100
    codes = rng.integers(0, 3, 300)
    t = np.array([0, 10, 30, 60], np.float32)
    got = KS.cooccurrence_counts(xyz, codes, 3, t, KS.torch.device("cpu"), chunk_elements=5000)
    d = xyz[:, None, :] - xyz[None, :, :]
    d2 = (d * d).sum(-1)
    np.fill_diagonal(d2, np.inf)
    oh = np.eye(3)[codes]
    for r in range(4):
        np.testing.assert_array_equal(got[:, :, r], (oh.T @ (d2 <= t[r] ** 2) @ oh).round())


def test_co_occurrence_pairs_on_thresholds_and_workers():
    """A grid puts many pairs exactly on the thresholds (the table's sentinel path must count them, d2 <= t2);
    the counts do not depend on the block size or the number of worker threads."""
    from expkit.kernels import cooccurrence as KC

    g = np.stack(np.meshgrid(np.arange(30), np.arange(20)), -1).reshape(-1, 2).astype(np.float32) * 1.5
    codes = np.random.default_rng(1).integers(0, 4, len(g))
    t = np.array([1.5, 3.0, 1.5 * np.sqrt(5), 6.0, 7.5 * np.sqrt(2)], np.float32)
    d = g[:, None, :].astype(np.float64) - g[None, :, :]
    d2 = (d * d).sum(-1).astype(np.float32)
    np.fill_diagonal(d2, np.inf)
    oh = np.eye(4)[codes]
    t2 = (t * t).astype(np.float32)
    assert np.isin(d2, t2).sum() > 1000  # pairs exactly on a threshold
    want = np.stack([(oh.T @ (d2 <= t2[r]) @ oh).round() for r in range(len(t))], -1)
    cpu = KS.torch.device("cpu")
    for chunk, workers in ((1 << 20, 1), (997, 3)):
        got = KC.cooccurrence_counts(g, codes, 4, t, cpu, chunk_elements=chunk, n_workers=workers)
        np.testing.assert_array_equal(got, want)


def test_label_moran_equals_spatial_autocorr():
    from expkit.spatial import spatial_autocorr

    a = load("dlpfc")
    df = ss.label_moran(a, cluster_key="label")
    b = ad.AnnData(X=sp.csr_matrix(pd.get_dummies(a.obs["label"]).to_numpy(np.float64)), obs=a.obs.copy())
    b.var_names = list(a.obs["label"].cat.categories)
    b.obsp["spatial.connectivities"] = a.obsp["spatial.connectivities"]
    ref = spatial_autocorr(b, mode="moran")
    np.testing.assert_allclose(df["I"].to_numpy(), ref.loc[df.index, "I"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(df["pval_norm"].to_numpy(), ref.loc[df.index, "pval_norm"].to_numpy(), rtol=1e-9)
    assert (df["I"] > 0.3).all()  # cortical layers are compact bands


def test_label_hull_and_connectivity_against_scipy():
    a = load("xenium")
    hull = ss.label_hull(a, cluster_key="label")
    lab = np.asarray(a.obs["label"])
    c = hull.index[0]
    area = ConvexHull(a.obsm["spatial"][lab == c]).volume
    assert hull.loc[c, "area"] == pytest.approx(area, rel=1e-12)
    assert hull.loc[c, "density"] == pytest.approx((lab == c).sum() / area, rel=1e-12)
    con = ss.label_connectivity(a, cluster_key="label")
    g = a.obsp["spatial.connectivities"]
    for c in con.index[:3]:
        idx = np.flatnonzero(lab == c)
        n_comp, comp = connected_components(g[idx][:, idx], directed=True, connection="weak")
        assert con.loc[c, "n_components"] == n_comp
        assert con.loc[c, "largest"] == np.bincount(comp).max()
    assert (con["n_components"] <= con["n_obs"]).all()


def test_bad_labels_are_clear_errors_and_nothing_written():
    a = load("dlpfc")
    a.obs["layer_str"] = a.obs["label"].astype(str)
    before = set(a.uns)
    with pytest.raises(KeyNotFoundError, match=r"categorical columns: \['label'\]"):
        sg.nhood_enrichment(a, cluster_key="celltype", n_perms=10)
    with pytest.raises(InputError, match="not categorical.*\\['label'\\]"):
        sg.interaction_matrix(a, cluster_key="layer_str")
    with pytest.raises(InputError, match="extent"):
        sg.co_occurrence(a, cluster_key="label", interval=[0, 10, 1e6])
    assert set(a.uns) == before


def test_small_labels_warned_excluded_listed():
    a = load("dlpfc")
    lab = a.obs["label"].astype(str).to_numpy().copy()
    lab[0] = "rare"
    a.obs["lab2"] = pd.Categorical(lab, categories=_natural(set(lab)) + ["unused"])
    with pytest.warns(UserWarning, match="rare"):
        res = sg.nhood_enrichment(a, cluster_key="lab2", n_perms=20, seed=0)
    assert res["excluded"] == {"rare": 1, "unused": 0}
    assert "rare" not in list(res["labels"]) and len(res["labels"]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cen = sg.centrality(a, cluster_key="lab2")
    assert "rare" not in cen.index


@pytest.mark.gpu
def test_cuda_equals_cpu():
    a = load("xenium")
    cpu = sg.nhood_enrichment(a, cluster_key="label", n_perms=100, seed=0, key_added="c")
    gpu = sg.nhood_enrichment(a, cluster_key="label", n_perms=100, seed=0, use_gpu=True, key_added="g")
    np.testing.assert_array_equal(cpu["zscore"], gpu["zscore"])
    c1 = sg.co_occurrence(a, cluster_key="label", key_added="c1")
    c2 = sg.co_occurrence(a, cluster_key="label", use_gpu=True, key_added="c2")
    np.testing.assert_array_equal(c1["pairs"], c2["pairs"])


def test_results_are_written_to_h5ad(tmp_path):
    a = load("dlpfc")
    lab = a.obs["label"].astype(str).to_numpy().copy()
    lab[0] = "rare"
    a.obs["label"] = pd.Categorical(lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.nhood_enrichment(a, cluster_key="label", n_perms=20, seed=0)
        sg.co_occurrence(a, cluster_key="label", interval=5)
        sg.interaction_matrix(a, cluster_key="label")
        sg.centrality(a, cluster_key="label")
        sr.ripley(a, cluster_key="label", mode="G", n_simulations=5, n_observations=100, seed=0)
        ss.label_moran(a, cluster_key="label")
        ss.label_hull(a, cluster_key="label")
        ss.label_connectivity(a, cluster_key="label")
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(b.uns["label.nhood"]["zscore"], a.uns["label.nhood"]["zscore"])
    assert list(b.uns["label.ripley_G"]["labels"]) == list(a.uns["label.ripley_G"]["labels"])
    assert b.uns["label.nhood"]["excluded"] == {"rare": 1}
