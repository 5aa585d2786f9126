"""Statistics over many samples: the tidy table of spatial_graph_stats against the single-sample functions,
subunits, errors, the sample embedding and compare_groups (on samples cut from the real DLPFC 151673 layers and
Xenium fixtures of tests/data/squidpy_stats_ref/)."""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from expkit.errors import InputError
from expkit.spatial import spatial_neighbors
from expkit.spatial import stats_graph as sg
from expkit.spatial import stats_shape as ss
from expkit.spatial.cohort import STATISTICS, TABLE_COLUMNS, compare_groups, sample_embedding, spatial_graph_stats

from test_spatial_stats import load

R = 150.0  # DLPFC pixels: the hexagonal spacing is ~138 px, so r = 150 keeps the 6 nearest spots


def _strips(a, n: int, *, shuffle: bool, seed: int, group: str):
    """``n`` vertical strips of a sample as separate samples; ``shuffle`` permutes the labels inside each strip
    (same composition, spatial structure destroyed)."""
    x = a.obsm["spatial"][:, 0]
    edges = np.quantile(x, np.linspace(0, 1, n + 1))
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        m = (x >= edges[i]) & (x <= edges[i + 1]) if i == n - 1 else (x >= edges[i]) & (x < edges[i + 1])
        b = ad.AnnData(obs=a.obs.loc[m, ["label"]].copy())
        b.obsm["spatial"] = a.obsm["spatial"][m]
        if shuffle:
            b.obs["label"] = pd.Categorical(rng.permutation(b.obs["label"].astype(str).to_numpy()),
                                            categories=a.obs["label"].cat.categories)
        b.obs["group"] = group
        b.obs["batch"] = f"b{i % 2}"
        out[f"{group}{i}"] = b
    return out


@pytest.fixture(scope="module")
def dlpfc():
    a = load("dlpfc")
    del a.obsp["spatial.connectivities"]
    return a


def test_table_equals_single_sample_functions(dlpfc):
    a = dlpfc.copy()
    tab = spatial_graph_stats({"151673": a}, cluster_key="label", radii=(R,), n_perms=200, seed=0)
    assert list(tab.columns) == list(TABLE_COLUMNS)
    assert set(tab["statistic"]) == set(STATISTICS)
    spatial_neighbors(a, radius=R)
    cats = list(a.obs["label"].cat.categories)

    def wide(stat, two=True):
        t = tab[tab.statistic == stat]
        if not two:
            return t.set_index("label_a")["value"].reindex(cats).to_numpy()
        return t.pivot(index="label_a", columns="label_b", values="value").reindex(index=cats, columns=cats).to_numpy()

    np.testing.assert_allclose(wide("interaction"), sg.interaction_matrix(a, cluster_key="label", normalized=True),
                               rtol=1e-12)
    cen = sg.centrality(a, cluster_key="label", score=["degree_centrality", "average_clustering"])
    np.testing.assert_allclose(wide("degree_centrality", False), cen["degree_centrality"], rtol=1e-12)
    np.testing.assert_allclose(wide("average_clustering", False), cen["average_clustering"], rtol=1e-12)
    np.testing.assert_allclose(wide("moran", False), ss.label_moran(a, cluster_key="label")["I"], rtol=1e-9)
    con = ss.label_connectivity(a, cluster_key="label")
    np.testing.assert_allclose(wide("components", False), con["n_components"] / con["n_obs"], rtol=1e-12)
    co = sg.co_occurrence(a, cluster_key="label", interval=[0.0, R])
    np.testing.assert_allclose(wide("co_occurrence"), co["occ"][:, :, 0], rtol=1e-12)
    z = sg.nhood_enrichment(a, cluster_key="label", n_perms=200, seed=1)["zscore"]
    got = wide("nhood_enrichment")
    ok = np.isfinite(z) & np.isfinite(got)
    assert np.corrcoef(z[ok], got[ok])[0, 1] > 0.98  # two permutation streams
    prop = wide("proportion", False)
    np.testing.assert_allclose(prop, a.obs["label"].value_counts(normalize=True).reindex(cats), rtol=1e-12)


