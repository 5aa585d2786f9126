"""svg_spatialde against SpatialDE2's own results on the shared real data (see ../shared/reference/README.md).

Per-kernel U, e, I are compared to relative 1e-4. SpatialDE2 fits each gene's null by BFGS from a fixed
start, which for genes whose moments estimate of the dispersion is <= 1e-8 stays at the Poisson limit (our
Newton fit reaches a higher likelihood there, see docs/svg.md); e depends on the null fit alone
(W = m / (1 + a m)), so genes whose ten e values agree are the genes with the same null fit, and on those
U and I must agree too. SpatialDE2's null itself, recovered from its printed e and U (tests/_sde2_null.py,
tests/data/sde2_ref/), gives its U, e, I on every gene.
"""
from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from expkit.errors import InputError, ResourceError
from expkit.kernels import pvalues as pv
from expkit.kernels import score_test as st
from expkit.kernels import spatial_kernels as sk
from expkit.spatial import svg_spatialde
from expkit.spatial.svg import clear_cache

import _sde2_null as sn

torch.set_num_threads(1)

MOB_GRID = [1.608, 3.0741, 5.8767, 11.235, 21.477]


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.abs(b)


# ----------------------------------------------------------------------------------------------
# data (protocols of ../shared/reference/README.md)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mob(shared_data):
    adata = sn.read_mob(shared_data)
    del adata.obs["sf"]  # SpatialDE2's default size factors: the totals (of the counts layer)
    adata.layers["counts"] = adata.X.copy()
    assert adata.shape == (260, 14243)
    return adata


@pytest.fixture(scope="module")
def mob_cauchy(mob):
    clear_cache()
    a = mob.copy()
    svg_spatialde(a, method="exact", progress=False)
    return a


@pytest.fixture(scope="module")
def mob_omnibus(mob, mob_cauchy):
    a = mob.copy()
    svg_spatialde(a, method="exact", omnibus=True, progress=False)  # null fit from the cache
    return a


@pytest.fixture(scope="module")
def dlpfc300(shared_data):
    adata = sn.read_dlpfc300(shared_data)  # size factors over all 5,000 genes in obs["sf"]
    svg_spatialde(adata, sizefactors="sf", method="exact", progress=False, use_cache=False)
    return adata


def _perkernel_checks(adata, ref, key="spatialde", min_same=0.75):
    """Check U, e, I against SpatialDE2; returns the mask of genes with the same null fit.

    Same null fit: all ten e agree to 1e-5 (e depends on the null fit alone). On those, I agrees to 1e-4
    everywhere and U too for over-dispersed genes; at the Poisson limit (dispersion at its 1e-8 floor) U is
    very sensitive to the intercept, which SpatialDE2's BFGS leaves slightly off: 97% there.
    """
    names = list(adata.varm[f"{key}.e"].columns)
    rel = {q: np.stack([_rel(adata.varm[f"{key}.{q}"][k], ref[f"{q}_tilde:{k}"]) for k in names], 1)
           for q in "UeI"}
    same = (rel["e"] < 1e-5).all(1)
    assert same.mean() >= min_same, same.mean()
    for q in "UeI":
        assert np.median(rel[q]) < 1e-5, q
    assert rel["I"][same].max() < 1e-4, rel["I"][same].max()
    disp = adata.varm[f"{key}.null"]["dispersion"].to_numpy()
    over = same & (disp > 1e-6)
    assert rel["U"][over].max() < 1e-4, rel["U"][over].max()
    if (same & ~over).any():
        assert (rel["U"][same & ~over].max(1) < 1e-4).mean() >= 0.97
    return same


# ----------------------------------------------------------------------------------------------
# mouse olfactory bulb
# ----------------------------------------------------------------------------------------------
def test_default_lengthscales_match_spatialde2(mob):
    ls = sk.default_lengthscales(mob.obsm["spatial"])
    np.testing.assert_allclose(ls, MOB_GRID, rtol=1e-4)


def test_mob_perkernel_statistics(mob_cauchy, shared_reference):
    ref = pd.read_csv(shared_reference / "sde2_mob_cauchy_perkernel.tsv.gz", sep="\t", index_col=0)
    ref = ref.loc[mob_cauchy.var_names]
    assert list(mob_cauchy.varm["spatialde.U"].columns) == [c.split(":")[1] for c in ref.columns[:10]]
    _perkernel_checks(mob_cauchy, ref)


