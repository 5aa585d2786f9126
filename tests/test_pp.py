"""expkit.pp on real data, against scanpy reference values stored in tests/data/scanpy_ref.

The fixtures come from tests/reference/make_scanpy_pp_refs.py (scanpy 1.11, run in a separate venv);
CI needs no scanpy.
"""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pp_data as D  # noqa: E402

torch = pytest.importorskip("torch")
import expkit.pp as pp  # noqa: E402
from expkit.kernels.hvg import loess  # noqa: E402
from expkit.kernels.linalg import pca as pca_kernel  # noqa: E402
from expkit.kernels.linalg import scale_sparse  # noqa: E402

REF = Path(__file__).resolve().parent / "data" / "scanpy_ref"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ref(name: str) -> dict:
    path = REF / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"scanpy reference {path} missing (run tests/reference/make_scanpy_pp_refs.py)")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def human_ann(shared_data):
    return D.annotation(shared_data, "human")


@pytest.fixture(scope="module")
def dlpfc_raw(shared_data):
    return D.dlpfc(shared_data, "151673")


@pytest.fixture(scope="module")
def merged_raw(shared_data):
    return D.dlpfc_merged(shared_data)


@pytest.fixture(scope="module")
def xenium_raw(shared_data):
    return D.xenium(shared_data)


@pytest.fixture(scope="module")
def mob_raw(shared_data):
    return D.mob(shared_data)


def dlpfc(raw, ann=None):
    a = D.to_anndata(*raw)
    if ann is not None:
        a.var["mito"] = a.var_names.map(ann["mito"]).fillna(False).astype(bool)
        a.var["ribo"] = a.var_names.map(ann["ribo"]).fillna(False).astype(bool)
    return a


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------- qc and filter

def test_qc_metrics_dlpfc(dlpfc_raw, human_ann):
    a = dlpfc(dlpfc_raw, human_ann)
    x = a.layers["counts"]
    summary = pp.qc(a)
    dense_tot = np.asarray(x.sum(1)).ravel()
    np.testing.assert_allclose(a.obs["qc.n_counts"], dense_tot)
    np.testing.assert_array_equal(a.obs["qc.n_genes"], np.diff(x.indptr))
    ribo = a.var["ribo"].to_numpy()
    assert ribo.sum() >= 1
    expect = 100 * np.asarray(x[:, ribo].sum(1, dtype=np.float64)).ravel() / dense_tot
    np.testing.assert_allclose(a.obs["qc.pct_ribo"], expect, rtol=1e-12)
    np.testing.assert_allclose(a.obs["qc.pct_mito"], 0.0)  # the top-5000 table holds no MT gene
    np.testing.assert_array_equal(a.var["qc.n_cells"], np.bincount(x.indices, minlength=a.n_vars))
    np.testing.assert_allclose(a.var["qc.total_counts"], np.asarray(x.sum(0)).ravel())
    assert summary["n_ribo_genes"] == int(ribo.sum())
    assert a.uns["qc"]["params"]["layer"] == "counts" and "version" in a.uns["qc"]