def test_subunits_and_3d_cubes(dlpfc):
    tab = spatial_graph_stats({"s": dlpfc}, cluster_key="label", radii=(R,), subunits=(1500, 1500),
                              min_obs_per_subunit=50, statistics=["proportion", "interaction"])
    prop = tab[tab.statistic == "proportion"]
    sums = prop.groupby("subunit", observed=True)["value"].sum()
    assert len(sums) >= 4 and np.allclose(sums, 1.0)
    assert (prop.groupby("subunit", observed=True)["n_obs"].first() >= 50).all()
    b = dlpfc.copy()
    b.obsm["spatial"] = np.column_stack([b.obsm["spatial"], np.repeat([0.0, 1000.0], [b.n_obs // 2,
                                                                                      b.n_obs - b.n_obs // 2])])
    t3 = spatial_graph_stats({"s": b}, cluster_key="label", radii=(R,), subunits=(3000, 3000, 600),
                             min_obs_per_subunit=20, statistics=["proportion"])
    names = t3["subunit"].astype(str).unique()
    assert all(len(n.split("_")) == 3 for n in names) and {n.split("_")[2] for n in names} == {"0", "1"}


def test_errors_radius_labels_statistics(dlpfc):
    with pytest.raises(InputError, match=r"radius 1e\+06 is larger than sample 's', whose extent is"):
        spatial_graph_stats({"s": dlpfc}, cluster_key="label", radii=(1e6,))
    with pytest.raises(InputError, match="unknown statistic"):
        spatial_graph_stats({"s": dlpfc}, cluster_key="label", statistics=["ripley_Q"])
    b = dlpfc.copy()
    b.obs["label"] = b.obs["label"].astype(str)
    with pytest.raises(InputError, match="not categorical"):
        spatial_graph_stats({"s": b}, cluster_key="label")
    c = dlpfc.copy()
    lab = c.obs["label"].astype(str).to_numpy().copy()
    lab[0] = "rare"
    c.obs["label"] = pd.Categorical(lab)
    with pytest.warns(UserWarning, match="rare"):
        t = spatial_graph_stats({"s": c}, cluster_key="label", radii=(R,), statistics=["proportion"])
    assert "rare" not in set(t["label_a"].astype(str))


@pytest.fixture(scope="module")
def cohort(dlpfc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = {**_strips(dlpfc, 6, shuffle=False, seed=0, group="layered"),
                   **_strips(dlpfc, 6, shuffle=True, seed=1, group="shuffled")}
        return spatial_graph_stats(samples, cluster_key="label", radii=(R,), n_perms=50, seed=0,
                                   statistics=["proportion", "moran", "nhood_enrichment", "interaction"])


def test_compare_groups_finds_spatial_structure_not_composition(cohort):
    diff = compare_groups(cohort, group_key="group", groups=("shuffled", "layered"))
    assert {"pval", "qval", "auc", "diff", "method"} <= set(diff.columns)
    assert diff["n_ref"].between(2, 6).all() and (diff["method"] == "exact").all()
    moran = diff[diff.statistic == "moran"]
    full = moran[(moran.n_ref == 6) & (moran.n_other == 6)]  # labels present in every strip
    assert len(full) >= 3 and (full["auc"] >= 0.9).all()   # layered strips above shuffled ones
    assert (full["pval"] < 0.02).all() and (full["pval"] >= 2 / 924 - 1e-12).all()  # 2/924: the smallest exact p
    assert moran["auc"].median() >= 0.9 and (moran["qval"] < 0.1).mean() >= 0.8
    prop = diff[diff.statistic == "proportion"]
    assert np.allclose(prop["diff"], 0.0) and (prop["pval"] == 1.0).all()  # shuffling keeps the composition
    # the exact two-sided p-value equals scipy's exact Mann-Whitney test where nothing is tied
    wide = cohort[cohort.statistic == "moran"].pivot_table(index="sample", columns="label_a", values="value",
                                                           observed=True)
    grp = np.array([s.startswith("layered") for s in wide.index])
    lab = full["label_a"].iloc[0]
    p = sps.mannwhitneyu(wide.loc[grp, lab], wide.loc[~grp, lab], method="exact").pvalue
    assert moran.set_index("label_a").loc[lab, "pval"] == pytest.approx(p, rel=1e-9)
    with pytest.raises(InputError, match="groups must name two of"):
        compare_groups(cohort, groups=("layered", "tumour"))


def test_compare_groups_normal_approximation_matches_scipy(cohort):
    diff = compare_groups(cohort, groups=("shuffled", "layered"), statistics=["interaction"], max_exact=10)
    assert (diff["method"] == "normal").all()
    t = cohort[cohort.statistic == "interaction"]
    row = diff.iloc[len(diff) // 2]
    sel = t[(t.label_a == row.label_a) & (t.label_b == row.label_b)].set_index("sample")["value"]
    a = sel[[s for s in sel.index if s.startswith("shuffled")]]
    b = sel[[s for s in sel.index if s.startswith("layered")]]
    ref = sps.mannwhitneyu(a, b, method="asymptotic", use_continuity=False).pvalue
    assert row.pval == pytest.approx(ref, rel=1e-9)


def test_sample_embedding_separates_groups(cohort):
    emb = sample_embedding(cohort, n_dim=4, batch_key="batch", umap=True, seed=0)
    assert emb.n_obs == 12 and emb.obsm["pca"].shape == (12, 4)
    assert emb.obsm["harmony"].shape == (12, 4) and emb.obsm["umap"].shape == (12, 2)
    assert set(emb.obs["group"]) == {"layered", "shuffled"}
    pc1 = emb.obsm["pca"][:, 0]
    g = emb.obs["group"].to_numpy() == "layered"
    gap = abs(pc1[g].mean() - pc1[~g].mean()) / np.sqrt((pc1[g].var() + pc1[~g].var()) / 2)
    assert gap > 3
    again = sample_embedding(cohort, n_dim=4, batch_key="batch", umap=True, seed=0)
    np.testing.assert_array_equal(emb.obsm["umap"], again.obsm["umap"])