def test_mob_cauchy_pvalues(mob_cauchy, shared_reference):
    ref = pd.read_csv(shared_reference / "sde2_mob_cauchy.tsv.gz", sep="\t", index_col=0).loc[mob_cauchy.var_names]
    ours = -mob_cauchy.var["spatialde.log10p"].to_numpy()
    with np.errstate(divide="ignore"):
        theirs = -np.log10(ref["pval"].to_numpy())
    fin = np.isfinite(theirs)
    assert stats.spearmanr(ours[fin], theirs[fin]).correlation >= 0.99
    # where SpatialDE2's p underflows to 0 we keep a finite, tiny log p
    assert np.all(np.isfinite(ours)) and np.all(ours[~fin] > 15)
    a = set(mob_cauchy.var_names[mob_cauchy.var["spatialde.padj"] < 0.05])
    b = set(ref.index[ref["padj"] < 0.05])
    assert len(a & b) / len(a | b) >= 0.9
    svg = mob_cauchy.var["spatialde.svg"]
    assert svg.sum() == min(500, len(a))
    assert mob_cauchy.var.loc[svg, "spatialde.rank"].max() <= 500


def test_mob_omnibus(mob_omnibus, shared_reference):
    ref = pd.read_csv(shared_reference / "sde2_mob_omnibus.tsv.gz", sep="\t", index_col=0).loc[mob_omnibus.var_names]
    e_rel = _rel(mob_omnibus.varm["spatialde.e"]["omnibus"], ref["e_tilde"])
    same = e_rel < 1e-5
    assert same.mean() >= 0.75
    over = same & (mob_omnibus.varm["spatialde.null"]["dispersion"].to_numpy() > 1e-6)
    assert _rel(mob_omnibus.varm["spatialde.I"]["omnibus"], ref["I_tilde"])[same].max() < 1e-4
    assert _rel(mob_omnibus.varm["spatialde.U"]["omnibus"], ref["U_tilde"])[over].max() < 1e-4
    ours = -mob_omnibus.var["spatialde.log10p"].to_numpy()
    with np.errstate(divide="ignore"):
        theirs = -np.log10(ref["pval"].to_numpy())
    fin = np.isfinite(theirs)
    assert stats.spearmanr(ours[fin], theirs[fin]).correlation >= 0.99
    a = set(mob_omnibus.var_names[mob_omnibus.var["spatialde.padj"] < 0.05])
    b = set(ref.index[ref["padj"] < 0.05])
    assert len(a & b) / len(a | b) >= 0.9
    assert mob_omnibus.uns["spatialde"]["cache"]["null"]  # the null fit came from the cache


def test_mob_approx_close_to_exact(mob, mob_cauchy):
    a = mob[:, :2000].copy()
    sf = np.asarray(mob.X.sum(1)).ravel()  # the exact run's size factors (all genes)
    svg_spatialde(a, method="approx", sizefactors=sf, progress=False, use_cache=False)
    ex = mob_cauchy.var["spatialde.log10p"].to_numpy()[:2000]
    ap = a.var["spatialde.log10p"].to_numpy()
    assert np.nanmax(np.abs(ap - ex) / np.maximum(np.abs(ex), 1.0)) < 1e-3
    kinds = {v["kind"] for v in a.uns["spatialde"]["representation"].values()}
    assert kinds <= {"sparse", "lowrank", "dense"} and "lowrank" in kinds


# ----------------------------------------------------------------------------------------------
# DLPFC 151673, 300-gene subset
# ----------------------------------------------------------------------------------------------
def test_dlpfc_subset(dlpfc300, shared_reference):
    ref = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300_perkernel.tsv.gz", sep="\t", index_col=0)
    ref = ref.loc[dlpfc300.var_names]
    same = _perkernel_checks(dlpfc300, ref, min_same=0.65)
    res = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300.tsv.gz", sep="\t", index_col=0)
    res = res.loc[dlpfc300.var_names]
    ours = -dlpfc300.var["spatialde.log10p"].to_numpy()
    with np.errstate(divide="ignore"):
        theirs = -np.log10(res["pval"].to_numpy())
    fin = np.isfinite(theirs)
    # on the genes with the same null fit (1.000); over all genes 0.925, see docs/svg.md
    assert stats.spearmanr(ours[fin & same], theirs[fin & same]).correlation >= 0.99
    assert stats.spearmanr(ours[fin], theirs[fin]).correlation >= 0.9
    a = set(dlpfc300.var_names[dlpfc300.var["spatialde.padj"] < 0.05])
    b = set(res.index[res["padj"] < 0.05])
    assert len(a & b) / len(a | b) >= 0.9
    assert np.all(ours[~fin] > 15)


# ----------------------------------------------------------------------------------------------
# with SpatialDE2's own null fit (recovered from its printed e and U: tests/_sde2_null.py,
# tests/reference/make_sde2_null.py -> tests/data/sde2_ref/)
# ----------------------------------------------------------------------------------------------
SDE2_NULL = Path(__file__).resolve().parent / "data" / "sde2_ref"
HARD_GENES = ["Ube2z", "Grik2", "Dcaf15", "Cox6c", "Fmnl3", "Tbc1d1", "5031410I06Rik"]


