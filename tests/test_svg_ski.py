"""SKI (grid-interpolated) SE kernels of svg_spatialde against the dense kernel and the exact test, on the real
DLPFC 151673 coordinates and counts (see docs/svg.md, "SKI")."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from expkit.errors import InputError
from expkit.kernels import ski
from expkit.kernels import spatial_kernels as sk
from expkit.spatial import svg_spatialde
from expkit.spatial import svg as svg_mod

import _sde2_null as sn

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    """DLPFC 151673 (the SpatialDE2 protocol): 3,639 spots x 5,000 genes."""
    return sn.read_dlpfc151673(shared_data)


def test_ski_operator_matches_dense_kernel(dlpfc):
    _, xy, _ = dlpfc
    rng = np.random.default_rng(0)
    xy = xy[np.sort(rng.choice(xy.shape[0], 1500, replace=False))]
    n = xy.shape[0]
    X = torch.as_tensor(xy)
    D2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    Z = torch.as_tensor(rng.normal(size=(n, 4)))
    eye = torch.eye(n, dtype=torch.float64)[:, :150]
    ls = sk.default_lengthscales(xy)
    for l in ls:
        K = torch.exp(-D2 / (2 * l * l))
        op = ski.se_ski(xy, l, CPU, eps=1e-6)
        # largest entry error ~ eps (the grid is chosen for it)
        assert float((op.mm(eye) - K[:, :150]).abs().max()) < 2e-6
        KZ = K @ Z
        assert float((op.mm(Z) - KZ).abs().max()) < 2e-6 * float((K.abs() @ Z.abs()).max())
        np.testing.assert_allclose(op.quad(Z).numpy(), (Z * KZ).sum(0).numpy(), rtol=1e-4)
        np.testing.assert_allclose(op.quad(Z).numpy(), (Z * op.mm(Z)).sum(0).numpy(), rtol=1e-10)
        assert torch.equal(op.diag(), torch.ones(n, dtype=torch.float64))
        np.testing.assert_allclose(op.sq_rowsum().numpy(), (K * K).sum(1).numpy(), rtol=2e-6)
    # omnibus cross terms rowsum(A o B): SKI x SKI (SE with 1/l^2 = 1/la^2 + 1/lb^2), SKI x cosine (rank 2),
    # SKI x low rank, SKI x sparse and SKI x dense (exact SE at the stored entries)
    la, lb = ls[1], ls[2]
    A = ski.se_ski(xy, la, CPU)
    Ka, Kb = torch.exp(-D2 / (2 * la * la)), torch.exp(-D2 / (2 * lb * lb))
    u = 2 * np.pi * xy.sum(1) / ls[3]
    Kc = torch.as_tensor(np.cos(u[:, None] - u[None, :]))
    Ks = torch.exp(-D2 / (2 * ls[0] ** 2))
    Ks = torch.where(Ks >= 1e-12, Ks, torch.zeros_like(Ks))
    others = [(ski.se_ski(xy, lb, CPU), Kb), (sk.cosine_kernel(xy, ls[3], CPU), Kc),
              (sk.se_lowrank(xy, ls[4], 1e-10, CPU, max_rank=400), torch.exp(-D2 / (2 * ls[4] ** 2))),
              (sk.se_sparse(xy, ls[0], 1e-12, CPU), Ks), (sk.DenseKernel(Kb), Kb)]
    for op, Kb_ in others:
        ref = (Ka * Kb_).sum(1).numpy()
        for got in (sk.hadamard_rowsum(A, op), sk.hadamard_rowsum(op, A)):
            np.testing.assert_allclose(got.numpy(), ref, atol=2e-6 * np.abs(ref).max() + 1e-6)
    both = sk.SumKernel([A, sk.cosine_kernel(xy, ls[3], CPU)])
    Kt = Ka + Kc
    np.testing.assert_allclose(both.sq_rowsum().numpy(), (Kt * Kt).sum(1).numpy(), rtol=1e-5, atol=1e-5)


def _subset(dlpfc, n_spots, n_genes, seed=0):
    X, xy, genes = dlpfc
    rng = np.random.default_rng(seed)
    spots = np.sort(rng.choice(X.shape[0], n_spots, replace=False))
    sf = np.asarray(X[spots].sum(1)).ravel()
    cols = np.sort(rng.choice(X.shape[1], n_genes, replace=False))
    a = ad.AnnData(sp.csr_matrix(X[spots][:, cols], dtype=np.float32), var=pd.DataFrame(index=genes[cols]))
    a.obsm["spatial"] = xy[spots]
    a.obs["sf"] = sf
    return a


@pytest.mark.parametrize("omnibus", [False, True])
def test_ski_score_statistics_close_to_exact(dlpfc, omnibus):
    a = _subset(dlpfc, 1200, 120)
    ex, sk_ = a.copy(), a.copy()
    kw = dict(sizefactors="sf", progress=False, use_cache=False, omnibus=omnibus)
    svg_spatialde(ex, method="exact", **kw)
    svg_spatialde(sk_, method="ski", **kw)
    reps = sk_.uns["spatialde"]["representation"]
    assert all(v["kind"] == "ski" and "grid" in v for k, v in reps.items() if k.startswith("SE"))
    for q, tol in (("U", 1e-4), ("e", 1e-6), ("I", 1e-5)):
        e_, s_ = ex.varm[f"spatialde.{q}"].to_numpy(), sk_.varm[f"spatialde.{q}"].to_numpy()
        ok = np.isfinite(e_)
        rel = np.abs(s_[ok] - e_[ok]) / np.abs(e_[ok])
        assert rel.max() < tol and np.median(rel) < 1e-5, (q, rel.max(), np.median(rel))
    le, ls_ = ex.var["spatialde.log10p"].to_numpy(), sk_.var["spatialde.log10p"].to_numpy()
    ok = np.isfinite(le)
    assert np.max(np.abs(ls_[ok] - le[ok]) / np.maximum(np.abs(le[ok]), 1.0)) < 1e-4
    assert np.array_equal(ex.var["spatialde.padj"] < 0.05, sk_.var["spatialde.padj"] < 0.05)


def test_approx_plan_uses_ski_for_middle_lengthscale_at_100k_spots():
    """The default kernel space on a 100,489-spot grid is planned without error (no allocation): the 2nd SE
    lengthscale (~8 spacings, neither sparse nor low rank) goes to SKI, the shortest stays sparse."""
    u = np.arange(317, dtype=np.float64)
    xy = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    ls = sk.default_lengthscales(xy)
    plans = [svg_mod._plan_kernel("SE", l, xy, xy.shape[0], "approx", 1e-6, 1e-8, 4 * 1024 ** 3) for l in ls]
    assert plans[0]["rep"] == "sparse" and plans[1]["rep"] == "ski"
    assert all(p["bytes"] < 1024 ** 3 for p in plans[1:])


def test_ski_needs_2d_coordinates(dlpfc):
    a = _subset(dlpfc, 200, 5)
    a.obsm["spatial"] = np.c_[a.obsm["spatial"], np.zeros(a.n_obs)]
    with pytest.raises(InputError):
        svg_spatialde(a, method="ski", sizefactors="sf", progress=False, use_cache=False)
