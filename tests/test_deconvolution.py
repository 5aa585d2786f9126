"""Deconvolution (RCTD mode, fast mode) on pseudo-spots built from real labelled cerebellum cells.

Data: tests/data/deconv (spacexr's Slide-seq cerebellum reference, 19 types x 25 cells, 384 genes; see
its README). 15 cells per type form the reference, the other 10 build pseudo-spots of known composition.
``rctd_py_full.csv`` holds rctd-py 0.4.0's full-mode weights on the same pseudo-spots
(tests/data/deconv/make_rctd_py.py).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from expkit.errors import InputError, KeyNotFoundError
from expkit.kernels import nnls as kn
from expkit.kernels import device as kdev
from expkit.kernels import rctd as kr
from expkit.kernels.device import single_thread
from expkit.kernels.nnls import nnls_graph, qp_nonneg
from expkit.spatial.deconvolution import deconvolve, simulate_spots, split_cells

DATA = Path(__file__).parent / "data" / "deconv"


def _pseudo(n_side=10, capture=0.25, seed=1, cells_per_spot=6.0):
    cells = ad.read_h5ad(DATA / "cerebellum_reference.h5ad")
    ref, pool = split_cells(cells, n_first=15, seed=0)
    spots = simulate_spots(pool, n_side=n_side, cells_per_spot=cells_per_spot, capture=capture, seed=seed)
    return ref, spots


@pytest.fixture(scope="module")
def data():
    return _pseudo()


@pytest.fixture(scope="module")
def rctd_full(data):
    ref, spots = data
    spots = spots.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = deconvolve(spots, reference=ref, min_cells_per_type=10, seed=0)
    return spots, res


def _rmse(a, b):
    return float(np.sqrt(np.nanmean((np.asarray(a) - np.asarray(b)) ** 2)))


# ------------------------------------------------------------------------------------------ kernels
def test_likelihood_table_matches_the_integral():
    """The FFT table against a brute-force sum of the Poisson-lognormal integral (step 1e-3)."""
    sigma = 0.35
    tab = kr.LikelihoodTable(sigma, torch.device("cpu"), kr.needed_rows(torch.tensor([0, 2, 17, 150])))
    e = torch.arange(-20000, 20001, dtype=torch.float64) * 1e-3
    logp = torch.log(kr.heavy_tail_density(e, sigma))
    worst = 0.0
    for k in (0, 2, 17, 150):
        lam = torch.tensor([1e-3, 0.4, 0.8 * max(k, 1), 1.1 * max(k, 1) + 0.3, 900.0], dtype=torch.float64)
        ls = -torch.exp(e)[:, None] * lam + k * e[:, None] + logp[:, None] - math.lgamma(k + 1) + k * torch.log(lam)
        ref = torch.log(torch.exp(ls).sum(0) * 1e-3)
        worst = max(worst, float((-tab.nll(torch.full((5,), k), lam) - ref).abs().max()))
    assert worst < 5e-4
    # derivatives: the Poisson-mixture identities against finite differences of the table
    y = torch.tensor([0, 2, 17, 150])
    lam = torch.tensor([0.3, 2.5, 14.0, 160.0], dtype=torch.float64)
    d1, d2 = tab.derivatives(y, lam)
    h = 1e-4
    f = lambda x: -tab.nll(y, x)  # noqa: E731
    fd1 = (f(lam * (1 + h)) - f(lam * (1 - h))) / (2 * h * lam)
    fd2 = (f(lam * (1 + h)) - 2 * f(lam) + f(lam * (1 - h))) / (h * lam) ** 2
    assert torch.allclose(d1, fd1, rtol=1e-3, atol=1e-6)
    assert torch.allclose(d2, fd2, rtol=1e-2, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        tab.nll(torch.tensor([5]), torch.tensor([1.0], dtype=torch.float64))


def _random_qps(n: int, k: int, ridge: float, seed: int):
    """``n`` positive definite problems of size ``k``: ``(D, b, generator)``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, k, generator=g, dtype=torch.float64)
    d = a @ a.transpose(1, 2) + ridge * torch.eye(k, dtype=torch.float64)
    return d, torch.randn(n, k, generator=g, dtype=torch.float64), g


def test_qp_nonneg_satisfies_kkt():
    d, b, _ = _random_qps(300, 9, 0.05, seed=0)
    x = qp_nonneg(d, b)
    grad = torch.einsum("bkl,bl->bk", d, x) - b
    assert float(x.min()) >= 0
    assert float(grad.min()) > -1e-9                                   # dual feasibility
    assert float((x * grad).abs().max()) < 1e-9                        # complementarity
    assert bool((x > 0).any()) and bool((x == 0).any())