def _sde2_null(name, var_names):
    return pd.read_csv(SDE2_NULL / f"sde2_null_{name}.tsv.gz", sep="\t", index_col=0).loc[var_names]


def _with_sf(adata):
    a = adata.copy()
    if "sf" not in a.obs:
        a.obs["sf"] = np.asarray(a.X.sum(1), dtype=np.float64).ravel()
    return a


def _grid(adata):
    """SpatialDE2's lengthscale grid (unrounded)."""
    return list(sk.default_lengthscales(adata.obsm["spatial"]))


def _check_with_sde2_null(scored, perk, res, cols, ref_cols):
    """U, e, I per kernel to 1e-4 on every gene, p-values and the significant set as SpatialDE2's."""
    for q in "UeI":
        ours = scored.varm[f"spatialde.{q}"][cols].to_numpy()
        ref = perk[[c.format(q=q) for c in ref_cols]].to_numpy()
        rel = _rel(ours, ref)
        assert rel.max() < 1e-4 and np.median(rel) < 2e-6, (q, rel.max())
        if q in "Ue":  # the recovered null reproduces the printed (6-digit) values to their rounding
            assert (np.abs(ours - ref) / sn.rounding_halfwidth(ref)).max() < 5.0, q
    _check_p_as_sde2(scored, res, min_spearman=0.9999)


def _check_p_as_sde2(scored, res, min_spearman):
    """Spearman of -log10 p over genes with a finite SpatialDE2 p (where its p underflows to 0, ours is
    finite and tiny), and Jaccard >= 0.99 of the genes with padj < 0.05."""
    ours = -scored.var["spatialde.log10p"].to_numpy()
    with np.errstate(divide="ignore"):
        theirs = -np.log10(res["pval"].to_numpy())
    fin = np.isfinite(theirs)
    assert stats.spearmanr(ours[fin], theirs[fin]).correlation >= min_spearman
    assert np.all(ours[~fin] > 15)
    a = set(scored.var_names[scored.var["spatialde.padj"] < 0.05])
    b = set(res.index[res["padj"] < 0.05])
    assert len(a & b) / len(a | b) >= 0.99


def test_mob_with_sde2_null(mob, shared_reference):
    """Scored with SpatialDE2's null, all 14,243 genes agree to < 1e-4 (max ~8e-6) on U, e and I of all ten
    kernels (I was not used in the recovery), Spearman 1.0000, the same 627 genes padj < 0.05."""
    null = _sde2_null("mob", mob.var_names)
    scored = sn.score_with_null(_with_sf(mob), null["log_mean"].to_numpy(), null["dispersion"].to_numpy())
    perk = pd.read_csv(shared_reference / "sde2_mob_cauchy_perkernel.tsv.gz", sep="\t", index_col=0).loc[mob.var_names]
    res = pd.read_csv(shared_reference / "sde2_mob_cauchy.tsv.gz", sep="\t", index_col=0).loc[mob.var_names]
    names = list(scored.varm["spatialde.U"].columns)
    _check_with_sde2_null(scored, perk, res, names, [f"{{q}}_tilde:{k}" for k in names])


def test_mob_omnibus_with_sde2_null(mob, shared_reference):
    """The omnibus results were not used in the recovery at all: an independent check of it."""
    null = _sde2_null("mob", mob.var_names)
    scored = sn.score_with_null(_with_sf(mob), null["log_mean"].to_numpy(), null["dispersion"].to_numpy(),
                                omnibus=True)
    ref = pd.read_csv(shared_reference / "sde2_mob_omnibus.tsv.gz", sep="\t", index_col=0).loc[mob.var_names]
    _check_with_sde2_null(scored, ref, ref, ["omnibus"], ["{q}_tilde"])


def test_dlpfc_with_sde2_null(dlpfc300, shared_reference):
    null = _sde2_null("dlpfc151673_n300", dlpfc300.var_names)
    scored = sn.score_with_null(dlpfc300, null["log_mean"].to_numpy(), null["dispersion"].to_numpy())
    perk = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300_perkernel.tsv.gz", sep="\t",
                       index_col=0).loc[dlpfc300.var_names]
    res = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300.tsv.gz", sep="\t",
                      index_col=0).loc[dlpfc300.var_names]
    names = list(scored.varm["spatialde.U"].columns)
    _check_with_sde2_null(scored, perk, res, names, [f"{{q}}_tilde:{k}" for k in names])


