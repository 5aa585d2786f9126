"""The steps of :func:`expkit.spatial.svg.svg_spatialde`: inputs and size factors, the null fit, the weight
bases, the per-kernel score statistics, the combined p-values and the results written to the AnnData.

The caches, the kernel plans, the memory plan and the run record stay in :mod:`expkit.spatial.svg`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._logging import logger, progress as _progress
from ..errors import InputError, KeyNotFoundError
from ..kernels import pvalues as pv
from ..kernels import score_test as st
from ..kernels import spatial_kernels as sk


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _counts_matrix(adata, layer):
    """The counts of ``layer`` (``None``: ``X``; ``"counts"`` falls back to ``X`` when the layer is absent)."""
    if layer is None:
        return adata.X
    if layer in adata.layers:
        return adata.layers[layer]
    if layer == "counts":
        logger.info("svg_spatialde: no layer 'counts', using X")
        return adata.X
    raise KeyNotFoundError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})")


def _coordinates(adata, spatial_key):
    if spatial_key not in adata.obsm:
        raise KeyNotFoundError(f"obsm key {spatial_key!r} not found (available: {list(adata.obsm)})")
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs:
        raise InputError(f"obsm[{spatial_key!r}] must be n_obs x d coordinates")
    return coords


def _size_factors(adata, X, sizefactors):
    """Size factors of all spots: the totals of ``X`` (``None``), an ``obs`` column or an array."""
    n_obs = X.shape[0]
    if sizefactors is None:
        s_all = np.asarray(X.sum(1), dtype=np.float64).ravel()
    elif isinstance(sizefactors, str):
        if sizefactors not in adata.obs:
            raise KeyNotFoundError(f"sizefactors: obs column {sizefactors!r} not found")
        s_all = adata.obs[sizefactors].to_numpy(dtype=np.float64)
    else:
        s_all = np.asarray(sizefactors, dtype=np.float64).ravel()
        if s_all.shape[0] != n_obs:
            raise InputError(f"sizefactors has {s_all.shape[0]} values for {n_obs} spots")
    return s_all


def _tested_genes(Xs, dist, n):
    """Positions of the genes to test: with counts (NB model) or with a non-zero variance (normal model)."""
    if dist == "negative_binomial":
        if (Xs.data if sp.issparse(Xs) else Xs).min(initial=0) < 0:
            raise InputError("negative values in the counts: the negative-binomial test needs raw counts")
        totals = np.asarray(Xs.sum(0)).ravel()
        return np.nonzero(totals > 0)[0]
    sq = np.asarray((Xs.multiply(Xs) if sp.issparse(Xs) else Xs ** 2).sum(0)).ravel()
    mean = np.asarray(Xs.mean(0)).ravel()
    return np.nonzero(sq / n - mean ** 2 > 1e-12 * np.maximum(sq / n, 1e-300))[0]


def read_inputs(adata, layer, spatial_key, sizefactors, dist):
    """Counts, coordinates and size factors of the spots kept (positive size factor for the NB model).

    Returns ``(Xs, cs, s, n_vars, tested)``: float64 counts (CSR or dense) and coordinates of the kept
    spots, their size factors, the number of genes and the positions of the genes to test."""
    X = _counts_matrix(adata, layer)
    coords = _coordinates(adata, spatial_key)
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    n_obs, n_vars = X.shape
    s_all = _size_factors(adata, X, sizefactors)
    if dist == "negative_binomial":
        spots = np.nonzero(s_all > 0)[0]
    else:
        spots = np.arange(n_obs)
    if spots.size < 3:
        raise InputError("svg_spatialde needs at least 3 spots with a positive size factor")
    Xs = X[spots] if spots.size < n_obs else X
    Xs = sp.csr_matrix(Xs, dtype=np.float64) if sp.issparse(Xs) else np.asarray(Xs, dtype=np.float64)
    cs = coords[spots]
    s = s_all[spots]
    tested = _tested_genes(Xs, dist, spots.size)
    return Xs, cs, s, n_vars, tested


# ----------------------------------------------------------------------------------------------
# the tested genes in chunks, their null fit and weights
# ----------------------------------------------------------------------------------------------
class GeneChunks:
    """The tested genes in chunks of ``chunk_size``: their counts as dense tensors and, once the null fit is
    set (:meth:`set_null`), their weights."""

    def __init__(self, Xs, s, tested, chunk_size, dist, device):
        self.Xs, self.s, self.tested, self.chunk_size = Xs, s, tested, chunk_size
        self.dist, self.device = dist, device
        self.n = Xs.shape[0]
        self.g = tested.size
        self.chunks = [tested[i:i + chunk_size] for i in range(0, self.g, chunk_size)]
        self.s_t = torch.as_tensor(s, dtype=torch.float64, device=device)
        self.p1_t = self.p2_t = None

    def dense_chunk(self, cols):
        block = self.Xs[:, cols]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return torch.as_tensor(block, dtype=torch.float64, device=self.device)

    def positions(self, i, cols):
        """The positions (into tested) of chunk ``i`` (genes ``cols``) as a slice."""
        return slice(i * self.chunk_size, i * self.chunk_size + cols.size)

    def index(self, i, cols):
        """The positions (into tested) of chunk ``i`` (genes ``cols``) as a tensor."""
        return torch.arange(i * self.chunk_size, i * self.chunk_size + cols.size, device=self.device)

    def set_null(self, null):
        self.p1_t = torch.as_tensor(null["p1"], device=self.device)
        self.p2_t = torch.as_tensor(null["p2"], device=self.device)

    def weights(self, cols_idx, y):
        """W and z for the genes at positions cols_idx (into tested) and their counts y (None: W only)."""
        if self.dist == "negative_binomial":
            mu = torch.exp(self.p1_t[cols_idx])
            a = self.p2_t[cols_idx]
            m = self.s_t[:, None] * mu[None, :]
            den = 1.0 + a[None, :] * m
            W = m / den
            Z = None if y is None else (y - m) / den
        else:
            W = (1.0 / self.p2_t[cols_idx])[None, :].expand(self.n, cols_idx.numel()).contiguous()
            Z = None if y is None else (y - self.p1_t[cols_idx][None, :]) * W
        return W, Z


def _fit_nb_null_sparse(gc, csc, spot_sums, null_fit, p1, p2, conv):
    """The NB null fit on the non-zeros of sparse counts (filled into p1, p2, conv)."""
    # sparse counts: the NB fit works on the non-zeros, without densifying; gene chunks of at most
    # n * chunk_size non-zeros (within the memory estimate of one dense chunk)
    g, n, device = gc.g, gc.n, gc.device
    start = 0
    while start < g:
        ip = csc.indptr
        end = int(np.searchsorted(ip, ip[start] + n * gc.chunk_size, side="right")) - 1
        end = min(g, max(end, start + 1))
        lo_, hi_ = int(ip[start]), int(ip[end])
        b, a, c = st.fit_nb_null_csc(torch.as_tensor(ip[start:end + 1] - ip[start], device=device),
                                     torch.as_tensor(csc.indices[lo_:hi_], device=device),
                                     torch.as_tensor(csc.data[lo_:hi_], dtype=torch.float64, device=device),
                                     n, gc.s_t, spot_sums=spot_sums, null_fit=null_fit)
        conv[start:end], p1[start:end], p2[start:end] = c.cpu().numpy(), b.cpu().numpy(), a.cpu().numpy()
        start = end


def fit_null(gc, null_fit):
    """The null fit of every tested gene (NB: batched Newton; normal: mean and variance), by chunk.

    Returns ``{"p1": (g,), "p2": (g,), "converged": (g,) bool}``."""
    g, dist = gc.g, gc.dist
    p1 = np.full(g, np.nan)
    p2 = np.full(g, np.nan)
    conv = np.zeros(g, dtype=bool)
    spot_sums = st._SpotSums(gc.s_t) if dist == "negative_binomial" and g else None
    csc = sp.csc_matrix(gc.Xs[:, gc.tested]) if dist == "negative_binomial" and sp.issparse(gc.Xs) and g else None
    if csc is not None:
        _fit_nb_null_sparse(gc, csc, spot_sums, null_fit, p1, p2, conv)
    for i, cols in enumerate(gc.chunks if csc is None else []):
        y = gc.dense_chunk(cols)
        sl = gc.positions(i, cols)
        if dist == "negative_binomial":
            b, a, c = st.fit_nb_null(y, gc.s_t, spot_sums=spot_sums, null_fit=null_fit)
            conv[sl] = c.cpu().numpy()
        else:
            b, a = st.fit_normal_null(y)
            conv[sl] = True
        p1[sl], p2[sl] = b.cpu().numpy(), a.cpu().numpy()
    return {"p1": p1, "p2": p2, "converged": conv}


def weight_bases(gc):
    """Bases ``B1`` of the weights and ``B2`` of their squares (gene-independent products with K go through
    them), extended until every gene's weights lie in their span; returns ``(B1, B2, residual)``."""
    g, dist, device = gc.g, gc.dist, gc.device
    p1_t, p2_t = gc.p1_t, gc.p2_t
    order = (p2_t * torch.exp(p1_t)) if dist == "negative_binomial" else torch.arange(g, device=device)
    pick = torch.argsort(order)[torch.unique(torch.linspace(0, g - 1, min(g, 256), device=device).round().long())]
    Wp, _ = gc.weights(pick, None)
    B1 = st.weight_basis(Wp, order[pick])
    B2 = st.weight_basis(Wp * Wp, order[pick])
    # every gene's weights must lie in the span; add the worst ones if not
    resid = []
    for i, cols in enumerate(gc.chunks):
        idx = gc.index(i, cols)
        W, _ = gc.weights(idx, None)
        r1, r2 = st.projection_residual(B1, W), st.projection_residual(B2, W * W)
        bad = (r1 > 1e-9) | (r2 > 1e-9)
        if bad.any():
            extra = W[:, bad]
            B1 = st.weight_basis(torch.cat([B1, extra / extra.norm(dim=0)], 1), None, n_sample=10 ** 9)
            B2 = st.weight_basis(torch.cat([B2, (extra ** 2) / (extra ** 2).norm(dim=0)], 1), None,
                                 n_sample=10 ** 9)
            r1, r2 = st.projection_residual(B1, W), st.projection_residual(B2, W * W)
        resid.append(float(torch.maximum(r1.max(), r2.max())))
    return B1, B2, (max(resid) if resid else 0.0)


