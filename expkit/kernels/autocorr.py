"""Global spatial autocorrelation (Moran's I, Geary's C) of many variables at once.

For a weight matrix W (n x n, sparse) and a variable x with deviations z = x - mean(x):

    Moran (1950):  I = n / S0 * sum_ij w_ij z_i z_j / sum_i z_i^2
    Geary (1954):  C = (n - 1) / (2 S0) * sum_ij w_ij (x_i - x_j)^2 / sum_i z_i^2
                     = (n - 1) / (2 S0) * (sum_i (r_i + c_i) z_i^2 - 2 z'Wz) / sum_i z_i^2

with S0 = sum_ij w_ij and r, c the row and column sums of W. All variables of a chunk are handled by one
sparse-dense product W @ Z; chunks bound the dense pieces. Moments (Cliff & Ord 1981), with
S1 = 1/2 sum_ij (w_ij + w_ji)^2, S2 = sum_i (r_i + c_i)^2 and b2 = n sum z^4 / (sum z^2)^2 (kurtosis):

    E[I] = -1/(n-1)
    Var_N(I) = (n^2 S1 - n S2 + 3 S0^2) / ((n^2 - 1) S0^2) - E[I]^2                         (normality)
    Var_R(I) = (n((n^2-3n+3) S1 - n S2 + 3 S0^2) - b2((n^2-n) S1 - 2n S2 + 6 S0^2))
               / ((n-1)(n-2)(n-3) S0^2) - E[I]^2                                          (randomization)
    E[C] = 1
    Var_N(C) = ((2 S1 + S2)(n-1) - 4 S0^2) / (2 (n+1) S0^2)
    Var_R(C) = ((n-1) S1 (n^2-3n+3-(n-1) b2) - 1/4 (n-1) S2 (n^2+3n-6-(n^2-n+2) b2)
                + S0^2 (n^2-3-(n-1)^2 b2)) / (n (n-2)(n-3) S0^2)

Permutation tests permute the rows of Z (the same permutation for every variable), many permutations per
sparse product.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats

from ..errors import InputError, ResourceError
from .device import sparse_as_tensor as _sparse_as_tensor

_DEFAULT_CHUNK_BYTES = 1 << 28  # 256 MiB for the dense pieces of one step

MODES = ("moran", "geary")


def sparse_as_tensor(w, device):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return _sparse_as_tensor(w, device)


def row_normalize(w: sp.spmatrix) -> sp.csr_matrix:
    """Divide every row by the sum of its absolute values (rows summing to 0 stay 0)."""
    w = sp.csr_matrix(w, dtype=np.float64, copy=True)
    s = np.asarray(abs(w).sum(axis=1)).ravel()
    scale = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    w.data *= np.repeat(scale, np.diff(w.indptr))
    return w


def weight_moments(w: sp.spmatrix) -> tuple[float, float, float]:
    """S0, S1, S2 of a weight matrix."""
    w = sp.csr_matrix(w, dtype=np.float64)
    s0 = float(w.sum())
    t = (w + w.T).tocsr()
    s1 = float(t.multiply(t).sum()) / 2.0
    rc = np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()
    s2 = float((rc ** 2).sum())
    return s0, s1, s2


def _column_getter(x):
    """A function (start, stop) -> dense float64 numpy block of columns."""
    if sp.issparse(x):
        xc = sp.csc_matrix(x)

        def get(a, b):
            return np.asarray(xc[:, a:b].toarray(), dtype=np.float64)
    else:
        xd = np.asarray(x)

        def get(a, b):
            return np.asarray(xd[:, a:b], dtype=np.float64)
    return get


def _gene_chunk(n: int, g: int, chunk_bytes: int, copies: int) -> int:
    per_gene = n * 8 * copies
    if per_gene > chunk_bytes:
        raise ResourceError(f"one variable over {n} observations needs {per_gene / 2**20:.0f} MiB, more "
                            f"than the chunk budget of {chunk_bytes / 2**20:.0f} MiB; raise chunk_bytes")
    return max(1, min(g, chunk_bytes // per_gene))


def _scores_sparse(x, w: sp.csr_matrix, mode: str) -> dict[str, np.ndarray]:
    """The statistics of a sparse ``x`` without densifying it (CPU, scipy).

    With z = x - mu: z'Wz = x'Wx - mu (r + c)'x + mu^2 S0, where x'Wx = sum over stored entries of
    x * (W x) (one sparse-sparse product, CSR throughout); the sums of z^2 and z^4 are taken over the stored
    entries plus (n - nnz) mu^k for the implicit zeros (no cancellation).
    """
    n, g = x.shape
    # a private copy: scipy shares index arrays on dtype conversion, and sum_duplicates sorts in place
    xr = sp.csr_matrix(x, dtype=np.float64, copy=True)
    xr.sum_duplicates()
    s0 = float(w.sum())
    rc = np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()
    mu = np.asarray(xr.sum(axis=0)).ravel() / n
    xwx = np.asarray(xr.multiply(w @ xr).sum(axis=0)).ravel()
    num = xwx - mu * (rc @ xr) + mu * mu * s0
    col = xr.indices
    dev = xr.data - mu[col]
    dev2 = dev * dev
    n_zero = n - np.bincount(col, minlength=g)
    z2 = np.bincount(col, dev2, minlength=g) + n_zero * mu ** 2
    z4 = np.bincount(col, dev2 * dev2, minlength=g) + n_zero * mu ** 4
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "moran":
            score = (n / s0) * num / z2
        else:
            # sum_i rc_i z_i^2 over stored entries and implicit zeros
            rc_e = rc[np.repeat(np.arange(n), np.diff(xr.indptr))]
            side = np.bincount(col, rc_e * dev2, minlength=g)
            rc_nz = np.bincount(col, rc_e, minlength=g)
            side += (rc.sum() - rc_nz) * mu ** 2
            score = (n - 1) / (2.0 * s0) * (side - 2.0 * num) / z2
    score[z2 <= 0] = np.nan
    return {"score": score, "z2": z2, "z4": z4}


def autocorr_scores(x, w: sp.spmatrix, device: torch.device, *, mode: str = "moran",
                    chunk_bytes: int = _DEFAULT_CHUNK_BYTES, method: str = "auto") -> dict[str, np.ndarray]:
    """Moran's I or Geary's C of every column of ``x`` (n x g, dense or sparse) under weights ``w``.

    Returns ``{"score", "z2", "z4"}`` (per column: the statistic, sum z^2 and sum z^4). Constant columns
    give NaN scores. ``method``: ``"dense"`` (chunks of columns densified on ``device``, one sparse-dense
    product each), ``"sparse"`` (scipy, CPU, never densifies), ``"auto"``: sparse for a sparse ``x`` on the
    CPU, else dense.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, not {mode!r}")
    if method not in ("auto", "dense", "sparse"):
        raise InputError(f"method must be 'auto', 'dense' or 'sparse', not {method!r}")
    n, g = x.shape
    if w.shape != (n, n):
        raise InputError(f"weights {w.shape} do not match {n} observations")
    if method == "sparse" or (method == "auto" and sp.issparse(x) and device.type == "cpu"):
        return _scores_sparse(x, sp.csr_matrix(w, dtype=np.float64), mode)
    s0 = float(w.sum())
    wt = sparse_as_tensor(w, device)
    rc = None
    if mode == "geary":
        rc_np = np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()
        rc = torch.as_tensor(rc_np, dtype=torch.float64, device=device)[:, None]
    get = _column_getter(x)
    step = _gene_chunk(n, g, chunk_bytes, copies=4)
    score = np.empty(g)
    z2_all = np.empty(g)
    z4_all = np.empty(g)
    for a in range(0, g, step):  # over chunks of genes, each one sparse product
        b = min(g, a + step)
        z = torch.as_tensor(get(a, b), device=device)
        z = z - z.mean(dim=0, keepdim=True)
        zz = z * z
        z2 = zz.sum(dim=0)
        num = (z * (wt @ z)).sum(dim=0)
        if mode == "moran":
            s = (n / s0) * num / z2
        else:
            s = (n - 1) / (2.0 * s0) * ((rc * zz).sum(dim=0) - 2.0 * num) / z2
        score[a:b] = s.cpu().numpy()
        z2_all[a:b] = z2.cpu().numpy()
        z4_all[a:b] = (zz * zz).sum(dim=0).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        score[z2_all <= 0] = np.nan
    return {"score": score, "z2": z2_all, "z4": z4_all}