def test_sde2_null_recovery(mob, shared_reference):
    """The recovery itself (on 150 bulb genes and the hardest ones): from the ten e alone it reproduces
    them to their rounding; refined on e and U, it gives the stored null."""
    sel = np.unique(np.r_[np.linspace(0, mob.n_vars - 1, 150).round().astype(int),
                          [mob.var_names.get_loc(g) for g in HARD_GENES]])
    a = _with_sf(mob)[:, sel].copy()
    a.obs["sf"] = np.asarray(mob.X.sum(1)).ravel()
    perk = pd.read_csv(shared_reference / "sde2_mob_cauchy_perkernel.tsv.gz", sep="\t", index_col=0)
    got = sn.recover(a, perk, {"SE": _grid(mob), "PER": _grid(mob)})
    assert got["ratio_e"].max() < 2.0 and got["ratio"].max() < 5.0
    stored = _sde2_null("mob", a.var_names)
    # 5e-6: one hard gene of 157 lands 2.2e-6 away (relative 2e-7) with the releases installed on 2026-12-03
    # (numpy 2.4.6, scipy 1.17.1; the same code was within 1e-6 before): the optimum is that flat; the rest agree to 1e-6
    np.testing.assert_allclose(got["log_mean"], stored["log_mean"], rtol=0, atol=5e-6)
    assert np.mean(np.abs(got["log_mean"] - stored["log_mean"].to_numpy()) <= 1e-6) > 0.99
    # (a is determined only where a * max(m) is not far below the rounding of e and U)
    m = np.exp(stored["log_mean"].to_numpy()) * a.obs["sf"].max()
    big = stored["dispersion"].to_numpy() * m > 1e-3
    np.testing.assert_allclose(got["dispersion"][big], stored["dispersion"][big], rtol=1e-3)


def test_null_fit_not_worse_than_sde2(mob_cauchy, dlpfc300):
    """Our NB null log-likelihood is at least SpatialDE2's (its BFGS from a fixed start stops early for
    some genes) on every gene, to rounding; SpatialDE2's dispersion below our bound 1e-8 is counted at it
    (the e do not determine it there; the likelihood changes by < 1.2e-6)."""
    for adata, name, sf, n_better in ((mob_cauchy, "mob", None, 1000), (dlpfc300, "dlpfc151673_n300", "sf", 50)):
        s = np.asarray(adata.X.sum(1)).ravel() if sf is None else adata.obs[sf].to_numpy()
        ours = adata.varm["spatialde.null"]
        nll_o = sn.nb_nll(adata.X, s, ours["log_mean"].to_numpy(), ours["dispersion"].to_numpy())
        null = _sde2_null(name, adata.var_names)
        nll_t = sn.nb_nll(adata.X, s, null["log_mean"].to_numpy(), np.maximum(null["dispersion"].to_numpy(), 1e-8))
        d = nll_t - nll_o
        assert np.all(d > -1e-11 * np.abs(nll_o)), (name, (d / np.abs(nll_o)).min())
        assert (d > 0.1).sum() >= n_better, (name, (d > 0.1).sum())


def test_null_fit_beats_profile_grid(dlpfc300):
    """Independent optimality check of our null fit: no dispersion on a grid (1e-8 .. 1e3, half-decade
    steps, b profiled out) has a lower negative log-likelihood."""
    s = dlpfc300.obs["sf"].to_numpy()
    ours = dlpfc300.varm["spatialde.null"]
    nll_o = sn.nb_nll(dlpfc300.X, s, ours["log_mean"].to_numpy(), ours["dispersion"].to_numpy())
    prof = sn.profile_nll(dlpfc300.X, s, np.log(10.0) * np.arange(-8.0, 3.01, 0.5))
    assert np.all(nll_o - prof.min(1) < 1e-11 * np.abs(nll_o))


# ----------------------------------------------------------------------------------------------
# null_fit="spatialde2": SpatialDE2's null fits (its BFGS stays at a = 1e-8 where the moments
# dispersion is <= 1e-8), to reproduce its published numbers; the default stays the maximum likelihood
# ----------------------------------------------------------------------------------------------
def _moments_dispersion(X, s):
    """SpatialDE2's start value of the dispersion, written out: ``(var(y/s) - mean(1/s) mean(y/s)) /
    mean(y/s)^2`` with the population variance."""
    Y = np.asarray(sp.csc_matrix(X, dtype=np.float64).toarray()) / s[:, None]
    mean = Y.mean(0)
    return (Y.var(0) - (1.0 / s).mean() * mean) / mean ** 2


@pytest.fixture(scope="module")
def mob_sde2(mob, mob_cauchy):
    a = mob.copy()
    svg_spatialde(a, method="exact", progress=False, null_fit="spatialde2")  # kernels from the cache
    return a


@pytest.fixture(scope="module")
def dlpfc300_sde2(dlpfc300):
    a = dlpfc300.copy()
    svg_spatialde(a, sizefactors="sf", method="exact", progress=False, use_cache=False, null_fit="spatialde2")
    return a


def _within_1e4(scored, perk, cols, ref_cols):
    """Per gene: all per-kernel U, e and I within 1e-4 (relative) of SpatialDE2's."""
    ok = np.ones(scored.n_vars, dtype=bool)
    for q in "UeI":
        ours = scored.varm[f"spatialde.{q}"][cols].to_numpy()
        ref = perk[[c.format(q=q) for c in ref_cols]].to_numpy()
        ok &= (_rel(ours, ref) < 1e-4).all(1)
    return ok


