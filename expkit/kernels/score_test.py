"""SpatialDE2's variance-component score test, for all genes at once (arrays in, arrays out).

Model (Kats, Vento-Tormo & Stegle 2021): per gene, ``y_i ~ NB(mean m_i = s_i exp(b), dispersion a)``
under the null, and a variance component ``tau K`` on the log mean under the alternative. With
``W = m / (1 + a m)`` (the IRLS weights), ``z = W (y / m - 1) = (y - m) / (1 + a m)`` and
``P = diag(W) - W W' / sum(W)``:

- statistic      ``U = 1/2 z' K z``
- expectation    ``e = 1/2 tr(P K) = 1/2 (sum_i W_i K_ii - W' K W / sum(W))``
- information    ``I = I_tt - I_tq^2 / I_qq`` with, following SpatialDE2's code,
  ``I_tt = 1/2 ||P K||_F^2`` (the Frobenius norm, not ``1/2 tr(P K P K)``),
  ``I_tq = 1/2 sum(P o P K)``, ``I_qq = 1/2 ||P||_F^2``;
- p-value        Satterthwaite: ``U / kappa ~ chi2(nu)``, ``kappa = I / (2 e)``, ``nu = 2 e^2 / I``
  (in log space: :mod:`expkit.kernels.pvalues`).

All gene-dependent quantities are products of the kernel with ``z`` (one column per gene) and
gene-independent products of the kernel with a small basis of the weight vectors (see
:func:`weight_basis`); ``||P K||_F^2`` is expanded as
``sum_i W_i^2 q_i - 2/S (K W^2)'(K W) + sum(W^2) |K W|^2 / S^2`` with ``q = rowsum(K o K)``.
"""
from __future__ import annotations

import math

import torch

from .device import single_thread  # noqa: F401  (used below, also re-exported)

__all__ = [
    "fit_nb_null", "fit_normal_null", "weight_basis", "KernelProducts", "score_statistics",
]