def permutations(n: int, n_perms: int, seed: int) -> torch.Tensor:
    """``(n_perms, n)`` int64 row permutations from a seeded CPU generator (same on every device)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(int(n_perms))])


def _stacked_permuted_weights(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                              perms: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of ``[W_p1; W_p2; ...]`` (B*n x n CSR) with W_p = the weights relabelled by permutation p.

    Permuting the values, z_p = z[perm], gives z_p' W z_p = sum_ij w_ij z[perm_i] z[perm_j] = z' W_p z where
    the edge (i, j) of W becomes (perm_i, perm_j). So one sparse product of the stacked relabelled weights
    with the (unpermuted) values gives every permutation at once, without moving values.
    """
    b = perms.shape[0]
    offs = (torch.arange(b, device=perms.device) * n)[:, None]
    r = (perms[:, rows] + offs).reshape(-1)
    c = perms[:, cols].reshape(-1)
    wb = torch.sparse_coo_tensor(torch.stack([r, c]), vals.repeat(b), (b * n, n)).coalesce()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return wb.to_sparse_csr()


def autocorr_permutation_scores(x, w: sp.spmatrix, device: torch.device, *, n_perms: int, seed: int,
                                mode: str = "moran", chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """Scores of every column of ``x`` under ``n_perms`` random row permutations: ``(n_perms, g)``.

    Permutation p moves the values by ``permutations(n, n_perms, seed)[p]`` (x_p = x[perm]) for every
    column, so results do not depend on the device or on the chunking. Batches of permutations are one
    product of the stacked relabelled weights with a chunk of centred values.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, not {mode!r}")
    n, g = x.shape
    n_perms = int(n_perms)
    w = sp.coo_matrix(w, dtype=np.float64)
    s0 = float(w.sum())
    rows = torch.as_tensor(w.row.astype(np.int64), device=device)
    cols = torch.as_tensor(w.col.astype(np.int64), device=device)
    vals = torch.as_tensor(w.data, dtype=torch.float64, device=device)
    rc = None
    if mode == "geary":
        rc_np = np.asarray(w.sum(axis=1)).ravel() + np.asarray(w.sum(axis=0)).ravel()
        rc = torch.as_tensor(rc_np, dtype=torch.float64, device=device)
    perms = permutations(n, n_perms, seed).to(device)
    get = _column_getter(x)
    # dense pieces of a step: z (n x gc) and the product / its elementwise product (2 x B*n x gc)
    step = _gene_chunk(n, g, chunk_bytes // 4, copies=2)
    batch = max(1, min(n_perms, (chunk_bytes // 2) // (n * 8 * 2 * step)))
    # relabelled weights, kept across gene chunks when they fit in the budget (~24 bytes per entry)
    keep = w.nnz * n_perms * 24 <= chunk_bytes
    cache: dict[int, tuple] = {}

    def batch_weights(p0: int, p1: int):
        if p0 in cache:
            return cache[p0]
        pb = perms[p0:p1]
        out_w = _stacked_permuted_weights(rows, cols, vals, pb, n)
        out_rc = None
        if rc is not None:  # sum_i rc_i z[perm_i]^2 = sum_a rc_p[a] z_a^2 with rc_p[perm_i] = rc_i
            out_rc = torch.empty((p1 - p0, n), dtype=torch.float64, device=device)
            out_rc.scatter_(1, pb, rc.expand(p1 - p0, n))
        if keep:
            cache[p0] = (out_w, out_rc)
        return out_w, out_rc

    out = np.empty((n_perms, g))
    for a in range(0, g, step):  # chunks of genes
        b = min(g, a + step)
        gc = b - a
        z = torch.as_tensor(get(a, b), device=device)
        z = z - z.mean(dim=0, keepdim=True)
        z2 = (z * z).sum(dim=0)
        for p0 in range(0, n_perms, batch):  # batches of permutations, one sparse product each
            p1 = min(n_perms, p0 + batch)
            wb, rcp = batch_weights(p0, p1)
            num = ((wb @ z).view(p1 - p0, n, gc) * z[None]).sum(dim=1)
            if mode == "moran":
                s = (n / s0) * num / z2
            else:
                side = rcp @ (z * z)
                s = (n - 1) / (2.0 * s0) * (side - 2.0 * num) / z2
            out[p0:p1, a:b] = s.cpu().numpy()
    return out


def analytic_moments(mode: str, n: int, s0: float, s1: float, s2: float,
                     kurtosis: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``(expected, var_normality, var_randomization per variable)`` (Cliff & Ord 1981)."""
    n = float(n)
    s02 = s0 * s0
    k = np.asarray(kurtosis, dtype=np.float64)
    if mode == "moran":
        e = -1.0 / (n - 1.0)
        v_norm = (n * n * s1 - n * s2 + 3.0 * s02) / ((n - 1.0) * (n + 1.0) * s02) - e * e
        num = n * ((n * n - 3 * n + 3) * s1 - n * s2 + 3 * s02) - k * ((n * n - n) * s1 - 2 * n * s2 + 6 * s02)
        v_rand = num / ((n - 1) * (n - 2) * (n - 3) * s02) - e * e
    elif mode == "geary":
        e = 1.0
        v_norm = ((2.0 * s1 + s2) * (n - 1.0) - 4.0 * s02) / (2.0 * (n + 1.0) * s02)
        a = (n - 1) * s1 * (n * n - 3 * n + 3 - (n - 1) * k)
        b = 0.25 * (n - 1) * s2 * (n * n + 3 * n - 6 - (n * n - n + 2) * k)
        c = s02 * (n * n - 3 - (n - 1) ** 2 * k)
        v_rand = (a - b + c) / (n * (n - 2) * (n - 3) * s02)
    else:
        raise InputError(f"mode must be one of {MODES}, not {mode!r}")
    return e, float(v_norm), v_rand


def normal_pvalue(score: np.ndarray, expected: float, var, two_tailed: bool = False) -> np.ndarray:
    """Normal-approximation p-value, one-tailed in the direction of the deviation (x2 if two-tailed)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.asarray(score) - expected) / np.sqrt(var)
    p = stats.norm.sf(np.abs(z))
    return p * 2.0 if two_tailed else p


def permutation_pvalues(score: np.ndarray, sims: np.ndarray, two_tailed: bool = False) -> dict[str, np.ndarray]:
    """Pseudo p-values from permutation scores ``sims`` (n_perms x g).

    ``pval_sim = (min(#{sim >= score}, #{sim < score}) + 1) / (n_perms + 1)`` (the smaller tail; scores
    within 1e-9 relative of the observed one count as ties, i.e. as >=),
    ``pval_z_sim`` from the normal approximation with the permutations' mean and standard deviation,
    ``var_sim`` their variance.
    """
    n_perms = sims.shape[0]
    # permutation scores equal to the observed one up to rounding (frequent for genes seen in a few spots,
    # whose null is discrete) count as ties, so that results do not depend on summation order
    tol = 1e-9 * (np.abs(score) + sims.std(axis=0))
    larger = (sims >= (score - tol)[None, :]).sum(axis=0)
    tail = np.minimum(larger, n_perms - larger)
    p_sim = (tail + 1.0) / (n_perms + 1.0)
    mean = sims.mean(axis=0)
    var = sims.var(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (score - mean) / np.sqrt(var)
    p_z = stats.norm.sf(np.abs(z))
    if two_tailed:
        p_z = p_z * 2.0
        p_sim = np.minimum(1.0, p_sim * 2.0)
    p_sim = np.where(np.isnan(score), np.nan, p_sim)
    return {"pval_z_sim": p_z, "pval_sim": p_sim, "var_sim": var}


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaNs stay NaN and do not count as tests."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    adj = pv[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out