def _check_sde2_mode(scored, perk, res, cols, ref_cols, min_within):
    """Spearman of -log10 p and Jaccard of padj < 0.05 as SpatialDE2's; the fraction of genes with all
    U, e, I within 1e-4 (the rest: SpatialDE2's BFGS stops ~1e-4 short in b on genes held at a = 1e-8,
    to which U is sensitive). Returns the per-gene mask."""
    ok = _within_1e4(scored, perk, cols, ref_cols)
    assert ok.mean() >= min_within, ok.mean()
    _check_p_as_sde2(scored, res, min_spearman=0.999)
    return ok


def _check_sde2_null(scored, default, s, name):
    """The pinned genes (moments dispersion <= 1e-8) are held at a = 1e-8 with b fitted; every other gene
    has the default (maximum-likelihood) fit; both fits' likelihoods are SpatialDE2's to its tolerance,
    and the default's is at least as high everywhere."""
    assert scored.uns["spatialde"]["params"]["null_fit"] == "spatialde2"
    assert default.uns["spatialde"]["params"]["null_fit"] == "mle"
    pin = _moments_dispersion(scored.X, s) <= 1e-8
    ours, mle = scored.varm["spatialde.null"].to_numpy(), default.varm["spatialde.null"].to_numpy()
    np.testing.assert_allclose(ours[pin, 1], 1e-8, rtol=1e-12)
    np.testing.assert_allclose(ours[~pin], mle[~pin], rtol=1e-12)
    # SpatialDE2's recovered null: the genes it left at the Poisson limit although the likelihood optimum
    # is far from it (recovered a < 1e-4, ours > 1e-2) are exactly the pinned genes with such an optimum
    null = _sde2_null(name, scored.var_names)
    stuck = (null["dispersion"].to_numpy() < 1e-4) & (mle[:, 1] > 1e-2)
    assert stuck.sum() > 0 and np.array_equal(stuck, pin & (mle[:, 1] > 1e-2))
    nll_c = sn.nb_nll(scored.X, s, ours[:, 0], ours[:, 1])
    nll_m = sn.nb_nll(scored.X, s, mle[:, 0], mle[:, 1])
    nll_t = sn.nb_nll(scored.X, s, null["log_mean"].to_numpy(), np.maximum(null["dispersion"].to_numpy(), 1e-8))
    assert np.abs(nll_c - nll_t).max() < 1e-3
    assert np.all(nll_m - nll_c < 1e-11 * np.abs(nll_c))
    worse = nll_c - nll_m > 1e-3  # (the compat fit is worse only on pinned genes; SpatialDE2's on the same)
    assert np.all(pin[worse]) and np.array_equal(worse, nll_t - nll_m > 1e-3), (worse.sum(), (nll_t - nll_m > 1e-3).sum())
    return pin


def test_mob_null_fit_spatialde2(mob_sde2, mob_cauchy, shared_reference):
    """Bulb, Cauchy: Spearman 1.0000, the same 627 genes; all 30 U, e, I within 1e-4 on 89.4 % of the genes
    (99.5 % of those not held at a = 1e-8)."""
    assert not mob_sde2.uns["spatialde"]["cache"]["null"]  # not the default's cached fit
    pin = _check_sde2_null(mob_sde2, mob_cauchy, np.asarray(mob_sde2.X.sum(1)).ravel(), "mob")
    perk = pd.read_csv(shared_reference / "sde2_mob_cauchy_perkernel.tsv.gz", sep="\t", index_col=0)
    res = pd.read_csv(shared_reference / "sde2_mob_cauchy.tsv.gz", sep="\t", index_col=0)
    names = list(mob_sde2.varm["spatialde.U"].columns)
    ok = _check_sde2_mode(mob_sde2, perk.loc[mob_sde2.var_names], res.loc[mob_sde2.var_names], names,
                          [f"{{q}}_tilde:{k}" for k in names], 0.88)
    assert ok[~pin].mean() >= 0.99


def test_mob_omnibus_null_fit_spatialde2(mob, mob_sde2, shared_reference):
    a = mob.copy()
    svg_spatialde(a, method="exact", omnibus=True, progress=False, null_fit="spatialde2")
    assert a.uns["spatialde"]["cache"]["null"]  # the spatialde2-mode fit, from the cache
    np.testing.assert_array_equal(a.varm["spatialde.null"].to_numpy(), mob_sde2.varm["spatialde.null"].to_numpy())
    ref = pd.read_csv(shared_reference / "sde2_mob_omnibus.tsv.gz", sep="\t", index_col=0).loc[a.var_names]
    _check_sde2_mode(a, ref, ref, ["omnibus"], ["{q}_tilde"], 0.92)


