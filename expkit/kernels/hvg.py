"""Highly variable genes: local regression (loess) and the Seurat v3 variance-stabilising selection.

Loess (Cleveland & Devlin 1988; Cleveland, Grosse & Shyu 1992): the fit at a point ``v`` is the
weighted least-squares polynomial of degree 1 or 2 in ``x - v`` over the ``q = floor(span * n)``
nearest points, with tricube weights ``(1 - (d / h)^3)^3`` where ``h`` is the distance to the q-th
nearest point. ``surface="direct"`` evaluates that fit at every point. ``surface="interpolate"`` (the
default of the reference loess implementation, used by Seurat and scanpy) evaluates the fit and its
slope only at the vertices of a k-d tree of the x values (cells split at the median until they hold at
most ``floor(n * span * cell)`` points) and blends them with cubic Hermite interpolation.

Seurat v3 VST (Stuart et al. 2019, Cell 177:1888, "Comprehensive integration of single-cell data"):
per batch, fit log10(variance) ~ log10(mean) of the raw counts by loess, standardise each count by
the fitted standard deviation, clip at sqrt(n_cells) and take the variance of the clipped standardised
values; the top genes by that variance are the highly variable genes; over several batches genes are
ranked by the number of batches selecting them, then by their median within-batch rank.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError


def _local_fit(xs: torch.Tensor, ys: torch.Tensor, at: torch.Tensor, q: int,
               degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local polynomial fit value and slope at the points ``at`` (1-D), ``q`` nearest neighbours."""
    vals, slopes = [], []
    chunk = max(1, (1 << 21) // max(xs.numel(), 1))  # chunk x n intermediates of ~16 MB each
    eye = torch.eye(degree + 1, dtype=xs.dtype, device=xs.device)
    for start in range(0, at.numel(), chunk):
        v = at[start:start + chunk, None]                                   # m x 1
        d = (xs[None, :] - v)                                               # m x n
        ad = d.abs()
        h = torch.kthvalue(ad, q, dim=1).values                             # m
        h = torch.where(h > 0, h, torch.ones_like(h))
        u = ad / h[:, None]
        w = torch.where(u < 1, (1 - u**3) ** 3, torch.zeros_like(u))        # tricube
        t = d / h[:, None]                                                  # scaled design, |t| <= 1 in the window
        powers = [torch.ones_like(t)]
        for _ in range(2 * degree):
            powers.append(powers[-1] * t)
        mom = torch.stack([(w * p).sum(1) for p in powers], dim=1)          # m x (2 deg + 1)
        rhs = torch.stack([(w * powers[k] * ys[None, :]).sum(1) for k in range(degree + 1)], dim=1)
        idx = torch.arange(degree + 1, device=xs.device)
        a = mom[:, idx[:, None] + idx[None, :]]                             # m x (deg+1) x (deg+1) Hankel
        # a tiny ridge relative to the weight mass keeps degenerate windows (ties) solvable
        a = a + 1e-12 * mom[:, :1, None] * eye
        coef = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1)
        vals.append(coef[:, 0])
        slopes.append(coef[:, 1] / h)
    return torch.cat(vals), torch.cat(slopes)


def _kd_vertices(xs: np.ndarray, fc: int) -> np.ndarray:
    """Vertices of the 1-D k-d tree that reference loess builds over sorted ``xs``.

    The root cell is the data range widened by 0.5% at each end. A cell of points ``l..r`` with more
    than ``fc`` points is cut after its lower median ``m = (l + r) // 2``; when ``xs[m] == xs[m+1]``
    the cut moves to the nearest tie-free position, trying m+1, m-1, m+2, m-2, ... inside the cell.
    The cut value ``xs[m]`` becomes a vertex and the children are ``l..m`` and ``m+1..r``; a cut that
    falls on the cell's own boundary leaves the cell a leaf.
    """
    lo, hi = float(xs[0]), float(xs[-1])
    margin = 0.005 * max(hi - lo, 1e-10 * max(abs(lo), abs(hi)) + 1e-30)
    verts = [lo - margin, hi + margin]
    cells = [(0, xs.size - 1, verts[0], verts[1])]
    while cells:  # one pass per tree level; a tree has about log2(1 / (span * cell)) levels
        nxt = []
        for left, right, b_lo, b_hi in cells:
            if right - left + 1 <= fc:
                continue
            m = (left + right) // 2
            off = 0
            while left <= m + off < right:
                if xs[m + off] != xs[m + off + 1]:
                    m += off
                    break
                off = -off if off > 0 else 1 - off  # 0, 1, -1, 2, -2, ...
            cut = float(xs[m])
            if cut == b_lo or cut == b_hi:
                continue
            verts.append(cut)
            nxt += [(left, m, b_lo, cut), (m + 1, right, cut, b_hi)]
        cells = nxt
    return np.unique(np.asarray(verts))