# ----------------------------------------------------------------------------------------------
# kernels x gene chunks
# ----------------------------------------------------------------------------------------------
class _Scores:
    """The per-gene, per-kernel score statistics ``U``, ``e``, ``I`` (NaN until stored) of the chunks of ``gc``
    with the weight bases ``B1``, ``B2``."""

    def __init__(self, gc, B1, B2, n_cols):
        self.gc, self.B1, self.B2 = gc, B1, B2
        self.U = np.full((gc.g, n_cols), np.nan)
        self.E = np.full((gc.g, n_cols), np.nan)
        self.Iinfo = np.full((gc.g, n_cols), np.nan)

    def chunk_data(self, i, cols):
        W, Z = self.gc.weights(self.gc.index(i, cols), self.gc.dense_chunk(cols))
        W2 = W * W
        return W, Z, W2, self.B1.T @ W, self.B2.T @ W2, st.weight_sums(W)

    def store(self, i, cols, col, stats):
        sl = self.gc.positions(i, cols)
        self.U[sl, col], self.E[sl, col], self.Iinfo[sl, col] = (v.cpu().numpy() for v in stats)

    def run_op(self, op, col):
        prod = st.KernelProducts(op, self.B1, self.B2)
        for i, cols in enumerate(self.gc.chunks):
            W, Z, W2, A1, A2, sums = self.chunk_data(i, cols)
            self.store(i, cols, col, st.score_statistics(prod, Z, W, A1, A2, sums, W2))