def test_dlpfc_null_fit_spatialde2(dlpfc300_sde2, dlpfc300, shared_reference):
    """DLPFC 300 genes: Spearman 0.9999 (0.925 with the default fit), the same 152 genes; all 30 U, e, I
    within 1e-4 on 90 % of the genes (all of those not held at a = 1e-8)."""
    pin = _check_sde2_null(dlpfc300_sde2, dlpfc300, dlpfc300.obs["sf"].to_numpy(), "dlpfc151673_n300")
    assert pin.sum() == 92
    perk = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300_perkernel.tsv.gz", sep="\t", index_col=0)
    res = pd.read_csv(shared_reference / "sde2_dlpfc151673_cauchy_n300.tsv.gz", sep="\t", index_col=0)
    names = list(dlpfc300_sde2.varm["spatialde.U"].columns)
    ok = _check_sde2_mode(dlpfc300_sde2, perk.loc[dlpfc300.var_names], res.loc[dlpfc300.var_names], names,
                          [f"{{q}}_tilde:{k}" for k in names], 0.88)
    assert ok[~pin].all()


def test_null_fit_argument(small):
    with pytest.raises(InputError):
        svg_spatialde(small.copy(), null_fit="bfgs", progress=False)


# ----------------------------------------------------------------------------------------------
# behaviour
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(mob):
    return mob[:, :300].copy()


def test_zero_count_genes_are_nan(small):
    a = small.copy()
    zero = ad.AnnData(sp.csr_matrix((a.n_obs, 2), dtype=np.float32), obs=a.obs,
                      var=pd.DataFrame(index=["zeroA", "zeroB"]))
    zero.layers["counts"] = zero.X.copy()
    b = ad.concat([a, zero], axis=1, merge="same")
    b.obsm["spatial"] = a.obsm["spatial"]
    svg_spatialde(a, progress=False)
    svg_spatialde(b, progress=False)
    for col in ("pval", "padj", "log10p", "rank"):
        assert b.var.loc[["zeroA", "zeroB"], f"spatialde.{col}"].isna().all()
    assert not b.var.loc[["zeroA", "zeroB"], "spatialde.svg"].any()
    # excluded from the correction: the other genes' adjusted p-values do not change
    np.testing.assert_allclose(b.var["spatialde.padj"].to_numpy()[:300], a.var["spatialde.padj"].to_numpy(),
                               rtol=1e-10)
    assert b.uns["spatialde"]["n_genes_tested"] == 300


def test_cache_hit(small):
    clear_cache()
    a = small.copy()
    svg_spatialde(a, progress=False)
    first = a.var["spatialde.log10p"].to_numpy().copy()
    assert a.uns["spatialde"]["cache"] == {"kernels": 0, "null": False}
    svg_spatialde(a, progress=False)
    assert a.uns["spatialde"]["cache"] == {"kernels": 10, "null": True}
    np.testing.assert_array_equal(a.var["spatialde.log10p"].to_numpy(), first)
    svg_spatialde(a, progress=False, use_cache=False)
    assert a.uns["spatialde"]["cache"] == {"kernels": 0, "null": False}
    assert "cache" not in str(list(a.uns["spatialde"]["params"]))  # nothing big stored in uns


def test_custom_kernel_space_and_sizefactors(small):
    a = small.copy()
    sf = np.asarray(a.X.sum(1)).ravel()
    res = svg_spatialde(a, kernel_space={"SE": 3.0, "PER": [5.0, 10.0]}, sizefactors=sf * 7.0, progress=False)
    assert a.uns["spatialde"]["kernels"] == ["SE_l3", "PER_l5", "PER_l10"]
    b = small.copy()
    svg_spatialde(b, kernel_space={"SE": 3.0, "PER": [5.0, 10.0]}, progress=False)
    # size factors only matter up to a constant (the intercept absorbs it)
    same = np.isclose(a.varm["spatialde.null"]["dispersion"], b.varm["spatialde.null"]["dispersion"], rtol=1e-4)
    assert same.mean() > 0.95
    np.testing.assert_allclose(res["spatialde.log10p"][same], b.var["spatialde.log10p"][same], rtol=1e-4)


def _dense_gaussian_reference(y, K):
    """The Gaussian score test written out with n x n matrices (brute force)."""
    n = y.size
    sigma2 = y.var()
    W = np.full(n, 1.0 / sigma2)
    z = (y - y.mean()) / sigma2
    U = 0.5 * z @ K @ z
    P = np.diag(W) - np.outer(W, W) / W.sum()
    PK = P @ K
    e = 0.5 * np.trace(PK)
    Itt, Itq, Iqq = 0.5 * (PK * PK).sum(), 0.5 * (PK * P).sum(), 0.5 * (P * P).sum()
    return U, e, Itt - Itq ** 2 / Iqq