def test_table_derivatives_match_the_interpolated_rows():
    """The derivative planes (cubic in powers of the grid offset) against RCTD's formula on the three
    Lagrange-interpolated rows k, k + 1, k + 2, at counts and means spread over the table."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 300, (2000,), generator=g).double()
    y[:5] = torch.tensor([0.0, 1.0, 999.0, 1000.0, 1500.0])             # K_MAX and a clipped count
    lam = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-9.5, 8.6, generator=g))
    tab = kr.LikelihoodTable(0.4, torch.device("cpu"), kr.needed_rows(y))
    k = y.clamp(0, kr.K_MAX).long()
    lam_c, pos, c = tab._coef(lam)
    v = tab._rows(k, pos, c, 3)
    r1, r2 = torch.exp(v[:, 1] - v[:, 0]), torch.exp(v[:, 2] - v[:, 0])
    kf = k.double()
    d1 = (kf - (kf + 1) * r1) / lam_c
    d2 = (kf * (kf - 1) - 2 * kf * (kf + 1) * r1 + (kf + 1) * (kf + 2) * r2) / lam_c ** 2 - d1 ** 2
    e1, e2 = tab.derivatives(y, lam)
    # the formulas subtract terms of size ~k^2 / lam^2: compare at the scale of those terms
    s1 = (kf + (kf + 1) * r1) / lam_c
    s2 = (kf * (kf + 1) + 2 * kf * (kf + 1) * r1 + (kf + 1) * (kf + 2) * r2) / lam_c ** 2 + d1 ** 2
    assert float(((e1 - d1).abs() / s1.clamp_min(1e-300)).max()) < 1e-9
    assert float(((e2 - d2).abs() / s2.clamp_min(1e-300)).max()) < 1e-9
    assert torch.allclose(tab.nll(y, lam), -v[:, 0], rtol=1e-12, atol=1e-9)


def test_qp_nonneg_warm_start_finds_the_same_solution():
    d, b, g = _random_qps(200, 12, 0.1, seed=2)
    x = qp_nonneg(d, b)
    for guess in (x > 0, torch.rand(200, 12, generator=g) < 0.5, torch.zeros(200, 12, dtype=torch.bool)):
        assert torch.allclose(qp_nonneg(d, b, free0=guess), x, atol=1e-10)


def test_fit_parts_side_by_side_equal_one_thread(data, monkeypatch):
    """RCTD fits run as two halves in two threads on the CPU: the same numbers as one after the other."""
    ref, spots = data
    y = torch.as_tensor(spots.layers["counts"][:, :150].toarray(), dtype=torch.float64)
    prof = torch.as_tensor(np.asarray(ref.layers["counts"][:19 * 15:15, :150].todense()), dtype=torch.float64)
    prof = (prof + 0.5) / (prof + 0.5).sum(1, keepdim=True)
    numi = y.sum(1)
    tab = kr.LikelihoodTable(0.5, torch.device("cpu"), kr.needed_rows(y))
    assert len(kdev.parts(len(y), 2048, torch.device("cpu"))) == 2
    out = {}
    for workers in (1, 2):
        monkeypatch.setattr(kdev, "MAX_WORKERS", workers)
        with single_thread(torch.device("cpu")):
            out[workers] = kr.fit_weights(prof, y, numi, tab)
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
    assert bool(out[1][1].all())


def test_sigma_search_matches_rctd_full_window(data, monkeypatch):
    """The few-table window search picks RCTD's sigma (the argmin over all of each epoch's window), and the
    rows-only score tables give RCTD's score (full table, all counts)."""
    ref, spots = data
    seen = {}
    original = kr.choose_sigma

    def record(prof_t, y, numi, **kw):
        seen.update(prof=prof_t, y=y, numi=numi, sigma=original(prof_t, y, numi, **kw))
        return seen["sigma"]

    monkeypatch.setattr(kr, "choose_sigma", record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = deconvolve(spots.copy(), reference=ref, min_cells_per_type=10, seed=0)
    assert res["sigma"] == seen["sigma"]
    prof, y, numi = seen["prof"], seen["y"], seen["numi"]
    cpu = torch.device("cpu")
    with single_thread(cpu):
        assert original(prof, y, numi, exhaustive=True) == seen["sigma"]
        w, _ = kr.fit_weights(prof, y, numi, kr.likelihood_table(0.5, cpu, kr.needed_rows(y)))
        pred = ((w @ prof) * numi[:, None]).clamp_min(1e-4)
        profile = kr._SigmaProfile(y)
        profile.set_means(pred)
        for sigma in (0.2, 0.5, 1.3):
            full = kr.LikelihoodTable(sigma, cpu)
            direct = min(float(full.nll(y, pred * m).sum()) for m in (0.8, 0.9, 1.0, 1.1, 1.2))
            assert profile(sigma) == pytest.approx(direct, rel=1e-12)


def test_window_argmin_equals_the_argmin_of_unimodal_profiles():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        v = (np.arange(n) - rng.uniform(-3, n + 3)) ** 2 * rng.uniform(0.1, 3)
        i0 = int(rng.integers(0, n))
        lo, hi = max(0, i0 - 8), min(n - 1, i0 + 8)
        calls = []
        best = kr._window_argmin(lambda i: (calls.append(i), v[i])[1], i0, lo, hi)
        assert best == lo + int(np.argmin(v[lo:hi + 1]))
        assert len(set(calls)) <= hi - lo + 1


def test_nnls_graph_penalty_smooths_and_converges():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 30, generator=g, dtype=torch.float64)
    w_true = torch.rand(200, 4, generator=g, dtype=torch.float64)
    b = w_true @ a + 0.05 * torch.randn(200, 30, generator=g, dtype=torch.float64)
    gram, cross = a @ a.T, b @ a.T
    w0, _ = nnls_graph(gram, cross, n_sweeps=500, tol=1e-10)
    x = qp_nonneg(gram.expand(200, 4, 4), cross)                        # exact NNLS, spot by spot
    assert torch.allclose(w0, x, atol=1e-6)
    i = torch.arange(199)
    adj = sp.coo_matrix((np.ones(398), (np.r_[i, i + 1], np.r_[i + 1, i])), shape=(200, 200)).tocsr()
    adj_t = torch.sparse_csr_tensor(torch.as_tensor(adj.indptr), torch.as_tensor(adj.indices),
                                    torch.as_tensor(adj.data, dtype=torch.float64), size=adj.shape)
    w1, _ = nnls_graph(gram, cross, adj_t, lam=5.0, n_sweeps=500, tol=1e-10)
    rough = lambda w: float((w[1:] - w[:-1]).pow(2).sum())  # noqa: E731
    assert rough(w1) < 0.5 * rough(w0) and float(w1.min()) >= 0