def loess(x, y, *, span: float = 0.3, degree: int = 2, surface: str = "interpolate", cell: float = 0.2,
          device: torch.device | None = None) -> np.ndarray:
    """Fitted values of a one-predictor loess of ``y`` on ``x`` (gaussian family, no robustness steps).

    ``surface="interpolate"`` (default) fits at k-d tree vertices and interpolates (fast, the reference
    behaviour); ``"direct"`` fits at every point (exact local regression, O(n^2) in row chunks).
    """
    device = device or torch.device("cpu")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    q = int(math.floor(n * span))
    if degree not in (1, 2):
        raise InputError(f"loess degree must be 1 or 2, not {degree}")
    if q < degree + 1 or span > 1:
        raise InputError(f"loess span={span} with {n} points leaves {q} neighbours: need at least {degree + 1}"
                         " and span <= 1")
    order = np.argsort(x, kind="stable")
    xs_np = x[order]
    xs = torch.as_tensor(xs_np, device=device)
    ys = torch.as_tensor(y[order], device=device)
    if surface == "direct":
        fit, _ = _local_fit(xs, ys, xs, q, degree)
        out = np.empty(n)
        out[order] = fit.cpu().numpy()
        return out
    if surface != "interpolate":
        raise InputError(f"loess surface must be 'interpolate' or 'direct', not {surface!r}")
    fc = max(int(math.floor(n * span * cell)), 1)
    verts_np = _kd_vertices(xs_np, fc)
    verts = torch.as_tensor(verts_np, device=device)
    val, slope = _local_fit(xs, ys, verts, q, degree)
    # cubic Hermite blend between the bracketing vertices
    xt = torch.as_tensor(x, device=device)
    j = torch.clamp(torch.searchsorted(verts, xt, right=True) - 1, 0, verts.numel() - 2)
    x0, x1 = verts[j], verts[j + 1]
    hw = x1 - x0
    s = (xt - x0) / hw
    h00 = (1 + 2 * s) * (1 - s) ** 2
    h10 = s * (1 - s) ** 2
    h01 = s**2 * (3 - 2 * s)
    h11 = s**2 * (s - 1)
    fit = h00 * val[j] + h10 * hw * slope[j] + h01 * val[j + 1] + h11 * hw * slope[j + 1]
    return fit.cpu().numpy()


def _row_blocks(indptr: np.ndarray, max_nnz: int):
    """Row ranges [r0, r1) holding about ``max_nnz`` stored values each."""
    n = indptr.size - 1
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(indptr, indptr[r0] + max_nnz, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)
        yield r0, r1
        r0 = r1