def test_qc_matches_scanpy_mob(mob_raw, shared_data):
    r = ref("mob_rep11")
    x, obs, symbols = mob_raw
    a = D.to_anndata(x, obs, symbols)
    a.var["ribo"] = r["qc_ribo_mask"]
    a.var["mito"] = False  # the table holds no mitochondrial gene
    assert a.var["ribo"].sum() > 50
    pp.qc(a)
    np.testing.assert_allclose(a.obs["qc.n_counts"], r["qc_total_counts"], rtol=1e-6)
    np.testing.assert_array_equal(a.obs["qc.n_genes"], r["qc_n_genes"])
    np.testing.assert_allclose(a.obs["qc.pct_ribo"], r["qc_pct_ribo"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.obs["qc.pct_mito"], 0.0)
    np.testing.assert_array_equal(a.var["qc.n_cells"], r["qc_n_cells"])


def test_qc_flags_from_database(monkeypatch, dlpfc_raw, human_ann):
    """Without var['mito'/'ribo'], flags come from expkit.database.genes(taxa), by uid then symbol."""
    import expkit

    table = pd.DataFrame({"gene": human_ann["gene_name"], "mito": human_ann["mito"], "ribo": human_ann["ribo"]},
                         index=human_ann.index)
    # one ribosomal gene known only by its symbol (its uid is absent from the table)
    a = dlpfc(dlpfc_raw)
    is_ribo = np.asarray(a.var_names.map(human_ann["ribo"]).fillna(False), dtype=bool)
    ribo_uid = a.var_names[is_ribo][0]
    sym = human_ann.loc[ribo_uid, "gene_name"]
    table = pd.concat([table.drop(index=ribo_uid),
                       pd.DataFrame({"gene": [sym], "mito": [False], "ribo": [True]}, index=["OTHER_ID"])])
    calls = []
    fake = types.ModuleType("expkit.database")

    def genes(taxa):
        calls.append(taxa)
        return table

    fake.genes = genes
    monkeypatch.setitem(sys.modules, "expkit.database", fake)
    monkeypatch.setattr(expkit, "database", fake, raising=False)
    flags = pp.gene_flags(a, taxa="human")
    assert calls == ["human"]
    assert flags["ribo"][a.var_names.get_loc(ribo_uid)]
    assert flags["ribo"].sum() == is_ribo.sum() and not flags["mito"].any()
    # obs['taxa'] is used when taxa is not given
    a.obs["taxa"] = "human"
    pp.qc(a)
    assert calls[-1] == "human" and a.uns["qc"]["n_ribo_genes"] == int(flags["ribo"].sum())


def test_qc_with_gene_database(dlpfc_raw, mob_raw):
    """The real expkit.database: flags by uid (DLPFC) and by symbol (MOB, var_names are symbols)."""
    database = pytest.importorskip("expkit.database")
    try:
        hsa, mmu = database.genes("hsa"), database.genes("mmu")
    except Exception as err:  # database files not built here
        pytest.skip(f"gene database unavailable: {err}")
    a = dlpfc(dlpfc_raw)
    pp.qc(a, taxa="hsa")
    ribo = np.asarray(a.var_names.map(hsa["ribo"]).fillna(False), dtype=bool)
    assert a.uns["qc"]["n_ribo_genes"] == int(ribo.sum()) > 0
    x = a.layers["counts"]
    expect = 100 * np.asarray(x[:, ribo].sum(1, dtype=np.float64)).ravel() / np.asarray(x.sum(1)).ravel()
    np.testing.assert_allclose(a.obs["qc.pct_ribo"], expect, rtol=1e-12)
    x, obs, symbols = mob_raw
    m = D.to_anndata(x, obs, symbols, symbols)
    pp.qc(m, taxa="mmu")
    by_symbol = mmu.groupby("gene")["ribo"].any()
    assert m.uns["qc"]["n_ribo_genes"] == int(pd.Series(symbols).map(by_symbol).eq(True).sum()) > 50


def test_qc_without_flags_warns(dlpfc_raw, caplog):
    a = dlpfc(dlpfc_raw)
    logging.getLogger("expkit").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="expkit"):
            pp.qc(a)
    finally:
        logging.getLogger("expkit").propagate = False
    assert a.obs["qc.pct_mito"].isna().all() and "pct_mito is NaN" in caplog.text
    assert np.isfinite(a.obs["qc.n_counts"]).all()


def test_filter(dlpfc_raw, human_ann, caplog):
    a = dlpfc(dlpfc_raw, human_ann)
    pp.qc(a)
    before = a.copy()
    tot = a.obs["qc.n_counts"].to_numpy()
    lo, hi = np.quantile(tot, [0.05, 0.95])
    logging.getLogger("expkit").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="expkit"):
            out = pp.filter(a, min_counts=lo, max_counts=hi, min_genes=100, max_pct_ribo=5.0, min_cells=50)
    finally:
        logging.getLogger("expkit").propagate = False
    keep = (tot >= lo) & (tot <= hi) & (a.obs["qc.n_genes"] >= 100) & (a.obs["qc.pct_ribo"] <= 5.0)
    assert out.n_obs == int(keep.sum())
    n_cells = np.bincount(a.layers["counts"][keep.to_numpy()].indices, minlength=a.n_vars)
    assert out.n_vars == int((n_cells >= 50).sum()) < a.n_vars
    # the input is untouched; the result's qc columns are recomputed on what is left
    assert a.shape == before.shape and np.array_equal(a.obs["qc.n_counts"], before.obs["qc.n_counts"])
    np.testing.assert_allclose(out.obs["qc.n_counts"], np.asarray(out.layers["counts"].sum(1)).ravel())
    rem = out.uns["filter"]["removed"]
    assert rem["n_obs"] == a.n_obs - out.n_obs and rem["n_vars"] == a.n_vars - out.n_vars
    assert np.isclose(rem["counts_with_obs"] + rem["counts_with_vars"],
                      a.layers["counts"].sum() - out.layers["counts"].sum())
    assert "filter: removed" in caplog.text
    with pytest.raises(KeyError):
        pp.filter(dlpfc(dlpfc_raw), max_pct_mito=10)  # no flags, no taxa


