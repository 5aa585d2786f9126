"""Per-observation and per-gene summaries of a count matrix, and depth normalisation.

Arrays in, arrays out (numpy / scipy.sparse). These are single passes over the stored non-zeros:
no densification, no per-gene loops.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _csr(x) -> sp.csr_matrix:
    if sp.issparse(x):
        return x.tocsr() if x.format != "csr" else x
    return sp.csr_matrix(np.asarray(x))


def qc_metrics(x, masks: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Quality-control summaries of a cells x genes count matrix.

    Returns ``(obs, var)``: ``obs`` holds ``n_counts`` (float64), ``n_genes`` (int64, genes with a
    non-zero count) and, for each boolean gene mask in ``masks``, ``pct_<name>`` (percent of the
    obs's counts in those genes, 0 where the obs has no counts); ``var`` holds ``n_cells`` (int64),
    ``total_counts`` (float64), ``mean_counts`` and ``pct_dropout``.
    """
    x = _csr(x)
    n_obs, n_var = x.shape
    if x.nnz and not np.all(x.data != 0):  # explicit zeros must not count as detected
        x = x.copy()
        x.eliminate_zeros()
    # sparse mat-vec products accumulate in float64 (the vectors are float64)
    n_counts = x @ np.ones(n_var)
    obs = {"n_counts": n_counts, "n_genes": np.diff(x.indptr).astype(np.int64)}
    for name, mask in (masks or {}).items():
        sub = x @ np.asarray(mask, dtype=np.float64)
        obs[f"pct_{name}"] = np.divide(100.0 * sub, n_counts, out=np.zeros(n_obs), where=n_counts > 0)
    n_cells = np.bincount(x.indices, minlength=n_var).astype(np.int64)
    total = x.T @ np.ones(n_obs)
    var = {"n_cells": n_cells, "total_counts": total, "mean_counts": total / max(n_obs, 1),
           "pct_dropout": 100.0 * (1.0 - n_cells / max(n_obs, 1))}
    return obs, var


def normalize_total(x, target_sum: float | None = None, *, log: bool = True,
                    dtype=np.float32) -> tuple[sp.csr_matrix, sp.csr_matrix | None, float]:
    """Scale every row to ``target_sum`` (None: the median of the non-zero row totals) and log1p.

    Arithmetic is in float64 with one rounding to ``dtype`` at the end, so the result is the exactly
    rounded ``x_ij * target / total_i`` (and its ``log1p``). Rows with no counts stay zero.
    Returns ``(norm, lognorm or None, target_sum)`` as CSR matrices sharing ``x``'s sparsity pattern.
    """
    x = _csr(x)
    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    if target_sum is None:
        pos = totals[totals > 0]
        target_sum = float(np.median(pos)) if pos.size else 1.0
    target_sum = float(target_sum)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    vals = np.asarray(x.data, dtype=np.float64) * np.repeat(scale, np.diff(x.indptr))
    indptr, indices = x.indptr.copy(), x.indices.copy()
    norm = sp.csr_matrix((vals.astype(dtype), indices, indptr), shape=x.shape)
    lognorm = None
    if log:
        lognorm = sp.csr_matrix((np.log1p(vals).astype(dtype), indices.copy(), indptr.copy()), shape=x.shape)
    return norm, lognorm, target_sum


def mean_var(x, axis: int = 0, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Column (axis=0) or row (axis=1) means and variances of a sparse or dense matrix, in float64."""
    if sp.issparse(x):
        # two passes over the non-zeros: sum of (x - mean)^2 plus mean^2 for every implicit zero
        x = x.tocsr() if axis == 0 else x.tocsc()
        n, m = x.shape[axis], x.shape[1 - axis]
        data = np.asarray(x.data, dtype=np.float64)
        idx = x.indices
        nnz = np.bincount(idx, minlength=m)
        mean = np.bincount(idx, weights=data, minlength=m) / n
        ss = np.bincount(idx, weights=(data - mean[idx]) ** 2, minlength=m) + (n - nnz) * mean**2
        return mean, ss / max(n - ddof, 1)
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    var = ((x - np.expand_dims(mean, axis)) ** 2).sum(axis=axis) / max(n - ddof, 1)
    return mean, var