# ----------------------------------------------------------------------------------------------
# null models
# ----------------------------------------------------------------------------------------------
def _lgamma_ratio(yv, r):
    """``lgamma(y + r) - lgamma(r) - y log r`` and the digamma / trigamma differences
    ``psi(r) - psi(y + r)``, ``psi'(r) - psi'(y + r)``, accurate also for ``r >> y`` (a -> 0), where the
    direct forms cancel:

    - ``r > 1e6 max(y, 1)``, integer ``y``: the sums ``sum_k log(1 + k/r)``, ``sum_k 1/(r + k)`` and
      ``sum_k 1/(r + k)^2`` over ``k < y`` expanded in ``1/r`` with ``S_p = sum_k k^p``;
    - otherwise ``r >= 1e3``: the differences of Stirling's series for ``lgamma``, ``psi`` and ``psi'`` at
      ``r`` and ``r + y``, written with ``log1p(y / r)`` (absolute error ~1e-16 y; the direct forms lose
      ``eps lgamma(r)`` ~ 3e-9 at ``r = 1e6``, and ``r (psi(r) - psi(y + r))``, in the gradient in ``log a``,
      ``eps r``: that noise stopped the fit of some near-Poisson genes far from their optimum);
    - below: the direct forms.
    """
    yv, r = torch.broadcast_tensors(yv, r)
    lg, psi, tri = torch.empty_like(r), torch.empty_like(r), torch.empty_like(r)
    big = (r > 1e6 * torch.clamp(yv, min=1.0)) & (yv == torch.round(yv))
    mid = ~big & (r >= 1e3)
    low = ~(big | mid)
    # (each form only where it is used)
    if bool(big.any()):
        y, inv = yv[big], 1.0 / r[big]
        s1 = y * (y - 1.0) / 2.0
        s2 = (y - 1.0) * y * (2.0 * y - 1.0) / 6.0
        lg[big] = s1 * inv - s2 * inv ** 2 / 2.0 + s1 * s1 * inv ** 3 / 3.0
        psi[big] = -(y * inv - s1 * inv ** 2 + s2 * inv ** 3)
        tri[big] = y * inv ** 2 - 2.0 * s1 * inv ** 3 + 3.0 * s2 * inv ** 4
    if bool(mid.any()):
        y, rm = yv[mid], r[mid]
        q = rm + y
        l1p = torch.log1p(y / rm)
        i1, j1 = 1.0 / rm, 1.0 / q
        i2, j2 = i1 * i1, j1 * j1
        # lgamma(x) = (x - 1/2) log x - x + log(2 pi)/2 + 1/(12x) - 1/(360x^3) + 1/(1260x^5) - 1/(1680x^7) + ...
        lg[mid] = ((q - 0.5) * l1p - y
                   + (j1 * (1.0 / 12 - j2 * (1.0 / 360 - j2 * (1.0 / 1260 - j2 / 1680)))
                      - i1 * (1.0 / 12 - i2 * (1.0 / 360 - i2 * (1.0 / 1260 - i2 / 1680)))))
        # psi(x) = log x - 1/(2x) - 1/(12x^2) + 1/(120x^4) - 1/(252x^6) + 1/(240x^8) - ...
        psi[mid] = (-l1p - 0.5 * (i1 - j1)
                    - (i2 * (1.0 / 12 - i2 * (1.0 / 120 - i2 * (1.0 / 252 - i2 / 240)))
                       - j2 * (1.0 / 12 - j2 * (1.0 / 120 - j2 * (1.0 / 252 - j2 / 240)))))
        # psi'(x) = 1/x + 1/(2x^2) + 1/(6x^3) - 1/(30x^5) + 1/(42x^7) - 1/(30x^9) + ...
        d1 = y * i1 * j1                                            # 1/r - 1/(r + y)
        tri[mid] = (d1 + 0.5 * d1 * (i1 + j1)
                    + (i1 * i2 * (1.0 / 6 - i2 * (1.0 / 30 - i2 * (1.0 / 42 - i2 / 30)))
                       - j1 * j2 * (1.0 / 6 - j2 * (1.0 / 30 - j2 * (1.0 / 42 - j2 / 30)))))
    if bool(low.any()):
        y, rd = yv[low], r[low]
        lg[low] = torch.lgamma(y + rd) - torch.lgamma(rd) - y * torch.log(rd)
        psi[low] = torch.digamma(rd) - torch.digamma(y + rd)
        tri[low] = torch.polygamma(1, rd) - torch.polygamma(1, y + rd)
    return lg, psi, tri