# ------------------------------------------------------------------------------------------ RCTD
def test_rctd_full_recovers_known_proportions(rctd_full, data):
    spots, res = rctd_full
    ref, _ = data
    est = spots.obsm["deconv"]
    assert list(est.columns) == sorted(ref.obs["cell_type"].astype(str).unique())
    assert np.allclose(est.sum(1), 1.0) and (est.to_numpy() >= 0).all()
    truth = spots.obsm["truth"][est.columns].to_numpy()
    assert _rmse(est, truth) < 0.08
    pearson = [np.corrcoef(est.iloc[:, k], truth[:, k])[0, 1] for k in range(est.shape[1])]
    assert np.nanmean(pearson) > 0.8
    dom = spots.obs["deconv.dominant"].astype(str).to_numpy()
    assert np.mean(dom == np.asarray(est.columns)[truth.argmax(1)]) > 0.7
    info = spots.uns["deconv"]
    assert info["params"]["method"] == "rctd" and 0.1 <= info["sigma"] <= 2.0
    assert res["gene_match"]["n_shared"] == 384 and res["n_fitted"] == spots.n_obs


def test_rctd_full_matches_rctd_py(rctd_full):
    """rctd-py's full-mode weights on the same pseudo-spots: within 0.01 RMSE (measured ~1e-4)."""
    spots, _ = rctd_full
    peer = pd.read_csv(DATA / "rctd_py_full.csv", index_col=0)
    ours = spots.obsm["deconv"].loc[peer.index, peer.columns]
    assert _rmse(ours, peer) < 0.01
    assert abs(spots.uns["deconv"]["sigma"] - float(open(DATA / "rctd_py_sigma.txt").read())) <= 0.02


def test_deconvolution_is_deterministic(data):
    ref, spots = data
    a, b = spots.copy(), spots.copy()
    deconvolve(a, reference=ref, min_cells_per_type=10, method="fast", seed=3)
    deconvolve(b, reference=ref, min_cells_per_type=10, method="fast", seed=3)
    assert np.array_equal(a.obsm["deconv"].to_numpy(), b.obsm["deconv"].to_numpy())