def vst_variance(x, *, groups: np.ndarray | None = None, span: float = 0.3, surface: str = "interpolate",
                 device: torch.device | None = None, block_nnz: int = 1 << 20
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seurat v3 standardised variance of each gene, per group of cells, of a cells x genes count matrix.

    ``groups``: an integer code 0..B-1 per cell (None: one group). Returns ``(mean, variance,
    standardised variance)`` as B x genes float64 arrays (variance with ddof=1); genes constant within a
    group get a standardised variance of 0 there. All groups are summed in the same passes over the
    stored values (four passes, in row blocks of ``block_nnz`` values, so temporaries stay small):
    counts, means, centred sums of squares, then sums of squares of the clipped values.
    """
    device = device or torch.device("cpu")
    x = sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr()
    n_obs, n_genes = x.shape
    codes = np.zeros(n_obs, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    n_groups = int(codes.max()) + 1 if n_obs else 1
    n_b = np.bincount(codes, minlength=n_groups).astype(np.float64)
    if np.any(n_b < 2):
        raise InputError(f"seurat_v3 needs at least 2 cells per batch; batch sizes {n_b.astype(int).tolist()}")
    size = n_groups * n_genes
    blocks = list(_row_blocks(x.indptr, block_nnz))

    def block(r0, r1):
        lo, hi = x.indptr[r0], x.indptr[r1]
        vals = torch.as_tensor(np.asarray(x.data[lo:hi], dtype=np.float64), device=device)
        key = np.repeat(codes[r0:r1] * n_genes, np.diff(x.indptr[r0:r1 + 1])) + x.indices[lo:hi]
        return vals, torch.as_tensor(key, dtype=torch.int64, device=device)

    def scatter(fn):
        acc = torch.zeros(size, dtype=torch.float64, device=device)
        for r0, r1 in blocks:
            vals, key = block(r0, r1)
            acc.index_add_(0, key, fn(vals, key))
        return acc

    nb = torch.as_tensor(np.repeat(n_b, n_genes), device=device)
    nnz = scatter(lambda v, k: torch.ones_like(v))
    mean = scatter(lambda v, k: v) / nb
    ss = scatter(lambda v, k: (v - mean[k]) ** 2) + (nb - nnz) * mean**2
    var = ss / (nb - 1)
    mean_np = mean.cpu().numpy().reshape(n_groups, n_genes)
    var_np = var.cpu().numpy().reshape(n_groups, n_genes)
    keep = var_np > 0
    log_fit = np.zeros_like(mean_np)
    for g in range(n_groups):  # one loess per batch
        k = keep[g]
        if k.any():
            log_fit[g, k] = loess(np.log10(mean_np[g, k]), np.log10(var_np[g, k]), span=span, degree=2,
                                  surface=surface, device=device)
    reg_std = np.sqrt(10.0**log_fit)
    clip = torch.as_tensor((mean_np + reg_std * np.sqrt(n_b)[:, None]).ravel(), device=device)
    # sum over cells of (min(x, clip) - mean)^2, the implicit zeros contributing mean^2 each
    ssc = scatter(lambda v, k: (torch.minimum(v, clip[k]) - mean[k]) ** 2) + (nb - nnz) * mean**2
    norm_var = ssc.cpu().numpy().reshape(n_groups, n_genes) / ((n_b[:, None] - 1) * reg_std**2)
    norm_var[~keep] = 0.0
    return mean_np, var_np, norm_var


def _rank_desc(v: np.ndarray) -> np.ndarray:
    """0-based rank of each value in decreasing order (ties by position)."""
    order = np.argsort(-v, kind="stable")
    rank = np.empty(v.size, dtype=np.int64)
    rank[order] = np.arange(v.size)
    return rank


def seurat_v3(x, *, n_top_genes: int = 2000, batches: np.ndarray | None = None, span: float = 0.3,
              surface: str = "interpolate", batch_rank: str = "nbatches",
              device: torch.device | None = None) -> dict[str, np.ndarray]:
    """Seurat v3 highly variable genes of a cells x genes count matrix.

    ``batches``: a label per cell (None: one batch). Returns a dict of per-gene arrays: ``means``,
    ``vars`` (over all cells), ``vars_norm`` (mean over batches of the standardised variance),
    ``rank`` (median within-batch rank over the batches where the gene is in the top
    ``n_top_genes``; NaN for the others), ``nbatches`` (how many batches select it) and ``hvg`` (bool:
    the first ``n_top_genes``). ``batch_rank="nbatches"`` orders by ``nbatches`` descending then
    ``rank`` ascending (Seurat v3 ``SelectIntegrationFeatures``; scanpy flavor "seurat_v3_paper");
    ``"median_rank"`` by ``rank`` then ``nbatches`` (scanpy flavor "seurat_v3"). Ties keep gene order.
    """
    if batch_rank not in ("nbatches", "median_rank"):
        raise InputError(f"batch_rank must be 'nbatches' or 'median_rank', not {batch_rank!r}")
    x = sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr()
    n_genes = x.shape[1]
    n_top = min(int(n_top_genes), n_genes)
    codes = None
    if batches is not None:
        _, codes = np.unique(np.asarray(batches), return_inverse=True)
    means_b, vars_b, norm_vars = vst_variance(x, groups=codes, span=span, surface=surface, device=device)
    # pooled over the batches (Chan, Golub & LeVeque): total SS = sum of within SS + between SS
    n_b = np.bincount(codes, minlength=means_b.shape[0]).astype(np.float64)[:, None] if codes is not None \
        else np.array([[float(x.shape[0])]])
    means = (n_b * means_b).sum(0) / n_b.sum()
    ss = ((n_b - 1) * vars_b + n_b * (means_b - means) ** 2).sum(0)
    variances = ss / max(n_b.sum() - 1, 1)
    ranks = np.vstack([_rank_desc(nv) for nv in norm_vars]).astype(np.float64)
    ranks[ranks >= n_top] = np.nan
    nbatches = np.sum(~np.isnan(ranks), axis=0).astype(np.int64)
    with warnings.catch_warnings():  # all-NaN columns (genes never in a top set) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        median_rank = np.nanmedian(ranks, axis=0)
    key_rank = np.where(np.isnan(median_rank), np.inf, median_rank)
    keys = (key_rank, -nbatches) if batch_rank == "nbatches" else (-nbatches, key_rank)
    order = np.lexsort(keys)  # stable; the last key is the primary one
    hvg = np.zeros(n_genes, dtype=bool)
    hvg[order[:n_top]] = True
    return {"means": means, "vars": variances, "vars_norm": norm_vars.mean(axis=0),
            "rank": median_rank, "nbatches": nbatches, "hvg": hvg}