def test_normal_model(small):
    a = small.copy()
    X = a.X.toarray()
    logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    xy = a.obsm["spatial"]
    rng = np.random.default_rng(1)
    pattern = np.sin(xy[:, 0] / 3.0) * 2 + rng.normal(0, 0.3, a.n_obs)
    noise = rng.normal(0, 1, a.n_obs)
    logn = np.column_stack([logn, pattern, noise])
    b = ad.AnnData(logn, var=pd.DataFrame(index=list(a.var_names) + ["pattern", "noise"]))
    b.obsm["spatial"] = xy
    svg_spatialde(b, layer=None, obs_dist="normal", kernel_space={"SE": [2.0, 6.0]}, progress=False)
    p = b.var["spatialde.pval"]
    assert p["pattern"] < 1e-10 and p["noise"] > 1e-3
    assert ((p.dropna() >= 0) & (p.dropna() <= 1)).all()
    D2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    for j, l in enumerate([2.0, 6.0]):
        K = np.exp(-D2 / (2 * l * l))
        for g in ("pattern", "noise", b.var_names[5]):
            U, e, I = _dense_gaussian_reference(b[:, g].X.ravel().astype(float), K)
            col = f"SE_l{l:.5g}"
            np.testing.assert_allclose([b.varm["spatialde.U"].loc[g, col], b.varm["spatialde.e"].loc[g, col],
                                        b.varm["spatialde.I"].loc[g, col]], [U, e, I], rtol=1e-8)


def test_resource_error_before_start(small):
    with pytest.raises(ResourceError):
        svg_spatialde(small.copy(), max_memory=1e-4, progress=False)


# ----------------------------------------------------------------------------------------------
# numerical pieces
# ----------------------------------------------------------------------------------------------
def test_chi2_logsf_tail():
    x = np.array([0.5, 3.0, 40.0, 200.0, 2000.0, 20000.0])
    df = np.array([1.0, 3.5, 10.0, 7.0, 12.0, 30.0])
    ours = pv.chi2_logsf(x, df)
    ref = stats.chi2.logsf(x, df)
    ok = np.isfinite(ref) & (ref > -600)
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-10)
    # far tail: log Q(a, x) ~ (a - 1) log x - x - lgamma(a) + log(1 + (a - 1)/x + ...)
    a, h = df[-1] / 2, x[-1] / 2
    approx = (a - 1) * math.log(h) - h - math.lgamma(a) + math.log1p((a - 1) / h + (a - 1) * (a - 2) / h ** 2)
    assert np.isfinite(ours[-1]) and abs(ours[-1] - approx) < 1e-6


def test_cauchy_combination_log():
    rng = np.random.default_rng(0)
    p = rng.uniform(1e-6, 1, size=(50, 10))
    direct = stats.cauchy.sf(np.tan((0.5 - p) * np.pi).mean(1))
    np.testing.assert_allclose(pv.cauchy_combine_logp(np.log(p)), np.log(direct), rtol=1e-9)
    # p far below the double range: combined p ~ k p_min / (pi ... ) -> log p_min + log k (one tiny term)
    logp = np.log(np.full((1, 10), 0.5))
    logp[0, 3] = -5000.0
    out = pv.cauchy_combine_logp(logp)[0]
    assert np.isfinite(out) and abs(out - (-5000.0 + math.log(10))) < 1e-6


def test_bh_log_matches_linear():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200) ** 3
    p[5] = np.nan
    from scipy.stats import false_discovery_control
    ok = ~np.isnan(p)
    np.testing.assert_allclose(np.exp(pv.bh_adjust_log(np.log(p)))[ok], false_discovery_control(p[ok]), rtol=1e-10)
    assert np.isnan(pv.bh_adjust_log(np.log(p))[5])