# ---------------------------------------------------------------- log_normalize

@pytest.mark.parametrize("name", ["dlpfc_151673", "dlpfc_merged", "xenium_mouse_brain", "mob_rep11"])
def test_log_normalize_matches_scanpy(name, dlpfc_raw, merged_raw, xenium_raw, mob_raw):
    raw = {"dlpfc_151673": dlpfc_raw, "dlpfc_merged": merged_raw, "xenium_mouse_brain": xenium_raw,
           "mob_rep11": mob_raw}[name]
    r = ref(name)
    a = D.to_anndata(*raw)
    counts = a.layers["counts"].copy()
    out = pp.log_normalize(a)
    assert np.isclose(out["target_sum"], r["norm_target_sum"], rtol=0)
    ln = a.layers["lognorm"]
    assert sp.isspmatrix_csr(ln) and ln.dtype == np.float32 and a.layers["norm"].dtype == np.float32
    np.testing.assert_allclose(np.asarray(ln[r["norm_rows"], r["norm_cols"]]).ravel(), r["norm_lognorm"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ln[r["norm_sum_rows"]].sum(1, dtype=np.float64)).ravel(),
                               r["norm_rowsums"], rtol=1e-6)
    # norm rows sum to the target; counts untouched; X is the lognorm values
    tots = np.asarray(a.layers["norm"].sum(1, dtype=np.float64)).ravel()
    np.testing.assert_allclose(tots[tots > 0], r["norm_target_sum"], rtol=1e-5)
    assert (a.layers["counts"] != counts).nnz == 0
    assert (a.X != ln).nnz == 0 and a.X is not ln
    assert a.uns["lognorm"]["target_sum"] == out["target_sum"]


def test_log_normalize_options(xenium_raw):
    a = D.to_anndata(*xenium_raw)
    x0 = a.X.copy()
    pp.log_normalize(a, target_sum=1e4, key_norm=None, set_X=False)
    assert "norm" not in a.layers and (a.X != x0).nnz == 0
    row = a.layers["counts"][0].toarray().ravel()
    np.testing.assert_allclose(a.layers["lognorm"][0].toarray().ravel(),
                               np.log1p(row * 1e4 / row.sum()).astype(np.float32), rtol=1e-6)


# ---------------------------------------------------------------- loess and HVG

def test_loess_reference_properties(dlpfc_raw):
    from expkit.kernels.stats import mean_var

    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(-2, 2, 500))
    y = 1.0 - 0.5 * x + 0.25 * x**2
    for surface in ("interpolate", "direct"):  # local quadratics reproduce a quadratic exactly
        np.testing.assert_allclose(loess(x, y, surface=surface), y, atol=1e-9)
    m, v = mean_var(dlpfc_raw[0])
    keep = v > 0
    lx, ly = np.log10(m[keep]), np.log10(v[keep])
    direct, interp = loess(lx, ly, surface="direct"), loess(lx, ly)
    assert np.abs(direct - interp).max() < 0.02 and np.median(np.abs(direct - interp)) < 1e-3


@pytest.mark.parametrize("name,n_top", [("dlpfc_151673", 2000), ("xenium_mouse_brain", 100), ("mob_rep11", 2000)])
def test_hvg_matches_scanpy(name, n_top, dlpfc_raw, xenium_raw, mob_raw):
    raw = {"dlpfc_151673": dlpfc_raw, "xenium_mouse_brain": xenium_raw, "mob_rep11": mob_raw}[name]
    r = ref(name)
    a = D.to_anndata(*raw)
    top = pp.select_hvg(a, n_top_genes=n_top)
    hvg = a.var["vst.hvg"].to_numpy()
    assert hvg.sum() == n_top and len(top) == n_top
    assert jaccard(hvg, r["hvg_mask"]) >= 0.95
    np.testing.assert_allclose(a.var["vst.vars.norm"], r["hvg_vars_norm"], rtol=1e-5)
    np.testing.assert_array_equal(np.isnan(a.var["vst.hvg.rank"]), np.isnan(r["hvg_rank"]))
    for col, dtype in [("vst.means", np.float64), ("vst.vars", np.float64), ("vst.vars.norm", np.float64),
                       ("vst.hvg.rank", np.float32), ("vst.hvg", bool)]:
        assert a.var[col].dtype == dtype
    assert top["vst.hvg.rank"].is_monotonic_increasing
    assert a.uns["vst"]["params"]["flavor"] == "seurat_v3"