def _omnibus_statistics(gc, B1, B2, get_op, names, reps, advance):
    """One test of the summed kernel (all kernels held at once)."""
    ops = []
    for j in range(len(names)):
        ops.append(get_op(j))
        reps[names[j]] = ops[-1].info()
        advance(names[j])
    if all(isinstance(o, sk.DenseKernel) for o in ops):
        total = ops[0].K.clone()
        for o in ops[1:]:
            total += o.K
        sum_op = sk.DenseKernel(total, name="sum")
    else:
        sum_op = sk.SumKernel(ops)
    scores = _Scores(gc, B1, B2, 1)
    scores.run_op(sum_op, 0)
    advance("omnibus")
    return scores


def _all_at_once_statistics(scores, get_op, names, reps, advance):
    """All kernels held at once: the per-chunk weights are computed once for all kernels."""
    prods = []
    for j in range(len(names)):
        op = get_op(j)
        reps[names[j]] = op.info()
        prods.append(st.KernelProducts(op, scores.B1, scores.B2))
        advance(names[j])
    for i, cols in enumerate(scores.gc.chunks):
        W, Z, W2, A1, A2, sums = scores.chunk_data(i, cols)
        for j, prod in enumerate(prods):
            scores.store(i, cols, j, st.score_statistics(prod, Z, W, A1, A2, sums, W2))
    del prods


