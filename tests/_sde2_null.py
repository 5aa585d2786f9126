"""SpatialDE2's per-gene null fit, recovered from its per-kernel expectations ``e_tilde``.

SpatialDE2's reference files give, per gene and kernel, ``e = 1/2 tr(P K)`` with ``P = diag(W) - W W'/sum(W)``
and ``W = m / (1 + a m)``, ``m = s exp(b)``: a function of the null fit ``(b, a)`` alone. With ``t = a exp(b)``
and ``w(t) = s / (1 + t s)``, ``W = exp(b) w(t)``, so

    e_k(b, a) = exp(b) f_k(t),   f_k(t) = 1/2 (d_k'w - w'K_k w / 1'w),   d_k = diag(K_k).

Ten kernels give ten equations for two unknowns; this module solves the least-squares problem in
``(b, log a)`` on ``log e`` for all genes at once (a profile grid search for the start, then a batched
Levenberg-Marquardt with the analytic Jacobian). ``w(t)`` is a one-parameter family of vectors whose span
is numerically low dimensional, so ``w'Kw`` and ``w'K w^2`` (for the derivative, ``dw/dlog t = -t w^2``) go
through small orthonormal bases ``B1`` (of ``w``) and ``B2`` (of ``w^2``): ``K`` is applied to them once per
kernel. Written from the formulas above (test/reference code, not part of the package).

The reference values are printed with 6 significant digits, so the recovered fit can reproduce them
only to that rounding (relative 5e-7 .. 5e-6): :func:`rounding_halfwidth` gives the half-width.

Also here: :func:`nb_nll`, the negative-binomial negative log-likelihood of given ``(b, a)`` per gene,
written in a form that stays accurate at the Poisson limit.
"""
from __future__ import annotations

import math

import contextlib

import numpy as np
import scipy.sparse as sp
from scipy import special