def test_hvg_batch_aware_matches_scanpy(merged_raw):
    r = ref("dlpfc_merged")
    a = D.to_anndata(*merged_raw)
    # default order (Seurat: number of batches, then median rank) = scanpy flavor "seurat_v3_paper"
    top = pp.select_hvg(a, n_top_genes=2000, batch_key="batch")
    hvg = a.var["vst.hvg"].to_numpy()
    np.testing.assert_array_equal(hvg, r["hvg_mask_paper"])
    assert jaccard(hvg, r["hvg_mask"]) >= 0.95
    assert top["vst.hvg.nbatches"].is_monotonic_decreasing
    # median rank first = scanpy flavor "seurat_v3"
    pp.select_hvg(a, n_top_genes=2000, batch_key="batch", batch_rank="median_rank", key_added="vst2")
    np.testing.assert_array_equal(a.var["vst2.hvg"].to_numpy(), r["hvg_mask"])
    np.testing.assert_array_equal(a.var["vst.hvg.nbatches"], r["hvg_nbatches"])
    x = merged_raw[0].toarray().astype(np.float64)  # pooled mean / variance over both batches
    np.testing.assert_allclose(a.var["vst.means"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(a.var["vst.vars"], x.var(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(a.var["vst.vars.norm"], r["hvg_vars_norm"], rtol=1e-5)
    # the median ranks agree up to the order within groups of genes with tied standardised variances
    # (identical count patterns), which neither implementation fixes
    diff = np.abs(a.var["vst.hvg.rank"].to_numpy() - r["hvg_rank"])
    both = ~np.isnan(diff)
    assert np.mean(diff[both] == 0) >= 0.75 and np.nanmax(diff) <= 10


# ---------------------------------------------------------------- scale + PCA

def principal_cosines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of u and v."""
    qu, _ = np.linalg.qr(u)
    qv, _ = np.linalg.qr(v)
    return np.linalg.svd(qu.T @ qv, compute_uv=False)


def check_pca(a, r, key="pca", n_check=10):
    mask = r["pca_mask"]
    vr = a.uns[key]["variance_ratio"]
    np.testing.assert_allclose(vr, r["pca_variance_ratio"], rtol=0.01)
    load = a.varm[key][mask][:, :n_check]
    refl = r["pca_loadings"][:, :n_check].astype(np.float64)
    cos = np.abs((load * refl).sum(0)) / np.linalg.norm(refl, axis=0)
    assert cos.min() > 0.99, cos
    assert principal_cosines(load, refl).min() > 0.99
    assert np.all(a.varm[key][~mask] == 0)
    return cos


@pytest.mark.parametrize("name", ["dlpfc_151673", "dlpfc_merged", "xenium_mouse_brain"])
def test_pca_matches_scanpy(name, dlpfc_raw, merged_raw, xenium_raw):
    raw = {"dlpfc_151673": dlpfc_raw, "dlpfc_merged": merged_raw, "xenium_mouse_brain": xenium_raw}[name]
    r = ref(name)
    a = D.to_anndata(*raw)
    pp.log_normalize(a)
    out = pp.scale_pca(a, n_comps=50, use_hvg=r["pca_mask"])  # scanpy's own genes: PCA alone compared
    check_pca(a, r)
    assert a.obsm["pca"].shape == (a.n_obs, 50) and a.obsm["pca"].dtype == np.float64
    assert a.varm["pca"].shape == (a.n_vars, 50)
    np.testing.assert_allclose(a.uns["pca"]["variance"], r["pca_variance"], rtol=0.01)
    assert out["solver"] == "full"
    # scores are the centred, scaled data projected on the loadings
    np.testing.assert_allclose(a.obsm["pca"].var(0, ddof=1), a.uns["pca"]["variance"], rtol=1e-8)


def test_pca_end_to_end_dlpfc(dlpfc_raw):
    """Our own HVGs feed our PCA; agreement with scanpy's full recipe."""
    r = ref("dlpfc_151673")
    a = D.to_anndata(*dlpfc_raw)
    pp.log_normalize(a)
    pp.select_hvg(a)
    pp.scale_pca(a)
    np.testing.assert_array_equal(a.var["vst.hvg"].to_numpy(), r["pca_mask"])
    check_pca(a, r)


def test_pca_solvers_agree_and_deterministic(xenium_raw):
    r = ref("xenium_mouse_brain")
    a = D.to_anndata(*xenium_raw)
    pp.log_normalize(a)
    for solver in ("arpack", "randomized"):
        pp.scale_pca(a, n_comps=10, use_hvg=None, svd_solver=solver, key_added=f"pca.{solver}", seed=3)
        assert a.uns[f"pca.{solver}"]["params"]["solver_used"] == solver
    r = {**r, "pca_variance_ratio": r["pca_variance_ratio"][:10]}
    check_pca(a, r, key="pca.arpack", n_check=10)
    check_pca(a, r, key="pca.randomized", n_check=5)
    # same seed, same result; sign convention: the largest loading of each component is positive
    pp.scale_pca(a, n_comps=10, use_hvg=None, svd_solver="randomized", key_added="again", seed=3)
    np.testing.assert_array_equal(a.obsm["again"], a.obsm["pca.randomized"])
    v = a.varm["pca.arpack"]
    assert np.all(v[np.abs(v).argmax(0), np.arange(v.shape[1])] > 0)


def test_scale_sparse_equals_dense(mob_raw):
    """Implicit centring/scaling/clipping equals the dense recipe (exact PCA of the dense matrix)."""
    x = mob_raw[0][:, :3000]
    x = sp.csr_matrix(np.log1p(x.toarray()))
    dense = x.toarray().astype(np.float64)
    mu, sd = dense.mean(0), dense.std(0, ddof=1)
    sd[sd == 0] = 1
    z = np.clip((dense - mu) / sd, -3, 3)
    d, c, _, _ = scale_sparse(x, max_value=3)
    np.testing.assert_allclose(d.toarray() + c, z, atol=1e-12)
    res = pca_kernel(d, 10, solver="full")
    zc = z - z.mean(0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    np.testing.assert_allclose(res["variance"], s[:10] ** 2 / (z.shape[0] - 1), rtol=1e-9)
    np.testing.assert_allclose(np.abs((res["components"] * vt[:10].T).sum(0)), 1, atol=1e-8)
    np.testing.assert_allclose(res["variance_ratio"], s[:10] ** 2 / (s**2).sum(), rtol=1e-9)


def test_pipeline_writes_h5ad(dlpfc_raw, human_ann, tmp_path):
    import anndata as ad

    a = dlpfc(dlpfc_raw, human_ann)
    pp.qc(a)
    a = pp.filter(a, min_counts=200, min_cells=10)
    pp.log_normalize(a)
    pp.select_hvg(a, n_top_genes=500)
    pp.scale_pca(a, n_comps=20)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(b.obsm["pca"], a.obsm["pca"])
    assert b.uns["pca"]["params"]["n_comps"] == 20 and b.uns["vst"]["params"]["n_top_genes"] == 500


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_cuda_matches_cpu(merged_raw):
    a = D.to_anndata(*merged_raw)
    b = a.copy()
    pp.log_normalize(a)
    pp.log_normalize(b)
    pp.select_hvg(a, batch_key="batch")
    pp.select_hvg(b, batch_key="batch", use_gpu=True)
    np.testing.assert_allclose(a.var["vst.vars.norm"], b.var["vst.vars.norm"], rtol=1e-9)
    np.testing.assert_array_equal(a.var["vst.hvg"], b.var["vst.hvg"])
    for solver in ("full", "arpack", "randomized"):
        pp.scale_pca(a, svd_solver=solver, key_added=solver)
        pp.scale_pca(b, svd_solver=solver, key_added=solver, use_gpu=True)
        np.testing.assert_allclose(a.uns[solver]["variance"], b.uns[solver]["variance"], rtol=1e-6)
        n = 10 if solver != "randomized" else 5
        np.testing.assert_allclose(a.obsm[solver][:, :n], b.obsm[solver][:, :n], rtol=1e-4, atol=1e-6)