def test_doublet_and_multi_modes():
    ref, spots = _pseudo(n_side=6, cells_per_spot=1.5, seed=4, capture=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deconvolve(spots, reference=ref, min_cells_per_type=10, mode="doublet", key_added="dbl")
    cls = spots.obs["dbl.class"].astype(str)
    truth = spots.obsm["truth"][spots.obsm["dbl"].columns]
    single = (spots.obs["n_cells"] == 1).to_numpy()
    assert spots.obsm["dbl"].notna().all(axis=None)
    assert set(cls) <= {"reject", "singlet", "doublet_certain", "doublet_uncertain"}
    # one-cell spots: mostly called singlets, of the right type
    assert np.mean(cls[single] == "singlet") > 0.6
    first = spots.obs["dbl.first_type"].astype(str).to_numpy()
    true_type = np.asarray(truth.columns)[truth.to_numpy().argmax(1)]
    assert np.mean(first[single] == true_type[single]) > 0.8
    assert np.allclose(spots.obsm["dbl"].sum(1), 1.0)
    assert ((spots.obsm["dbl"].to_numpy() > 0).sum(1) <= 2).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deconvolve(spots, reference=ref, min_cells_per_type=10, mode="multi", key_added="mul")
    n_types = spots.obs["mul.n_types"].to_numpy()
    assert n_types.min() >= 1 and n_types.max() <= 4
    assert ((spots.obsm["mul"].to_numpy() > 0).sum(1) == n_types).all()
    assert _rmse(spots.obsm["mul"], truth) < 0.15


# ------------------------------------------------------------------------------------------ fast
def test_fast_mode_accuracy_and_penalty():
    ref, spots = _pseudo(n_side=20, capture=0.02, seed=2)          # ~300 counts per spot
    res = deconvolve(spots, reference=ref, min_cells_per_type=10, method="fast", key_added="f0")
    deconvolve(spots, reference=ref, min_cells_per_type=10, method="fast", spatial_weight=0.5, key_added="f1")
    truth = spots.obsm["truth"][spots.obsm["f0"].columns]
    assert np.allclose(spots.obsm["f0"].sum(1), 1.0) and np.allclose(spots.obsm["f1"].sum(1), 1.0)
    assert _rmse(spots.obsm["f0"], truth) < 0.1 and res["n_genes"] >= 10
    assert spots.uns["f0"]["spatial_lambda"] == 0 and spots.uns["f1"]["spatial_lambda"] > 0

    def rough(frame):                          # squared differences between grid neighbours (20 x 20)
        w = frame.to_numpy().reshape(20, 20, -1)
        return float(((w[1:] - w[:-1]) ** 2).sum() + ((w[:, 1:] - w[:, :-1]) ** 2).sum())

    assert rough(spots.obsm["f1"]) < 0.7 * rough(spots.obsm["f0"])


# ------------------------------------------------------------------------------------------ inputs
def test_gene_matching_through_the_database(data):
    ref, spots = data
    from expkit.database import lookup

    uids = lookup(list(spots.var_names), "mmu")
    hit = np.array([u is not None for u in uids])
    sub = spots[:30, hit].copy()
    sub.var_names = [str(u) for u in uids[hit]]
    res = deconvolve(sub, reference=ref, min_cells_per_type=10, method="fast", spatial_weight=0.0)
    assert res["gene_match"]["matched_by"].startswith("gene database")
    assert res["gene_match"]["n_shared"] == int(hit.sum()) > 300


def test_bad_inputs_raise_before_writing(data):
    ref, spots = data
    sub = spots[:20].copy()
    with pytest.raises(KeyNotFoundError, match="obs columns"):
        deconvolve(sub, reference=ref, label_key="celltype")
    few = ref[:, :12].copy()
    with pytest.raises(InputError, match=r"only 12 genes .*threshold 20"):
        deconvolve(sub, reference=few, min_cells_per_type=10)
    with pytest.warns(UserWarning, match=r"fewer than min_cells_per_type=25.*'Astrocytes' \(15\)"):
        with pytest.raises(InputError, match="only 0 cell types"):
            deconvolve(sub, reference=ref, min_cells_per_type=25)
    frac = sub.copy()
    frac.layers["counts"] = frac.layers["counts"] * 0.5
    with pytest.raises(InputError, match="non-integer"):
        deconvolve(frac, reference=ref, min_cells_per_type=10)
    with pytest.raises(InputError, match="mode"):
        deconvolve(sub, reference=ref, method="fast", mode="doublet")
    assert "deconv" not in sub.obsm and "deconv" not in sub.uns and "deconv" not in frac.obsm


def test_small_types_are_excluded_with_a_warning(data):
    ref, spots = data
    lab = ref.obs["cell_type"].astype(str)
    keep = (lab != "Golgi").to_numpy() | (np.cumsum((lab == "Golgi").to_numpy()) <= 5)
    small = ref[keep].copy()
    with pytest.warns(UserWarning, match=r"'Golgi' \(5\)"):
        res = deconvolve(spots[:30].copy(), reference=small, min_cells_per_type=10, method="fast")
    assert "Golgi" not in res["cell_types"] and len(res["cell_types"]) == 18


@pytest.mark.gpu
def test_rctd_full_on_cuda_matches_cpu(data):
    ref, spots = data
    sub = spots[:60].copy()
    a, b = sub.copy(), sub.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deconvolve(a, reference=ref, min_cells_per_type=10)
        deconvolve(b, reference=ref, min_cells_per_type=10, use_gpu=True)
    assert _rmse(a.obsm["deconv"], b.obsm["deconv"]) < 1e-6