def test_structured_kernels_match_dense():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 30, size=(400, 2))
    dev = torch.device("cpu")
    Z = torch.as_tensor(rng.normal(size=(400, 3)))
    D2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    for l in (1.5, 12.0):
        K = torch.as_tensor(np.exp(-D2 / (2 * l * l)))
        for op in (sk.se_sparse(xy, l, 1e-10, dev), sk.se_lowrank(xy, l, 1e-10, dev, max_rank=400)):
            if op is None:
                continue
            np.testing.assert_allclose(op.mm(Z).numpy(), (K @ Z).numpy(), atol=1e-6)
            np.testing.assert_allclose(op.quad(Z).numpy(), (Z * (K @ Z)).sum(0).numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(op.sq_rowsum().numpy(), (K * K).sum(1).numpy(), rtol=1e-5)
    tiled = sk.se_sparse(xy, 1.5, 1e-10, dev)
    assert tiled.tiles is not None  # quad over dense tile blocks: same as the sparse product
    plain = (Z * tiled.mm(Z)).sum(0)
    np.testing.assert_allclose(tiled.quad(Z).numpy(), plain.numpy(), rtol=1e-12)
    u = 2 * np.pi * xy.sum(1) / 7.0
    Kc = np.cos(u[:, None] - u[None, :])
    cos = sk.cosine_kernel(xy, 7.0, dev)
    np.testing.assert_allclose(cos.mm(Z).numpy(), Kc @ Z.numpy(), atol=1e-9)
    np.testing.assert_allclose(cos.sq_rowsum().numpy(), (Kc * Kc).sum(1), rtol=1e-9)
    both = sk.SumKernel([sk.se_sparse(xy, 1.5, 1e-12, dev), cos])
    Ks = np.exp(-D2 / (2 * 1.5 ** 2)) + Kc
    np.testing.assert_allclose(both.sq_rowsum().numpy(), (Ks * Ks).sum(1), rtol=1e-6)


@pytest.mark.gpu
def test_cpu_and_cuda_agree(small):
    a, b = small.copy(), small.copy()
    svg_spatialde(a, progress=False, use_cache=False)
    svg_spatialde(b, progress=False, use_cache=False, use_gpu=True)
    assert b.uns["spatialde"]["device"].startswith("cuda")
    np.testing.assert_allclose(a.var["spatialde.log10p"], b.var["spatialde.log10p"], rtol=1e-6)
    for method in ("approx",):
        svg_spatialde(a, progress=False, use_cache=False, method=method)
        svg_spatialde(b, progress=False, use_cache=False, method=method, use_gpu=True)
        np.testing.assert_allclose(a.var["spatialde.log10p"], b.var["spatialde.log10p"], rtol=1e-6)


def test_nb_null_dense_and_sparse_counts_agree(small):
    """The NB null fit from dense counts and from CSC counts (the path svg_spatialde takes for sparse
    input) is the same computation; a dense AnnData gives the same statistics as a sparse one."""
    X = sp.csc_matrix(small.X[:, :120], dtype=np.float64)
    s = torch.as_tensor(np.asarray(small.X.sum(1)).ravel(), dtype=torch.float64)
    b1, a1, c1 = st.fit_nb_null(torch.as_tensor(X.toarray()), s)
    b2, a2, c2 = st.fit_nb_null_csc(torch.as_tensor(X.indptr), torch.as_tensor(X.indices),
                                    torch.as_tensor(X.data), X.shape[0], s)
    ok = ~torch.isnan(b1)
    assert torch.equal(ok, ~torch.isnan(b2)) and bool(c1.all()) and bool(c2.all())
    np.testing.assert_allclose(b1[ok].numpy(), b2[ok].numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a1[ok].numpy(), a2[ok].numpy(), rtol=1e-10)
    a, d = small[:, :60].copy(), small[:, :60].copy()
    d.X = d.X.toarray()
    if "counts" in d.layers:
        d.layers["counts"] = d.layers["counts"].toarray()
    sf = np.asarray(small.X.sum(1)).ravel()
    svg_spatialde(a, sizefactors=sf, method="exact", progress=False, use_cache=False)
    svg_spatialde(d, sizefactors=sf, method="exact", progress=False, use_cache=False)
    for q in ("U", "e", "I"):
        np.testing.assert_allclose(d.varm[f"spatialde.{q}"].to_numpy(), a.varm[f"spatialde.{q}"].to_numpy(),
                                   rtol=1e-9)


def test_lgamma_ratio_large_r():
    """lgamma(y + r) - lgamma(r) - y log r and the digamma / trigamma differences of the NB null fit, as they
    enter it (per count, r (psi(r) - psi(y + r)), r^2 (psi'(r) - psi'(y + r))), against 50-digit mpmath, across
    the switch points r = 1e3 (Stirling differences) and r = 1e6 y (series)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    ys = [1.0, 2.0, 7.0, 30.0, 226.0, 2.5]
    rs = [10.0, 999.0, 1e3, 3e3, 1e5, 7.7e5, 1e6, 3e6, 1e8, 1e12]
    Y, R = np.meshgrid(ys, rs)
    lg, ps, tr = (v.numpy() for v in st._lgamma_ratio(torch.as_tensor(Y.ravel()), torch.as_tensor(R.ravel())))
    for k, (y, r) in enumerate(zip(Y.ravel(), R.ravel())):
        my, mr = mp.mpf(y), mp.mpf(r)
        e_lg = float(mp.loggamma(my + mr) - mp.loggamma(mr) - my * mp.log(mr))
        e_ps = float(mp.digamma(mr) - mp.digamma(my + mr))
        e_tr = float(mp.polygamma(1, mr) - mp.polygamma(1, my + mr))
        assert abs(lg[k] - e_lg) < 1e-12 * y, (y, r)
        assert abs(ps[k] - e_ps) * r < 1e-12 * y, (y, r)
        assert abs(tr[k] - e_tr) * r * r < 1e-9 * y, (y, r)