def _one_blas_thread():
    """BLAS on one thread (small products: with 2 threads on a loaded machine they are several times slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# ----------------------------------------------------------------------------------------------
# kernels (SpatialDE2's definitions), applied to a few columns
# ----------------------------------------------------------------------------------------------
def kernel_products(xy, kind: str, l: float, B: np.ndarray, chunk: int = 1024):
    """``K B`` and ``diag K`` for SE ``exp(-|x-y|^2 / (2 l^2))`` or PER ``cos(2 pi (sum x - sum y) / l)``,
    without holding ``K`` (row blocks of ``chunk``)."""
    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    if kind == "PER":
        u = 2.0 * math.pi * xy.sum(1) / l
        c, s_ = np.cos(u), np.sin(u)
        return np.outer(c, c @ B) + np.outer(s_, s_ @ B), np.ones(n)
    if kind != "SE":
        raise ValueError(kind)
    sq = (xy * xy).sum(1)
    out = np.empty((n, B.shape[1]))
    for i in range(0, n, chunk):
        d2 = np.maximum(sq[i:i + chunk, None] + sq[None, :] - 2.0 * xy[i:i + chunk] @ xy.T, 0.0)
        out[i:i + chunk] = np.exp(-d2 / (2.0 * l * l)) @ B
    return out, np.ones(n)


def _basis(cols: np.ndarray, rtol: float = 1e-14) -> np.ndarray:
    C = cols / np.linalg.norm(cols, axis=0)
    U, S, _ = np.linalg.svd(C, full_matrices=False)
    return U[:, S > S[0] * rtol]


class ExpectationModel:
    """``log f_k(t)`` and its derivative in ``log t`` for every kernel, for any ``t`` per gene."""

    def __init__(self, s, xy, kernels, u_range=None, n_basis_cols: int = 600):
        with _one_blas_thread():
            self._init(s, xy, kernels, u_range, n_basis_cols)

    def _init(self, s, xy, kernels, u_range, n_basis_cols):
        s = np.asarray(s, dtype=np.float64)
        self.s = s
        if u_range is None:  # t s from 1e-14 (Poisson limit) to 1e8 (all spots saturated)
            u_range = (math.log(1e-14 / s.max()), math.log(1e8 / s.min()))
        self.u_range = u_range
        ug = np.linspace(u_range[0], u_range[1], n_basis_cols)
        Wg = s[:, None] / (1.0 + np.exp(ug)[None, :] * s[:, None])
        self.B1 = _basis(Wg)
        self.B2 = _basis(Wg * Wg)
        self.M11, self.M12, self.d = [], [], []
        for kind, l in kernels:
            KB, d = kernel_products(xy, kind, l, np.hstack([self.B1, self.B2]))
            p1 = self.B1.shape[1]
            self.M11.append(self.B1.T @ KB[:, :p1])        # B1' K B1
            self.M12.append(self.B1.T @ KB[:, p1:])        # B1' K B2
            self.d.append(d)
        self.resid = max(self._resid(self.B1, Wg), self._resid(self.B2, Wg * Wg))

    @staticmethod
    def _resid(B, W):
        R = W - B @ (B.T @ W)
        return float((np.linalg.norm(R, axis=0) / np.linalg.norm(W, axis=0)).max())

    def __call__(self, u: np.ndarray, with_grad: bool = True):
        """``log f`` (genes x kernels) at ``u = log t`` (one per gene), and ``d log f / du``."""
        t = np.exp(u)
        w = self.s[:, None] / (1.0 + t[None, :] * self.s[:, None])    # n x g
        w2 = w * w
        c1 = self.B1.T @ w
        c2 = self.B2.T @ w2
        S, S2 = w.sum(0), w2.sum(0)
        logf = np.empty((u.size, len(self.M11)))
        dlogf = np.empty_like(logf)
        for k, (M11, M12, d) in enumerate(zip(self.M11, self.M12, self.d)):
            A = d @ w
            Q = (c1 * (M11 @ c1)).sum(0)
            f = 0.5 * (A - Q / S)
            logf[:, k] = np.log(f)
            if with_grad:
                dA = -t * (d @ w2)
                dQ = -2.0 * t * (c1 * (M12 @ c2)).sum(0)
                dS = -t * S2
                df = 0.5 * (dA - (dQ * S - Q * dS) / S ** 2)
                dlogf[:, k] = df / f
        return logf, dlogf

    def e(self, b, a):
        """``e`` (genes x kernels) at ``(b, a)``."""
        b, a = np.asarray(b, float), np.asarray(a, float)
        with _one_blas_thread():
            logf, _ = self(np.log(a) + b, with_grad=False)
        return np.exp(b[:, None] + logf)


def rounding_halfwidth(x) -> np.ndarray:
    """Half a unit in the 6th significant digit of ``x`` (the reference files' ``%g`` printing)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return 0.5 * 10.0 ** (np.floor(np.log10(x)) - 5)


def recover_null(model: ExpectationModel, e_ref: np.ndarray, *, n_grid: int = 600, n_iter: int = 40,
                 log_a_min: float = math.log(1e-12), log_a_max: float = math.log(1e6)):
    """Weighted least-squares ``(b, a)`` per gene from the reference's ``e`` (genes x kernels, in the
    model's kernel order), on ``log e`` with weights ``1 / h^2`` (``h``: the relative rounding half-width
    of each printed value): a profile grid search over ``u = log(a exp(b))`` (``b`` is the weighted mean
    residual for given ``u``), then Levenberg-Marquardt in ``(b, log a)``, all genes at once (the genes
    still moving, per iteration). ``log a`` is kept in ``[log_a_min, log_a_max]``: where ``a exp(b) s`` is
    far below the rounding, ``e`` does not determine ``a`` and it ends at the lower bound.

    Returns ``b, a, info`` with ``info['rms']`` (rms of the log residuals in units of ``h``, per gene)
    and ``info['max_ratio']`` (per gene, max over kernels of ``|e(b, a) - e_ref|`` / the rounding
    half-width of ``e_ref``: <= 1 where the fit reproduces every printed digit)."""
    with _one_blas_thread():
        e_ref = np.asarray(e_ref, dtype=np.float64)
        L = np.log(e_ref)
        Wt = (e_ref / rounding_halfwidth(e_ref)) ** 2            # 1 / (relative half-width)^2
        Wt = Wt / Wt.sum(1, keepdims=True)
        g, nk = L.shape
        # profile grid search: b(u) = sum_k w_k (L_k - F_k(u)), R(u) = sum_k w_k (L_k - F_k(u) - b(u))^2
        ug = np.linspace(model.u_range[0], model.u_range[1], n_grid)
        F, _ = model(ug, with_grad=False)                               # grid x k
        WL = Wt * L
        bg = WL.sum(1)[:, None] - Wt @ F.T                              # genes x grid
        R = (WL * L).sum(1)[:, None] - 2.0 * WL @ F.T + Wt @ (F * F).T - bg ** 2
        j = R.argmin(1)
        b = bg[np.arange(g), j]
        phi = np.clip(ug[j] - b, log_a_min, log_a_max)

        def resid(sel, b, phi):
            logf, dlogf = model(b + phi)
            return b[:, None] + logf - L[sel], dlogf

        r, dl = resid(np.arange(g), b, phi)
        cost = (Wt * r * r).sum(1)
        lam = np.full(g, 1e-3)
        act = np.arange(g)
        for _ in range(n_iter):
            if act.size == 0:
                break
            w_, r_, dl_, b_, p_, l_ = Wt[act], r[act], dl[act], b[act], phi[act], lam[act]
            Jb, Jp = 1.0 + dl_, dl_                                     # d r / d b, d r / d log a
            Hbb, Hbp, Hpp = (w_ * Jb * Jb).sum(1), (w_ * Jb * Jp).sum(1), (w_ * Jp * Jp).sum(1)
            gb, gp = (w_ * Jb * r_).sum(1), (w_ * Jp * r_).sum(1)
            # where log a sits at a bound with the gradient pointing outside, only b moves
            fix = ((p_ <= log_a_min + 1e-12) & (gp > 0)) | ((p_ >= log_a_max - 1e-12) & (gp < 0))
            A11, A22 = Hbb * (1.0 + l_), Hpp * (1.0 + l_) + 1e-300
            det = A11 * A22 - Hbp ** 2
            db = np.where(fix, -gb / A11, -(A22 * gb - Hbp * gp) / det)
            dp = np.where(fix, 0.0, -(A11 * gp - Hbp * gb) / det)
            nb, nphi = b_ + db, np.clip(p_ + dp, log_a_min, log_a_max)
            nr, ndl = resid(act, nb, nphi)
            ncost = (w_ * nr * nr).sum(1)
            ok = np.isfinite(ncost) & (ncost <= cost[act])
            gain = cost[act] - ncost
            sel = act[ok]
            b[sel], phi[sel], r[sel], dl[sel], cost[sel] = nb[ok], nphi[ok], nr[ok], ndl[ok], ncost[ok]
            lam[act] = np.where(ok, l_ * 0.3, l_ * 10.0)
            # done: the step no longer lowers the cost (relative 1e-12), or the damping has blown up
            done = (ok & (gain <= 1e-12 * np.maximum(ncost, 1e-30))) | (lam[act] > 1e12)
            act = act[~done]
        a = np.exp(phi)
        e_fit = np.exp(b[:, None] + model(b + phi, with_grad=False)[0])
    ratio = np.abs(e_fit - e_ref) / rounding_halfwidth(e_ref)
    rel_h = rounding_halfwidth(e_ref) / e_ref
    rms = np.sqrt(((r / rel_h) ** 2).mean(1))
    return b, a, {"rms": rms, "max_ratio": ratio.max(1), "e_fit": e_fit, "not_converged": act}


# ----------------------------------------------------------------------------------------------
# NB negative log-likelihood
# ----------------------------------------------------------------------------------------------
def nb_nll(X, s, b, a) -> np.ndarray:
    """``-sum_i log NB(y_i; m_i = s_i exp(b), a)`` per gene (variance ``m + a m^2``), integer counts.

    ``log NB = sum_{k<y} log1p(a k) - y log1p(a m) - log1p(a m)/a + y log m - lgamma(y + 1)`` (from
    ``Gamma(y + r) / Gamma(r) = prod_{k<y} (r + k)``, ``r = 1/a``): no cancellation as ``a -> 0``. The sum
    over ``k`` is a cumulative sum per gene up to its largest count."""
    X = sp.csc_matrix(X, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    b, a = np.asarray(b, float), np.asarray(a, float)
    n, g = X.shape
    mu = np.exp(b)
    tot = np.zeros(g)
    # zeros and non-zeros: - log1p(a m) / a over all spots (chunks of genes)
    for j0 in range(0, g, 2048):
        j1 = min(g, j0 + 2048)
        am = a[None, j0:j1] * mu[None, j0:j1] * s[:, None]
        tot[j0:j1] -= (np.log1p(am) / a[None, j0:j1]).sum(0)
    cols = np.repeat(np.arange(g), np.diff(X.indptr))
    y = X.data
    if np.any(y != np.round(y)):
        raise ValueError("nb_nll needs integer counts")
    m = s[X.indices] * mu[cols]
    ac = a[cols]
    part = -y * np.log1p(ac * m) + y * np.log(m) - special.gammaln(y + 1.0)
    tot += np.bincount(cols, weights=part, minlength=g)
    # sum_{k<y} log1p(a k): per gene, a cumulative table over k = 0 .. max y - 1 (a segmented cumsum:
    # each gene's first entry carries minus the previous gene's total, so the running sum restarts at 0)
    ymax = np.zeros(g, dtype=np.int64)
    np.maximum.at(ymax, cols, y.astype(np.int64))
    start = np.concatenate([[0], np.cumsum(ymax)])[:-1]
    kk = np.arange(ymax.sum()) - np.repeat(start, ymax)
    v = np.log1p(np.repeat(a, ymax) * kk)
    nz = np.nonzero(ymax)[0]
    seg = np.add.reduceat(v, start[nz])
    v[start[nz[1:]]] -= seg[:-1]
    cum = np.cumsum(v)
    lg = cum[start[cols] + y.astype(np.int64) - 1]
    tot += np.bincount(cols, weights=lg, minlength=g)
    return -tot


# ----------------------------------------------------------------------------------------------
# refinement with U
# ----------------------------------------------------------------------------------------------
def refine_with_u(stats_fn, b, a, e_ref, u_ref, s_max: float, *, n_iter: int = 6, target: float = 1.5,
                  a_min: float = 1e-14):
    """Refine ``(b, a)`` on both the printed ``e`` and ``U`` (genes x kernels each).

    ``U = 1/2 z'Kz`` with ``z = (y - m) / (1 + a m)`` is far more sensitive to the null than ``e``: the
    6-digit ``e`` leave ``b`` uncertain by ~1e-5 (and, near the Poisson limit, ``a`` along a direction
    that ``e`` hardly sees), enough to move ``U`` by more than 1e-4 relative. Gauss-Newton on the 20
    residuals ``(x - x_ref) / h`` (``h``: rounding half-width of each printed value) in
    ``(b, kappa = a exp(b) max(s))`` (linear in ``a``, so that ``a -> 0`` is a regular point; ``kappa >= 0``),
    Jacobian by forward differences, step halving; each iteration only for the genes whose largest
    residual is above ``target``. ``stats_fn(idx, b, a) -> (U, e)`` scores the genes ``idx`` with the given
    null (the package's scoring). ``I`` is left out: it stays an independent check.

    Returns ``b, a, info`` with ``info['ratio']`` (max |residual| / h over the 20 values, per gene) and
    ``info['rms']``."""
    b = np.asarray(b, dtype=np.float64).copy()
    kappa = np.asarray(a, dtype=np.float64) * np.exp(b) * s_max
    ref = np.hstack([u_ref, e_ref])
    h = rounding_halfwidth(ref)

    def res(idx, b_, k_):
        U, e = stats_fn(idx, b_, np.maximum(k_ / (np.exp(b_) * s_max), a_min))
        return (np.hstack([U, e]) - ref[idx]) / h[idx]

    r = res(np.arange(b.size), b, kappa)
    for _ in range(n_iter):
        act = np.nonzero(np.abs(r).max(1) > target)[0]
        if act.size == 0:
            break
        ba, ka, ra = b[act], kappa[act], r[act]
        hb, hk = 1e-7, np.maximum(1e-4 * ka, 1e-9)
        Jb = (res(act, ba + hb, ka) - ra) / hb
        Jk = (res(act, ba, ka + hk) - ra) / hk[:, None]
        A11, A12, A22 = (Jb * Jb).sum(1), (Jb * Jk).sum(1), (Jk * Jk).sum(1)
        g1, g2 = (Jb * ra).sum(1), (Jk * ra).sum(1)
        A11, A22 = A11 * (1 + 1e-9) + 1e-300, A22 * (1 + 1e-9) + 1e-300
        det = A11 * A22 - A12 ** 2
        db, dk = -(A22 * g1 - A12 * g2) / det, -(A11 * g2 - A12 * g1) / det
        lo = ka + dk < 0                      # kappa at its bound 0: b alone
        db, dk = np.where(lo, -g1 / A11, db), np.where(lo, -ka, dk)
        cost = (ra ** 2).sum(1)
        todo = np.arange(act.size)
        step = 1.0
        for _ls in range(6):
            if todo.size == 0:
                break
            nb, nk = ba[todo] + step * db[todo], ka[todo] + step * dk[todo]
            nr = res(act[todo], nb, nk)
            ok = (nr ** 2).sum(1) < cost[todo]
            sel = act[todo[ok]]
            b[sel], kappa[sel], r[sel] = nb[ok], nk[ok], nr[ok]
            todo = todo[~ok]
            step *= 0.5
    a = np.maximum(kappa / (np.exp(b) * s_max), a_min)
    return b, a, {"ratio": np.abs(r).max(1), "rms": np.sqrt((r ** 2).mean(1))}


# ----------------------------------------------------------------------------------------------
# the reference protocols (../shared/reference/README.md) and the whole recovery
# ----------------------------------------------------------------------------------------------
def read_mob(shared):
    """MOB rep 11 as in the SpatialDE2 protocol: genes with total >= 3, spots with total > 10 over them
    (260 x 14,243); size factors = totals over the kept genes (``obs['sf']``)."""
    import anndata as ad
    import pandas as pd
    from pathlib import Path

    df = pd.read_csv(Path(shared) / "mob_rep11" / "Rep11_MOB_counts_spots_x_genes.tsv.gz", sep="\t", index_col=0)
    xy = df[["x", "y"]].to_numpy(np.float64)
    counts = df.drop(columns=["x", "y"])
    counts = counts.loc[:, counts.sum(0) >= 3]
    keep = (counts.sum(1) > 10).to_numpy()
    counts, xy = counts.loc[keep], xy[keep]
    a = ad.AnnData(sp.csr_matrix(counts.to_numpy(np.float32)), obs=pd.DataFrame(index=counts.index),
                   var=pd.DataFrame(index=counts.columns))
    a.obsm["spatial"] = xy
    a.obs["sf"] = np.asarray(a.X.sum(1), dtype=np.float64).ravel()
    return a


def read_dlpfc151673(shared):
    """DLPFC 151673 filtered as in the protocol: genes with total >= 3, then spots with total > 10:
    ``(X, xy, genes)`` = 3,639 x 5,000 float64 CSR counts, (pxl_col, pxl_row) positions, gene symbols."""
    import h5py
    import pandas as pd
    from pathlib import Path

    base = Path(shared) / "dlpfc" / "151673"
    with h5py.File(base / "filtered_feature_bc_matrix_top5000genes.h5", "r") as f:
        m = f["matrix"]
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=tuple(m["shape"][:])).T.tocsr()
        barcodes = m["barcodes"][:].astype(str)
        genes = m["features"]["name"][:].astype(str)
    pos = pd.read_csv(base / "spatial" / "tissue_positions_list.csv", header=None, index_col=0).loc[barcodes]
    xy = pos[[5, 4]].to_numpy(np.float64)  # (pxl_col, pxl_row) = (x, y)
    X = X.astype(np.float64)
    gk = np.asarray(X.sum(0)).ravel() >= 3
    X, genes = X[:, gk], genes[gk]
    keep = np.asarray(X.sum(1)).ravel() > 10
    X, xy = X[keep], xy[keep]
    assert X.shape == (3639, 5000)
    return X, xy, genes


def read_dlpfc300(shared):
    """DLPFC 151673 as in the protocol (:func:`read_dlpfc151673`), the 300-gene subset
    (``default_rng(0).choice(5000, 300)``, sorted); size factors over all 5,000 genes (``obs['sf']``)."""
    import anndata as ad
    import pandas as pd

    X, xy, genes = read_dlpfc151673(shared)
    sf = np.asarray(X.sum(1)).ravel()
    sub = np.sort(np.random.default_rng(0).choice(X.shape[1], 300, replace=False))
    a = ad.AnnData(sp.csr_matrix(X[:, sub], dtype=np.float32), var=pd.DataFrame(index=genes[sub]))
    a.obsm["spatial"] = xy
    a.obs["sf"] = sf
    return a


def score_with_null(adata, b, a, use_cache: bool = False, **kw):
    """The package's statistics with a given null (``svg_spatialde(..., _null_fit=(b, a))``, exact kernels,
    size factors ``obs['sf']``) on a copy; returns the copy."""
    from expkit.spatial import svg_spatialde

    out = adata.copy()
    svg_spatialde(out, layer=None, sizefactors="sf", method="exact", progress=False, use_cache=use_cache,
                  _null_fit=(b, a), **kw)
    return out


def recover(adata, ref_perkernel, kernel_space):
    """SpatialDE2's null for every gene of ``adata`` from its per-kernel table: (b, a) from the ten ``e``
    (:func:`recover_null`), then refined on ``e`` and ``U`` (:func:`refine_with_u`, with the package's
    scoring). Returns a DataFrame: ``log_mean``, ``dispersion`` (refined), ``log_mean_e``,
    ``dispersion_e`` (from ``e`` alone), ``ratio_e`` and ``ratio`` (largest residual in rounding units,
    of the ten ``e`` and of the 20 ``e``, ``U``)."""
    import pandas as pd

    kernels = [(k, float(l)) for k in ("SE", "PER") for l in kernel_space[k]]
    names = [f"{k}_l{l:.5g}" for k, l in kernels]
    ref = ref_perkernel.loc[adata.var_names]
    E = ref[[f"e_tilde:{k}" for k in names]].to_numpy(np.float64)
    U = ref[[f"U_tilde:{k}" for k in names]].to_numpy(np.float64)
    s = adata.obs["sf"].to_numpy(np.float64)
    model = ExpectationModel(s, adata.obsm["spatial"], kernels)
    b1, a1, info1 = recover_null(model, E)
    ks = {"SE": list(kernel_space["SE"]), "PER": list(kernel_space["PER"])}

    def stats_fn(idx, b, a):
        out = score_with_null(adata[:, idx], b, a, use_cache=True, kernel_space=ks)
        return out.varm["spatialde.U"].to_numpy(), out.varm["spatialde.e"].to_numpy()

    b2, a2, info2 = refine_with_u(stats_fn, b1, a1, E, U, float(s.max()))
    return pd.DataFrame({"log_mean": b2, "dispersion": a2, "log_mean_e": b1, "dispersion_e": a1,
                         "ratio_e": info1["max_ratio"], "ratio": info2["ratio"]}, index=adata.var_names)


def profile_nll(X, s, log_a, n_newton: int = 30) -> np.ndarray:
    """``min_b NLL(b, a)`` per gene (columns of ``X``) for each ``a = exp(log_a[j])``: genes x len(log_a).

    For fixed ``a`` the NB log-likelihood is concave in ``b``; its maximum solves
    ``sum_i (y_i - m_i) / (1 + a m_i) = 0``, found by a safeguarded Newton iteration for all genes at once.
    An independent check of a null fit: no grid point may beat it."""
    X = sp.csc_matrix(X, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    n, g = X.shape
    cols = np.repeat(np.arange(g), np.diff(X.indptr))
    y, sv = X.data, s[X.indices]
    b0 = np.log(np.asarray(X.sum(0)).ravel() / s.sum())
    out = np.empty((g, len(log_a)))
    with _one_blas_thread():
        for j, la in enumerate(log_a):
            a = math.exp(la)
            b = b0.copy()
            for _ in range(n_newton):
                mu = np.exp(b)
                D = 1.0 + a * np.outer(s, mu)                            # n x g
                M = s[:, None] * mu[None, :]
                dv = 1.0 + a * sv * mu[cols]
                gr = np.bincount(cols, y / dv, g) - (M / D).sum(0)
                hs = -(M / D ** 2).sum(0) - a * np.bincount(cols, y * sv * mu[cols] / dv ** 2, g)
                step = np.clip(-gr / hs, -2.0, 2.0)
                b = b + step
                if np.all(np.abs(step) < 1e-13):
                    break
            out[:, j] = nb_nll(X, s, b, np.full(g, a))
    return out