def _one_by_one_statistics(scores, get_op, names, reps, advance):
    """One kernel at a time (each built, used for every chunk and dropped)."""
    for j in range(len(names)):
        op = get_op(j)
        reps[names[j]] = op.info()
        scores.run_op(op, j)
        del op
        advance(names[j])


def kernel_statistics(gc, B1, B2, get_op, names, omnibus, all_at_once, progress):
    """Score statistics ``U``, ``e``, ``I`` of every tested gene for every kernel (``get_op(j)``: the operator
    of kernel ``j``), or for their sum (``omnibus``); returns ``((U, E, Iinfo), reps)`` with the kernels'
    representations ``reps``."""
    n_k = len(names)
    scores = _Scores(gc, B1, B2, n_k)
    reps = {}
    if gc.g:
        with _progress(n_k + (1 if omnibus else 0), "SpatialDE2 score test",
                       enabled=None if progress else False) as advance:
            if omnibus:
                scores = _omnibus_statistics(gc, B1, B2, get_op, names, reps, advance)
            elif all_at_once:
                _all_at_once_statistics(scores, get_op, names, reps, advance)
            else:
                _one_by_one_statistics(scores, get_op, names, reps, advance)
    return (scores.U, scores.E, scores.Iinfo), reps


# ----------------------------------------------------------------------------------------------
# p-values and results
# ----------------------------------------------------------------------------------------------
def combine_pvalues(U, E, Iinfo, omnibus, n_k, n_vars, tested, n_svg):
    """Satterthwaite p-values per kernel, their Cauchy combination (unless ``omnibus`` or one kernel),
    Benjamini-Hochberg, ranks and the SVG calls (log space throughout)."""
    logp_k, kappa, nu = pv.satterthwaite_logp(U, E, Iinfo)
    if omnibus or n_k == 1:
        logp = logp_k[:, 0]
    else:
        logp = pv.cauchy_combine_logp(logp_k)
    logp_full = np.full(n_vars, np.nan)
    logp_full[tested] = logp
    logpadj = pv.bh_adjust_log(logp_full)
    pval = np.exp(logp_full)
    padj = np.exp(logpadj)
    rank = np.full(n_vars, np.nan)
    ok = ~np.isnan(logp_full)
    order = np.argsort(logp_full[ok], kind="stable")
    r = np.empty(order.size)
    r[order] = np.arange(1, order.size + 1)
    rank[ok] = r
    is_svg = ok & (np.nan_to_num(padj, nan=1.0) < 0.05) & (np.nan_to_num(rank, nan=np.inf) <= n_svg)
    return {"logp_k": logp_k, "logp_full": logp_full, "pval": pval, "padj": padj, "rank": rank, "is_svg": is_svg}


def write_results(adata, key_added, pvals, stats, cols, n_vars, gc, null):
    """Write ``var['<key>.*']`` and ``varm['<key>.U' | '.e' | '.I' | '.log10p' | '.null']``; returns the
    per-gene table."""
    ln10 = math.log(10.0)
    tested = gc.tested
    res = pd.DataFrame({f"{key_added}.pval": pvals["pval"], f"{key_added}.padj": pvals["padj"],
                        f"{key_added}.log10p": pvals["logp_full"] / ln10, f"{key_added}.rank": pvals["rank"],
                        f"{key_added}.svg": pvals["is_svg"]}, index=adata.var_names)
    for c in res.columns:
        adata.var[c] = res[c].to_numpy()
    U, E, Iinfo = stats
    for what, arr in (("U", U), ("e", E), ("I", Iinfo), ("log10p", pvals["logp_k"] / ln10)):
        full = np.full((n_vars, len(cols)), np.nan)
        full[tested] = arr
        adata.varm[f"{key_added}.{what}"] = pd.DataFrame(full, index=adata.var_names, columns=cols)
    nul = np.full((n_vars, 2), np.nan)
    if gc.g:
        nul[tested, 0], nul[tested, 1] = null["p1"], null["p2"]
    adata.varm[f"{key_added}.null"] = pd.DataFrame(
        nul, index=adata.var_names,
        columns=["log_mean", "dispersion"] if gc.dist == "negative_binomial" else ["mean", "variance"])
    return res
