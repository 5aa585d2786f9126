"""expkit.tl.markers / get_markers on DLPFC 151673 (manual layers), against scanpy's stored values.

The scanpy reference values come from tests/reference/make_scanpy_de_refs.py (scanpy is not needed here).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from _de_helpers import dlpfc  # noqa: E402
from expkit.errors import InputError, KeyNotFoundError, ResourceError  # noqa: E402
from expkit.kernels import rank_tests as rt  # noqa: E402
from expkit.tl.markers import get_markers, markers  # noqa: E402

torch.set_num_threads(1)
REF = Path(__file__).parent / "data" / "scanpy_ref" / "dlpfc151673_de.npz"
GROUPS = ["L1", "WM"]


@pytest.fixture(scope="module")
def adata(shared_data):
    return dlpfc(shared_data, "151673")


@pytest.fixture(scope="module")
def ref():
    if not REF.exists():
        pytest.skip(f"{REF} missing: run tests/reference/make_scanpy_de_refs.py")
    return dict(np.load(REF))


@pytest.fixture(scope="module")
def wil(adata):
    a = adata.copy()
    markers(a, groupby="layer", method="wilcoxon", key_added="wil")
    return a


@pytest.fixture(scope="module")
def ttest(adata):
    a = adata.copy()
    markers(a, groupby="layer", method="t-test", key_added="tt")
    return a


def _col(a, key, group, col):
    res = a.uns[key]["results"]
    return res.loc[res["group"] == group, col].to_numpy()


# ---------------------------------------------------------------- kernels, no reference needed

def test_average_ranks_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(7, 200)).astype(np.float64)  # heavy ties
    x[0] = 0.0
    ranks, ties = rt.average_ranks(torch.as_tensor(x))
    np.testing.assert_array_equal(ranks.numpy(), stats.rankdata(x, axis=1))
    expect = [sum(t ** 3 - t for t in np.unique(row, return_counts=True)[1]) for row in x]
    np.testing.assert_array_equal(ties.numpy(), expect)


def test_wilcoxon_matches_scipy_mannwhitneyu(adata):
    a = adata[:, :40].copy()
    markers(a, groupby="layer", groups=["L2"], method="wilcoxon", key_added="m")
    x = a.layers["lognorm"].toarray().astype(np.float64)
    inside = (a.obs["layer"] == "L2").to_numpy()
    expect = stats.mannwhitneyu(x[inside], x[~inside], alternative="two-sided", use_continuity=False,
                                method="asymptotic", axis=0).pvalue
    got = _col(a, "m", "L2", "p")
    np.testing.assert_allclose(got, expect, rtol=1e-9)


def test_ttest_matches_scipy_welch(adata):
    a = adata[:, :40].copy()
    markers(a, groupby="layer", groups=["L5"], reference="L6", method="t-test", key_added="m")
    x = a.layers["lognorm"].toarray().astype(np.float64)
    lab = a.obs["layer"].to_numpy()
    res = stats.ttest_ind(x[lab == "L5"], x[lab == "L6"], equal_var=False, axis=0)
    np.testing.assert_allclose(_col(a, "m", "L5", "score"), res.statistic, rtol=1e-9)
    np.testing.assert_allclose(_col(a, "m", "L5", "p"), res.pvalue, rtol=1e-9)


def test_chunking_and_budget(adata, wil):
    a = adata[:, :300].copy()
    budget = 200 * a.n_obs * 96  # chunks of ~200 genes: two chunks
    markers(a, groupby="layer", method="wilcoxon", key_added="m", memory_budget=budget)
    full = wil.uns["wil"]["results"]
    full = full[full["uid"].isin(a.var_names)]
    np.testing.assert_allclose(a.uns["m"]["results"]["score"].to_numpy(), full["score"].to_numpy(), rtol=1e-12)
    with pytest.raises(ResourceError):
        markers(a, groupby="layer", key_added="m", memory_budget=1000)


def test_dense_layer_equals_sparse(adata, wil):
    a = adata[:, :100].copy()
    a.layers["dense"] = a.layers["lognorm"].toarray()
    markers(a, groupby="layer", layer="dense", key_added="m")
    full = wil.uns["wil"]["results"]
    full = full[full["uid"].isin(a.var_names)]
    np.testing.assert_allclose(a.uns["m"]["results"]["p"].to_numpy(), full["p"].to_numpy(), rtol=1e-12)


def test_tiny_pvalues_in_log_space(ttest):
    res = ttest.uns["tt"]["results"]
    assert np.isfinite(res["log10.p"]).all() and np.isfinite(res["log10.q"]).all()
    pos = res["p"].to_numpy() > 1e-290
    np.testing.assert_allclose(res["log10.p"].to_numpy()[pos], np.log10(res["p"].to_numpy()[pos]), rtol=1e-8)
    zero = res["p"].to_numpy() == 0
    assert zero.any() and (res["log10.p"].to_numpy()[zero] < -300).all()  # MBP, PLP1 in WM
    # BH: q >= p, monotone in p within a group
    for _, d in res.groupby("group", observed=True):
        assert (d["log10.q"] >= d["log10.p"] - 1e-12).all()
        o = np.argsort(d["log10.p"].to_numpy(), kind="stable")
        assert np.all(np.diff(d["log10.q"].to_numpy()[o]) >= -1e-12)


# ---------------------------------------------------------------- against scanpy

@pytest.mark.parametrize("group", GROUPS)
def test_wilcoxon_equals_scanpy(wil, ref, group):
    np.testing.assert_array_equal(wil.var_names.to_numpy().astype(str), ref["uid"])
    np.testing.assert_allclose(_col(wil, "wil", group, "p"), ref[f"wil.{group}.pvals"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(_col(wil, "wil", group, "score"), ref[f"wil.{group}.scores"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_col(wil, "wil", group, "fc"), ref[f"wil.{group}.logfoldchanges"],
                               rtol=1e-5, atol=1e-5)
    if group == "WM":
        np.testing.assert_allclose(_col(wil, "wil", group, "q"), ref["wil.WM.pvals_adj"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(_col(wil, "wil", group, "pct.in"), ref["wil.WM.pts"], rtol=1e-12)
        np.testing.assert_allclose(_col(wil, "wil", group, "pct.out"), ref["wil.WM.pts_rest"], rtol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_ttest_equals_scanpy(ttest, ref, group):
    # scanpy's sparse variance carries ~3e-8 relative float32 rounding (checked against a float64 two-pass
    # variance), which moves small p-values by up to ~2e-6 (p ~ 1e-9) and ~2e-5 (p ~ 1e-288) relative; hence:
    # p to 1e-6 where p > 1e-4, 5e-6 where p > 1e-20, log10(p) to 1e-6 relative everywhere
    # (Wilcoxon: p to 1e-6 everywhere)
    mine, theirs = _col(ttest, "tt", group, "p"), ref[f"tt.{group}.pvals"]
    mid = theirs > 1e-20
    np.testing.assert_allclose(mine[mid], theirs[mid], rtol=5e-6, atol=0)
    ok = theirs > 1e-4
    np.testing.assert_allclose(mine[ok], theirs[ok], rtol=1e-6, atol=0)
    pos = theirs > 0
    np.testing.assert_allclose(np.log10(mine[pos]), np.log10(theirs[pos]), rtol=1e-6)
    np.testing.assert_allclose(_col(ttest, "tt", group, "log10.p")[pos], np.log10(theirs[pos]), rtol=1e-6)
    if group == "WM":
        q, tq = _col(ttest, "tt", group, "q"), ref["tt.WM.pvals_adj"]
        np.testing.assert_allclose(q[tq > 1e-4], tq[tq > 1e-4], rtol=1e-6, atol=0)
    np.testing.assert_allclose(_col(ttest, "tt", group, "score"), ref[f"tt.{group}.scores"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_col(ttest, "tt", group, "fc"), ref[f"wil.{group}.logfoldchanges"],
                               rtol=1e-5, atol=1e-5)


def test_reference_group_equals_scanpy(adata, ref):
    a = adata.copy()
    markers(a, groupby="layer", groups=["WM"], reference="L1", method="wilcoxon", key_added="ref")
    np.testing.assert_allclose(_col(a, "ref", "WM", "p"), ref["ref.WM.pvals"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(_col(a, "ref", "WM", "score"), ref["ref.WM.scores"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- storage and get_markers

def test_uns_layout_roundtrips_h5ad(wil, tmp_path):
    import anndata as ad

    a = wil.copy()
    a.write_h5ad(tmp_path / "m.h5ad")
    b = ad.read_h5ad(tmp_path / "m.h5ad")
    assert b.uns["wil"]["params"]["method"] == "wilcoxon"
    assert "version" in b.uns["wil"]
    pd.testing.assert_frame_equal(get_markers(a, slot="wil", group_name="WM"),
                                  get_markers(b, slot="wil", group_name="WM"))


def test_get_markers(wil):
    df = get_markers(wil, slot="wil", group_name="WM", min_pct=0.5, max_q=0.01)
    assert list(df.columns[:8]) == ["gene", "uid", "pct.in", "pct.out", "fc", "p", "q", "log10.q"]
    assert (df["pct.in"] >= 0.5).all() and (df["q"] <= 0.01).all()
    assert np.all(np.diff(df["score"].to_numpy()) <= 0)
    assert set(df["gene"].head(10)) & {"MOBP", "MBP", "PLP1"}  # white-matter myelin genes
    l1 = get_markers(wil, slot="wil", group_name="L1", only_positive=True, n_genes=20)
    assert len(l1) == 20 and (l1["score"] > 0).all()
    with pytest.raises(KeyNotFoundError):
        get_markers(wil, slot="wil", group_name="L9")
    with pytest.raises(KeyNotFoundError):
        get_markers(wil, slot="nothing", group_name="WM")


def test_errors_and_missing_labels(adata):
    a = adata[:, :50].copy()
    with pytest.raises(KeyNotFoundError):
        markers(a, groupby="nope")
    with pytest.raises(InputError):
        markers(a, groupby="layer", method="magic")
    with pytest.raises(InputError):
        markers(a, groupby="layer", groups=["L9"])
    # unlabelled cells are in the rest of every group, in no group
    a.obs["layer2"] = a.obs["layer"].astype(object).where(a.obs["layer"] != "L3", None)
    summary = markers(a, groupby="layer2", key_added="m")
    assert "L3" not in summary.index and (summary["n.out"] == a.n_obs - summary["n.in"]).all()


@pytest.mark.gpu
def test_gpu_equals_cpu(adata, wil):
    a = adata.copy()
    markers(a, groupby="layer", method="wilcoxon", key_added="g", use_gpu=True)
    cpu, gpu = wil.uns["wil"]["results"], a.uns["g"]["results"]
    np.testing.assert_allclose(gpu["score"], cpu["score"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gpu["log10.p"], cpu["log10.p"], rtol=1e-9)
    markers(a, groupby="layer", groups=["WM"], reference="L1", key_added="gr", use_gpu=True)
    b = adata.copy()
    markers(b, groupby="layer", groups=["WM"], reference="L1", key_added="gr")
    np.testing.assert_allclose(a.uns["gr"]["results"]["p"], b.uns["gr"]["results"]["p"], rtol=1e-9)


def test_sparse_input_not_modified(adata):
    a = adata[:, :20].copy()
    before = a.layers["lognorm"].copy()
    markers(a, groupby="layer", key_added="m")
    assert sp.issparse(a.layers["lognorm"]) and (a.layers["lognorm"] != before).nnz == 0


def test_constant_gene_and_single_cell_group(adata):
    a = adata[:, :30].copy()
    x = a.layers["lognorm"].toarray()
    x[:, 0] = 0.0  # a gene with no expression
    a.layers["lognorm"] = sp.csr_matrix(x)
    labels = a.obs["layer"].astype(str).to_numpy().copy()
    labels[0] = "solo"
    a.obs["g"] = pd.Categorical(labels)
    for method in ("wilcoxon", "t-test"):
        markers(a, groupby="g", method=method, key_added="m")
        res = a.uns["m"]["results"]
        assert np.isfinite(res["score"]).all() and res["p"].between(0, 1).all()
        const = res[res["uid"] == a.var_names[0]]
        assert (const["score"] == 0).all() and (const["p"] == 1).all()
        solo = res[res["group"] == "solo"]
        assert solo["pct.in"].isin([0.0, 1.0]).all()


def test_small_synthetic_without_shared_data():
    """Runs without the shared data (CI): Poisson counts, three groups, against scipy."""
    import anndata as ad

    rng = np.random.default_rng(1)
    n, g = 300, 25
    lab = np.repeat(["a", "b", "c"], n // 3)
    lam = np.ones((n, g))
    lam[lab == "a", :5] = 4.0
    x = np.log1p(rng.poisson(lam).astype(np.float64))
    a = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=pd.DataFrame({"g": lab}, index=[f"c{i}" for i in range(n)]))
    a.layers["lognorm"] = a.X.copy()
    summary = markers(a, groupby="g", key_added="m")
    assert list(summary.index) == ["a", "b", "c"] and summary.loc["a", "n.markers"] >= 5
    xf = a.X.toarray().astype(np.float64)
    inside = lab == "a"
    expect = stats.mannwhitneyu(xf[inside], xf[~inside], alternative="two-sided", use_continuity=False,
                                method="asymptotic", axis=0).pvalue
    np.testing.assert_allclose(_col(a, "m", "a", "p"), expect, rtol=1e-9)
    top = get_markers(a, slot="m", group_name="a", n_genes=5)
    assert set(top["uid"]) == {str(i) for i in range(5)}