class _SpotSums:
    """The count-free sums over spots of the NB null as functions of ``t = a exp(b)`` (one per gene):
    ``F0 = sum_i log1p(s_i t)``, ``F1 = sum_i s_i / (1 + s_i t)``, ``F2 = sum_i s_i / (1 + s_i t)^2``,
    ``F3 = sum_i s_i^2 / (1 + s_i t)^2``. They are the same functions of one variable for every gene:
    evaluated by piecewise Chebyshev interpolation in ``log t`` (analytic in a strip of half-width pi,
    so intervals of width 1 and 24 nodes give ~1e-15 relative), a Taylor series in ``t`` where
    ``t max(s) < 1e-6`` and directly (``n x genes``) above the table."""

    def __init__(self, s: torch.Tensor, width: float = 1.0, nodes: int = 24):
        self.s = s
        self.s2 = s * s
        smax, smin = float(s.max()), float(s.min())
        self.t_small = 1e-6 / smax
        self.u0 = math.log(self.t_small)
        self.u1 = math.log(1e6 / smin)
        self.w, self.N = width, nodes
        nint = int(math.ceil((self.u1 - self.u0) / width))
        self.u1 = self.u0 + nint * width
        dev, dt = s.device, torch.float64
        k = torch.arange(nodes, device=dev, dtype=dt)
        x = torch.cos(math.pi * (k + 0.5) / nodes)                                 # nodes in [-1, 1]
        centers = self.u0 + width * (torch.arange(nint, device=dev, dtype=dt) + 0.5)
        u = (centers[:, None] + 0.5 * width * x[None, :]).reshape(-1)
        vals = self.direct(torch.exp(u)).reshape(4, nint, nodes)                   # f, interval, node
        C = torch.cos(math.pi * k[:, None] * (k[None, :] + 0.5) / nodes) * (2.0 / nodes)  # k x m
        C[0] *= 0.5
        self.coef = torch.einsum("km,fjm->jkf", C, vals).contiguous()              # interval, k, f
        self.k = k
        self.P = [float((s ** p).sum()) for p in range(1, 6)]

    def direct(self, t: torch.Tensor) -> torch.Tensor:
        """4 x len(t), by dense passes over spots (chunks of genes)."""
        out = torch.empty(4, t.numel(), dtype=torch.float64, device=t.device)
        step = max(1, (1 << 22) // max(self.s.numel(), 1))
        for a in range(0, t.numel(), step):
            tt = t[a:a + step]
            D = torch.outer(self.s, tt)
            out[0, a:a + step] = torch.log1p(D).sum(0)
            inv = D.add_(1.0).reciprocal_()
            out[1, a:a + step] = self.s @ inv
            inv.mul_(inv)
            out[2, a:a + step] = self.s @ inv
            out[3, a:a + step] = self.s2 @ inv
        return out

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``F0..F3`` at ``t`` (4 x len(t))."""
        t = t.to(torch.float64)
        out = torch.empty(4, t.numel(), dtype=torch.float64, device=t.device)
        u = torch.log(t)
        small = t <= self.t_small
        big = ~small & ~(u < self.u1)                                              # (also NaN / inf)
        mid = ~small & ~big
        if bool(small.any()):
            ts = t[small]
            P1, P2, P3, P4, P5 = self.P
            out[0, small] = ts * (P1 - ts * (P2 / 2.0 - ts * (P3 / 3.0 - ts * P4 / 4.0)))
            out[1, small] = P1 - ts * (P2 - ts * (P3 - ts * P4))
            out[2, small] = P1 - ts * (2.0 * P2 - ts * (3.0 * P3 - ts * 4.0 * P4))
            out[3, small] = P2 - ts * (2.0 * P3 - ts * (3.0 * P4 - ts * 4.0 * P5))
        if bool(mid.any()):
            um = u[mid]
            j = ((um - self.u0) / self.w).floor().clamp(0, self.coef.shape[0] - 1).long()
            x = (2.0 * (um - self.u0 - (j.to(um.dtype) + 0.5) * self.w) / self.w).clamp(-1.0, 1.0)
            T = torch.cos(self.k[None, :] * torch.acos(x)[:, None])                 # genes x k
            out[:, mid] = torch.einsum("gk,gkf->fg", T, self.coef[j])
        if bool(big.any()):
            out[:, big] = self.direct(t[big])
        return out


def _colptr(col: torch.Tensor, k: int) -> torch.Tensor:
    """Start offsets (k + 1) of the genes in an array sorted by gene."""
    cnt = torch.bincount(col, minlength=k)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=col.device), torch.cumsum(cnt, 0)])


def _ranges(ptr: torch.Tensor, sel: torch.Tensor):
    """For the genes ``sel`` of a gene-sorted array with offsets ``ptr``: the position of each gene in
    ``sel`` per element, and the element indices."""
    start, cnt = ptr[sel], ptr[sel + 1] - ptr[sel]
    local = torch.repeat_interleave(torch.arange(sel.numel(), device=sel.device), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    elem = torch.arange(local.numel(), device=sel.device) - first[local] + start[local]
    return local, elem


def _nb_pairs(y: torch.Tensor):
    """Non-zero counts of ``y`` (n x g) as triplets ``(row, col, value)`` and as unique ``(col, value)``
    pairs with multiplicities (the gamma-function terms depend on the counts only through these)."""
    idx = torch.nonzero(y.T > 0)                      # column-major: non-zeros sorted by gene
    rows, cols = idx[:, 1], idx[:, 0]
    return _pairs(rows, cols, y[rows, cols], y.shape[1])


def _pairs(rows, cols, vals, g):
    """(see _nb_pairs; ``cols`` sorted)"""
    if vals.numel() and bool((vals == torch.round(vals)).all()) and float(vals.max()) < 2 ** 40 / max(g, 1):
        base = int(vals.max()) + 1
        key, cnt = torch.unique(cols * base + vals.long(), return_counts=True)
        pcol, pval, pcnt = key // base, (key % base).to(vals.dtype), cnt.to(vals.dtype)
    else:
        pcol, pval, pcnt = cols, vals, torch.ones_like(vals)
    return rows, cols, vals, pcol, pval, pcnt


def fit_nb_null(y: torch.Tensor, s: torch.Tensor, **kw):
    """Maximum-likelihood ``(b, a)`` of the NB null for every column of ``y`` (see :func:`_fit_nb_null`;
    on CPU on one thread: the work is a loop of small vector operations)."""
    with single_thread(y.device):
        y = y.to(torch.float64)
        return _fit_nb_null(_nb_pairs(y), y.shape[0], y.shape[1], s, **kw)


def fit_nb_null_csc(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n: int,
                    s: torch.Tensor, **kw):
    """:func:`fit_nb_null` for counts given as a CSC matrix (n x g; ``indptr``, ``indices``, ``data``)
    without densifying; explicit zeros are dropped."""
    with single_thread(data.device):
        g = indptr.numel() - 1
        cols = torch.repeat_interleave(torch.arange(g, device=data.device), indptr.diff())
        keep = data > 0
        rows, cols, vals = indices[keep].long(), cols[keep], data[keep].to(torch.float64)
        return _fit_nb_null(_pairs(rows, cols, vals, g), n, g, s, **kw)


NULL_FITS = ("mle", "spatialde2")


def _fit_nb_null(nz, n: int, g: int, s: torch.Tensor, *, max_iter: int = 60,
                 min_alpha: float = 1e-8, max_alpha: float = 1e6, spot_sums: "_SpotSums | None" = None,
                 null_fit: str = "mle"):
    """Maximum-likelihood ``(b, a)`` of ``y_i ~ NB(s_i exp(b), a)`` for every column of ``y`` at once.

    Damped Newton on ``(b, log a)`` with the exact Hessian and a step-halving line search, for all
    genes at once (a gradient step where the Hessian is not negative definite). The gamma-function
    terms are evaluated once per distinct (gene, count) pair, the count-weighted sums on the non-zero
    counts only, and the count-free sums over spots (functions of ``t = a exp(b)`` and ``s``) as dense
    ``n x genes`` passes plus matrix-vector products. ``a`` is bounded below by ``min_alpha`` (1e-8,
    SpatialDE2's floor for its starting value; the Poisson limit ``a -> 0`` has no finite optimum) and
    above by ``max_alpha``. Starts from SpatialDE2's values: ``log mean(y / s)`` and the DESeq
    moments dispersion. Returns ``beta, alpha, converged``; all-zero columns give NaN.

    ``null_fit="spatialde2"`` reproduces SpatialDE2's fits: genes whose moments dispersion
    ``(var(y/s) - mean(1/s) mean(y/s)) / mean(y/s)^2`` (population variance) is ``<= min_alpha`` keep
    ``a = min_alpha`` (SpatialDE2's BFGS starts there and does not leave it: the gradient in ``log a`` is
    O(a)) and only ``b`` is fitted (the same iteration with the step in ``log a`` masked); the other genes
    get the maximum-likelihood fit as with ``"mle"``.
    """
    if null_fit not in NULL_FITS:
        raise ValueError(f"null_fit must be one of {NULL_FITS}, not {null_fit!r}")
    s = s.to(torch.float64)
    dev = s.device
    rows_all, cols_all, vals_all, pcol_all, pval_all, pcnt_all = nz
    # moments of y / s from the non-zeros (two-pass: the zeros contribute mean^2 each)
    sy = vals_all / s[rows_all]
    zeros64 = torch.zeros(g, dtype=torch.float64, device=dev)
    mean = zeros64.clone().index_add_(0, cols_all, sy) / n
    nnz_g = torch.bincount(cols_all, minlength=g).to(torch.float64)
    var = (zeros64.clone().index_add_(0, cols_all, (sy - mean[cols_all]) ** 2) + (n - nnz_g) * mean ** 2) / n
    del sy
    disp = (var - (1.0 / s).mean() * mean) / mean ** 2
    lo, hi = math.log(min_alpha), math.log(max_alpha)
    empty = ~(mean > 0)
    beta = torch.log(torch.where(empty, torch.ones_like(mean), mean))
    phi = torch.log(torch.clamp(torch.nan_to_num(disp, nan=1.0), min=min_alpha, max=max_alpha))
    # SpatialDE2's compatibility: log a held at its start (the floor) where the moments estimate is <= it
    pinned = (~(disp > min_alpha) & (mean > 0)) if null_fit == "spatialde2" else None
    ysum_all = torch.zeros(g, dtype=torch.float64, device=dev).index_add_(0, cols_all, vals_all)
    if spot_sums is None:  # (callers fitting several gene chunks with the same s pass one in)
        spot_sums = _SpotSums(s)
    smax = float(s.max())
    active = ~empty
    converged = empty.clone()
    fallback = torch.zeros(g, dtype=torch.bool, device=dev)
    ll = torch.full((g,), -math.inf, dtype=torch.float64, device=dev)
    cur = {"idx": None}

    def subset(idx):
        """Non-zeros and pairs of the genes ``idx``, with local column positions."""
        pos = torch.full((g,), -1, dtype=torch.long, device=dev)
        pos[idx] = torch.arange(idx.numel(), device=dev)
        m1 = pos[cols_all] >= 0
        m2 = pos[pcol_all] >= 0
        rv = rows_all[m1]
        col, pcol = pos[cols_all[m1]], pos[pcol_all[m2]]
        k = idx.numel()
        cur.update(idx=idx, col=col, yv=vals_all[m1], sv=s[rv], pcol=pcol, pval=pval_all[m2],
                   pcnt=pcnt_all[m2], ptr=_colptr(col, k), pptr=_colptr(pcol, k))
        return cur

    def colsum(c, v, k):
        return torch.zeros(k, dtype=torch.float64, device=dev).index_add_(0, c, v)

    def loglik(sub, sel, b, p):
        """log-likelihood (up to a constant) of the genes at local positions ``sel`` of ``sub``."""
        k = sel.numel()
        kk = sub["idx"].numel()
        a = torch.exp(p)
        r = 1.0 / a
        t = a * torch.exp(b)
        Lsum = spot_sums(t)[0]
        if 2 * k >= kk:  # over all non-zeros of the working set (t = 0: no contribution)
            tf = torch.zeros(kk, dtype=torch.float64, device=dev)
            tf[sel] = t
            rf = torch.ones(kk, dtype=torch.float64, device=dev)
            rf[sel] = r
            yL = colsum(sub["col"], sub["yv"] * torch.log1p(tf[sub["col"]] * sub["sv"]), kk)[sel]
            lg, _, _ = _lgamma_ratio(sub["pval"], rf[sub["pcol"]])
            lg = colsum(sub["pcol"], lg * sub["pcnt"], kk)[sel]
        else:  # only the non-zeros of the selected genes (sorted by gene: ranges of the arrays)
            c1, e1 = _ranges(sub["ptr"], sel)
            c2, e2 = _ranges(sub["pptr"], sel)
            yL = colsum(c1, sub["yv"][e1] * torch.log1p(t[c1] * sub["sv"][e1]), k)
            lg, _, _ = _lgamma_ratio(sub["pval"][e2], r[c2])
            lg = colsum(c2, lg * sub["pcnt"][e2], k)
        return lg - r * Lsum - yL + ysum_all[sub["idx"][sel]] * b

    for it in range(max_iter):
        n_act = int(active.sum())
        if n_act == 0:
            break
        # working set: a superset of the active genes, renewed when it has shrunk by a third
        if cur["idx"] is None or n_act < 0.67 * cur["idx"].numel():
            sub = subset(torch.nonzero(active).squeeze(1))
        idx = sub["idx"]
        k = idx.numel()
        b, p = beta[idx], phi[idx]
        ysum = ysum_all[idx]
        if it == 0:
            ll[idx] = loglik(sub, torch.arange(k, device=dev), b, p)
        a = torch.exp(p)
        r = 1.0 / a
        mu = torch.exp(b)
        t = a * mu
        # count-free sums over spots (functions of t = a mu alone)
        Lsum, S_si, S_si2, S_s2i2 = spot_sums(t).unbind(0)
        # count-weighted sums on the non-zeros
        col, yv, sv = sub["col"], sub["yv"], sub["sv"]
        dv = 1.0 + t[col] * sv
        Y_i = colsum(col, yv / dv, k)        # sum_i y_i / (1 + a m_i)
        Y_si2 = colsum(col, yv * sv / (dv * dv), k)
        g_b = Y_i - mu * S_si                # sum (y - m) / (1 + a m)
        h_bb = -(mu * S_si2 + a * mu * Y_si2)
        ymm = mu * Y_si2 - mu * mu * S_s2i2  # sum (y - m) m / (1 + a m)^2
        _, psi_d, tri_d = _lgamma_ratio(sub["pval"], r[sub["pcol"]])
        dpsi = colsum(sub["pcol"], psi_d * sub["pcnt"], k)
        dtri = colsum(sub["pcol"], tri_d * sub["pcnt"], k)
        g_p = r * (dpsi + Lsum) + g_b
        h_pp = -r * (dpsi + Lsum) - r ** 2 * dtri + mu * S_si - a * ymm
        h_bp = -(a * ymm)
        # freeze log a at its bounds when the gradient points outside; below a * max(m) = 1e-10 the
        # weights W = m / (1 + a m) no longer change (the Poisson limit), so that counts as the bound
        mmax = mu * smax
        at_lo = ((p <= lo + 1e-12) | (a * mmax < 1e-10)) & (g_p < 0)
        at_hi = (p >= hi - 1e-12) & (g_p > 0)
        frozen = at_lo | at_hi
        if pinned is not None:
            frozen = frozen | pinned[idx]
        fb = fallback[idx]
        det = h_bb * h_pp - h_bp ** 2
        negdef = (h_bb < 0) & (det > 0) & ~fb
        sb = h_bb.abs().clamp_min(1e-300)
        spp = h_pp.abs().clamp_min(1e-300)
        d_b = torch.where(negdef, -(h_pp * g_b - h_bp * g_p) / det, g_b / sb)
        d_p = torch.where(negdef, -(h_bb * g_p - h_bp * g_b) / det, g_p / spp)
        # converged: gradient zero to rounding, and the Newton step would gain less than
        # 1e-12 (1 + sum y) in log-likelihood (the Newton decrement; where log a is pinned at a bound,
        # that of b alone). A small gradient alone is not enough: near a -> 0 the log-likelihood is
        # ~ A + c a - d a^2, so the gradient in log a is O(a) however far the optimum is (a fit could stop
        # at a = 1e-6 with the optimum at a = 1e-3, or above the 1e-8 bound for an under-dispersed gene)
        gscale = 1e-9 * (1.0 + ysum)
        ltol = 1e-12 * (1.0 + ysum)
        gain_newton = 0.5 * (g_b * d_b + g_p * d_p)
        gain_b = 0.5 * g_b * g_b / sb
        done = (g_b.abs() < gscale) & ((frozen & (gain_b < ltol))
                                       | (negdef & (g_p.abs() < gscale) & (gain_newton < ltol)))
        done = done | ~active[idx]           # (converged earlier: kept as is)
        d_b = torch.where(frozen, g_b / sb, d_b)
        d_p = torch.where(frozen, torch.zeros_like(d_p), d_p)
        # near a -> 0 the log-likelihood is ~ A -+ c a, so Newton moves log a by about -1 (towards the
        # Poisson limit) or a gradient step by about +1 (away from it) per iteration: take longer
        # steps there; the line search halves them back when they overshoot
        near0 = a * mmax < 1e-2
        d_p = torch.where(near0 & negdef & (d_p < -0.9) & (g_p < 0), 4.0 * d_p, d_p)
        d_p = torch.where(near0 & ~negdef & (g_p > 0), 2.0 * d_p.abs().clamp_min(0.5), d_p)
        d_p = torch.where(frozen, torch.zeros_like(d_p), d_p)   # (again: after the near-0 steps)
        d_p = d_p.clamp(-8.0, 5.0)
        d_b = d_b.clamp(-5.0, 5.0)
        old = ll[idx]
        step = torch.ones_like(b)
        # close to the optimum (Hessian negative definite, short step) the Newton step is taken as is
        # (no likelihood evaluation); its log-likelihood is then unknown until the next line search
        trust = negdef & ~frozen & (d_b.abs() < 0.05) & (d_p.abs() < 0.05) & ~done
        accepted = done | trust
        new_b, new_p, new_ll = b.clone(), p.clone(), old.clone()
        new_b[trust] = b[trust] + d_b[trust]
        new_p[trust] = (p[trust] + d_p[trust]).clamp(lo, hi)
        new_ll[trust] = -math.inf
        for _ls in range(25):
            todo = torch.nonzero(~accepted).squeeze(1)
            if todo.numel() == 0:
                break
            cb = b[todo] + step[todo] * d_b[todo]
            cp = (p[todo] + step[todo] * d_p[todo]).clamp(lo, hi)
            cl = loglik(sub, todo, cb, cp)
            ok = torch.isfinite(cl) & (cl > old[todo])
            sel = todo[ok]
            new_b[sel], new_p[sel], new_ll[sel] = cb[ok], cp[ok], cl[ok]
            accepted[sel] = True
            step[todo[~ok]] *= 0.5
        beta[idx], phi[idx], ll[idx] = new_b, new_p, new_ll
        # no step along the Newton direction improves: a gradient step next time; when that fails
        # too, the likelihood is flat to rounding (converged)
        failed = ~accepted
        stuck = failed & fb
        fallback[idx] = failed & ~fb
        done = done | stuck
        done = done & active[idx]
        converged[idx[done]] = True
        active[idx[done]] = False
    alpha = torch.exp(phi)
    beta = torch.where(empty, torch.full_like(beta, math.nan), beta)
    alpha = torch.where(empty, torch.full_like(alpha, math.nan), alpha)
    return beta, alpha, converged


def fit_normal_null(y: torch.Tensor):
    """Gaussian null ``y_i ~ N(mu, sigma^2)``: maximum-likelihood mean and variance per column."""
    y = y.to(torch.float64)
    return y.mean(0), y.var(0, unbiased=False)


# ----------------------------------------------------------------------------------------------
# weight basis
# ----------------------------------------------------------------------------------------------
def weight_basis(W: torch.Tensor, order: torch.Tensor | None = None, *, n_sample: int = 256,
                 rtol: float = 1e-13) -> torch.Tensor:
    """An orthonormal basis (n x p) of the span of the weight columns ``W`` (n x g).

    Under the NB null ``W_g = mu_g s / (1 + t_g s)`` is a one-parameter family (``t = a mu``), so its
    span is numerically low dimensional; the basis is built from ``n_sample`` columns spread over
    ``order`` (e.g. ``t``) by an SVD. Callers check the projection residual of every gene.
    """
    g = W.shape[1]
    if order is None:
        order = torch.arange(g, device=W.device, dtype=torch.float64)
    srt = torch.argsort(order)
    pick = srt[torch.unique(torch.linspace(0, g - 1, min(g, n_sample), device=W.device).round().long())]
    C = W[:, pick]
    C = C / torch.linalg.vector_norm(C, dim=0).clamp_min(1e-300)
    U, S, _ = torch.linalg.svd(C, full_matrices=False)
    keep = S > S[0] * rtol
    return U[:, keep].contiguous()


def projection_residual(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Relative residual ``|W - B B'W| / |W|`` per column."""
    R = W - B @ (B.T @ W)
    # (plain sums of squares: torch's vector_norm is several times slower on CPU; W is O(1)..O(1e3))
    return (R * R).sum(0).sqrt() / (W * W).sum(0).sqrt().clamp_min(1e-300)


class KernelProducts:
    """Gene-independent products of one kernel operator with the weight bases ``B1`` (for ``W``)
    and ``B2`` (for ``W^2``)."""

    def __init__(self, op, B1: torch.Tensor, B2: torch.Tensor):
        KB1, KB2 = op.mm(B1), op.mm(B2)
        self.op = op
        self.B1, self.B2 = B1, B2
        self.M11 = B1.T @ KB1          # W' K W
        self.M21 = B2.T @ KB1          # (W^2)' K W
        self.N11 = KB1.T @ KB1         # |K W|^2
        self.N21 = KB2.T @ KB1         # (K W^2)' (K W)
        self.d = op.diag()
        self.q = op.sq_rowsum()


def score_statistics(prod: KernelProducts, Z: torch.Tensor, W: torch.Tensor, A1: torch.Tensor,
                     A2: torch.Tensor, sums: dict, W2: torch.Tensor | None = None):
    """``U, e, I`` (each of length g) for one kernel; ``A1 = B1' W``, ``A2 = B2' W^2``;
    ``sums`` holds ``S = sum W``, ``S2 = sum W^2``, ``Iqq``; ``W2 = W^2`` (computed when not given)."""
    S, S2, Iqq = sums["S"], sums["S2"], sums["Iqq"]
    U = 0.5 * prod.op.quad(Z)
    if W2 is None:
        W2 = W * W
    dw = prod.d @ W
    w2d = prod.d @ W2
    w2q = prod.q @ W2
    MA = prod.M11 @ A1
    wv = (A1 * MA).sum(0)
    w2v = (A2 * (prod.M21 @ A1)).sum(0)
    vv = (A1 * (prod.N11 @ A1)).sum(0)
    uv = (A2 * (prod.N21 @ A1)).sum(0)
    e = 0.5 * (dw - wv / S)
    Itt = 0.5 * (w2q - 2.0 * uv / S + S2 * vv / S ** 2)
    Itq = 0.5 * (w2d - 2.0 * w2v / S + S2 * wv / S ** 2)
    I = Itt - Itq ** 2 / Iqq
    return U, e, I


def weight_sums(W: torch.Tensor) -> dict:
    S = W.sum(0)
    S2 = (W * W).sum(0)
    S3 = (W * W * W).sum(0)
    Iqq = 0.5 * (S2 - 2.0 * S3 / S + S2 ** 2 / S ** 2)
    return {"S": S, "S2": S2, "Iqq": Iqq}
