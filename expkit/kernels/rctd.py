"""RCTD's Poisson-lognormal model (Cable et al., Nat Biotechnol 2022), batched over spots as tensors.

Model. The count of gene ``g`` in spot ``i`` is ``y ~ Poisson(lambda * exp(eps))`` with
``lambda = N_i * sum_k w_ik mu_kg`` (``N_i`` the spot's total count, ``mu`` the platform-normalised
cell-type profiles, ``w`` the non-negative weights) and ``eps`` a heavy-tailed normal of scale ``sigma``
(a normal density inside +-3 sigma continued by a ``1/(|x| - 7/3)^2`` tail, C1 at the junction,
RCTD's choice so that outlier genes do not dominate the fit).

Likelihood table. ``P(y = k | lambda) = int Poisson(k; lambda e^e) p_sigma(e) de`` is, in ``t = log lambda``,
the convolution of ``f_k(t) = Poisson(k; e^t)`` with ``p_sigma``: one FFT convolution gives the table for
every count ``k <= K_MAX + 2`` on a uniform ``t`` grid (RCTD integrates the same integral by brute force on
``e in [-20, 20]``; we integrate the same range). Counts above ``K_MAX`` are clipped to it, as in RCTD.
Values at any ``lambda`` come from cubic (4-point Lagrange) interpolation of ``log P`` in ``t``; the first
two derivatives in ``lambda`` are exact identities of the Poisson mixture:
``dP_k/dl = (k P_k - (k+1) P_{k+1}) / l`` and
``d2P_k/dl2 = (k(k-1) P_k - 2k(k+1) P_{k+1} + (k+1)(k+2) P_{k+2}) / l^2``,
so that the gradient and Hessian of the log-likelihood need only ratios of table entries.

Weights. Per spot, RCTD's damped Newton steps: Hessian of the negative log-likelihood made positive
definite (eigenvalues clipped at 1e-3), scaled by its norm, the quadratic sub-problem solved under
``w + step >= 0`` (a small non-negative QP, solved here for all spots at once by a primal-dual
active-set method with batched linear solves, see :func:`expkit.kernels.nnls.qp_nonneg`), and
``w <- w + 0.3 step``; a spot stops when the step changes ``w`` by less than ``min_change``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .nnls import qp_nonneg

K_MAX = 1000                     # counts are clipped here (RCTD's K_val, the size of its shipped tables)
T_STEP = 0.02                    # grid step in log(lambda)
LAMBDA_MIN, LAMBDA_MAX = 1e-4, 5e3
EPS_RANGE = 20.0                 # the noise integral runs over e in [-20, 20]
SIGMA_GRID = np.concatenate([np.arange(10, 71), np.arange(36, 101) * 2]) / 100.0  # RCTD's candidate sigmas

_TABLES: dict = {}


def heavy_tail_density(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """RCTD's noise density: standard normal for ``|x/sigma| < 3``, ``C a / (|x/sigma| - 7/3)^2`` beyond."""
    z = x / sigma
    a = 4.0 / 9.0 * math.exp(-4.5) / math.sqrt(2 * math.pi)
    c = 7.0 / 3.0
    norm_tail = 0.5 * math.erfc(3.0 / math.sqrt(2.0))
    const = 1.0 / ((a / (3.0 - c) - norm_tail) * 2.0 + 1.0)
    inner = const / math.sqrt(2 * math.pi) * torch.exp(-0.5 * z * z)
    outer = const * a / (z.abs() - c).clamp_min(1e-12) ** 2
    return torch.where(z.abs() < 3.0, inner, outer) / sigma


class LikelihoodTable:
    """``log P(y = k | lambda)`` on a uniform grid of ``log lambda`` for the counts ``rows`` (sorted; by
    default ``0 .. K_MAX + 2``): only the counts a data set holds (and ``+1``, ``+2`` for the derivatives)
    are ever read, so a table of those rows gives the same values as the full one at a fraction of the cost."""

    def __init__(self, sigma: float, device: torch.device, rows: np.ndarray | None = None):
        self.sigma = float(sigma)
        self.device = device
        rows = np.arange(K_MAX + 3) if rows is None else np.asarray(rows, dtype=np.int64)
        self.k_max = min(int(rows.max()) - 2, K_MAX)
        self.t0 = math.log(LAMBDA_MIN)
        self.n_t = int(math.ceil((math.log(LAMBDA_MAX) - self.t0) / T_STEP)) + 1
        self.log_q = _log_q_table(self.sigma, self.t0, self.n_t, torch.as_tensor(rows)).to(device)
        self.flat = self.log_q.reshape(-1)
        row_of = torch.full((K_MAX + 5,), -1, dtype=torch.long)
        row_of[torch.as_tensor(rows)] = torch.arange(len(rows))
        # a count k can be queried when k, k + 1 and k + 2 are rows (then they are consecutive rows)
        ok = (row_of[:-2] >= 0) & (row_of[1:-1] == row_of[:-2] + 1) & (row_of[2:] == row_of[:-2] + 2)
        self.base = torch.where(ok, row_of[:-2] * self.n_t, -1).to(device)

    def _coef(self, lam: torch.Tensor):
        """Grid position and the 4-point Lagrange weights of each ``lam`` (clamped to the grid)."""
        lam = lam.clamp(LAMBDA_MIN * 1.0001, LAMBDA_MAX * 0.999)
        x = (torch.log(lam) - self.t0) / T_STEP
        pos = x.floor().long().clamp(1, self.n_t - 3)
        u = x - pos
        c = torch.stack([-u * (u - 1) * (u - 2) / 6, (u + 1) * (u - 1) * (u - 2) / 2,
                         -(u + 1) * u * (u - 2) / 2, (u + 1) * u * (u - 1) / 6], -1)
        return lam, pos, c

    def _rows(self, k: torch.Tensor, pos: torch.Tensor, c: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Interpolated ``log_q[k + r]`` at the positions, for ``r < n_rows``: (..., n_rows)."""
        base = self.base[k]
        if bool((base < 0).any()):
            raise ValueError("likelihood table built without the rows these counts need (see needed_rows)")
        offs = (torch.arange(n_rows, device=k.device)[:, None] * self.n_t
                + torch.arange(-1, 3, device=k.device)[None, :]).reshape(-1)
        vals = self.flat[(base + pos)[..., None] + offs].reshape(*k.shape, n_rows, 4)
        return (vals * c[..., None, :]).sum(-1)

    def nll(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each count ``y`` (clipped at ``k_max``) at mean ``lam``."""
        _, pos, c = self._coef(lam)
        return -self._rows(y.clamp(0, self.k_max).long(), pos, c, 1)[..., 0]

    def derivatives(self, y: torch.Tensor, lam: torch.Tensor):
        """First and second derivatives in ``lam`` of the log-likelihood, elementwise."""
        lam, pos, c = self._coef(lam)
        k = y.clamp(0, self.k_max).long()
        v = self._rows(k, pos, c, 3)
        r1 = torch.exp(v[..., 1] - v[..., 0])
        r2 = torch.exp(v[..., 2] - v[..., 0])
        kf = k.to(lam.dtype)
        d1 = (kf - (kf + 1) * r1) / lam
        d2 = (kf * (kf - 1) - 2 * kf * (kf + 1) * r1 + (kf + 1) * (kf + 2) * r2) / lam ** 2 - d1 ** 2
        return d1, d2


_F_SPEC: dict = {}


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (fast FFT lengths)."""
    best = 1 << int(math.ceil(math.log2(n)))
    for a in range(0, int(math.log2(n)) + 2):
        for b in range(0, 8):
            for c in range(0, 6):
                m = (1 << a) * 3 ** b * 5 ** c
                if n <= m < best:
                    best = m
    return best


def _poisson_spectrum(t0: float, n_t: int, n_e: int, n_fft: int) -> torch.Tensor:
    """FFT of ``f_k(u) = Poisson(k; e^u)``, ``k = 0 .. K_MAX + 2``, on the extended grid of ``u = t + e``
    (shared by every sigma, computed once)."""
    key = (t0, n_t, n_e, n_fft)
    if key not in _F_SPEC:
        u = t0 + torch.arange(-n_e, n_t + n_e, dtype=torch.float64) * T_STEP
        k = torch.arange(K_MAX + 3, dtype=torch.float64)[:, None]
        f = torch.exp(k * u[None, :] - torch.exp(u)[None, :] - torch.lgamma(k + 1))
        _F_SPEC.clear()
        _F_SPEC[key] = torch.fft.rfft(f, n_fft)
    return _F_SPEC[key]


def _log_q_table(sigma: float, t0: float, n_t: int, rows: torch.Tensor) -> torch.Tensor:
    """The table's ``rows`` by FFT convolution in float64 (the tails keep every entry far above underflow)."""
    n_e = int(round(EPS_RANGE / T_STEP))
    e = torch.arange(-n_e, n_e + 1, dtype=torch.float64) * T_STEP
    p = heavy_tail_density(e, sigma) * T_STEP
    n_fft = _fft_size(n_t + 2 * n_e)
    # correlation: Q[k, i] = sum_j f[k, i + j] p[j] (j over the 2 n_e + 1 noise points); every index
    # i + j stays below len(f) = n_t + 2 n_e, so a circular transform of that length does not wrap
    spec = _poisson_spectrum(t0, n_t, n_e, n_fft)[rows] * torch.fft.rfft(torch.flip(p, [0]), n_fft)[None, :]
    q = torch.fft.irfft(spec, n_fft)[:, 2 * n_e: 2 * n_e + n_t]
    return torch.log(q.clamp_min(1e-300))


def needed_rows(y: torch.Tensor) -> np.ndarray:
    """The table rows that counts ``y`` need: each distinct (clipped) count and the next two."""
    k = torch.unique(y.clamp(0, K_MAX).long()).cpu().numpy()
    return np.unique(np.concatenate([k, k + 1, k + 2]))


def likelihood_table(sigma: float, device: torch.device, rows: np.ndarray | None = None) -> LikelihoodTable:
    """Cached table for one sigma (rounded to 1e-4), set of rows (see :func:`needed_rows`) and device."""
    rows = np.arange(K_MAX + 3) if rows is None else np.asarray(rows, dtype=np.int64)
    key = (round(float(sigma), 4), str(device), hash(rows.tobytes()))
    if key not in _TABLES:
        if len(_TABLES) > 96:
            _TABLES.clear()
        _TABLES[key] = LikelihoodTable(key[0], device, rows)
    return _TABLES[key]


# --------------------------------------------------------------------------------------------
# per-spot weights: damped Newton steps with a non-negative QP, batched over spots
# --------------------------------------------------------------------------------------------
def _psd(h: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """The matrix with its eigenvalues clipped at ``floor`` (RCTD's psd); a Cholesky test skips the
    eigendecomposition for the (usual) matrices that already have every eigenvalue above the floor."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    _, info = torch.linalg.cholesky_ex(h - floor * eye)
    bad = info != 0
    if bool(bad.any()):
        vals, vecs = torch.linalg.eigh(h[bad])
        h = h.clone()
        h[bad] = (vecs * vals.clamp_min(floor)[:, None, :]) @ vecs.transpose(1, 2)
    return h


def _spectral_norm(m: torch.Tensor, n_iter: int = 12) -> torch.Tensor:
    """Largest eigenvalue of a batch of symmetric positive definite matrices (power iteration)."""
    v = torch.ones(m.shape[:-1], dtype=m.dtype, device=m.device)
    for _ in range(n_iter):
        v = torch.einsum("bkl,bl->bk", m, v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bk,bkl,bl->b", v, m, v)


def _bulk_derivatives(b: torch.Tensor, lam: torch.Tensor):
    """RCTD's bulk mode: the log-likelihood is replaced by ``-(log lam - log b)^2``."""
    r = torch.log(lam) - torch.log(b)
    return -2 * r / lam, -2 * (1 - r) / lam ** 2


def _newton_step(prof, scale, y, w, thr, table, bulk):
    """One damped step for a batch: ``prof`` (k, G) shared or (B, k, G) per problem, ``scale`` (B,) the
    spots' totals, ``y`` (B, G), ``w`` (B, k)."""
    w = w.clamp_min(0.0)
    shared = prof.dim() == 2
    raw = w @ prof if shared else torch.bmm(w[:, None, :], prof)[:, 0]
    lam = torch.maximum((raw * scale[:, None]).abs(), thr[:, None])
    d1, d2 = _bulk_derivatives(y, lam) if bulk else table.derivatives(y, lam)
    d1, d2 = d1 * scale[:, None], d2 * (scale * scale)[:, None]
    if shared:
        grad = -(d1 @ prof.T)
        hess = -((d2[:, None, :] * prof[None]).reshape(-1, prof.shape[1]) @ prof.T).reshape(len(w), -1, prof.shape[0])
    else:
        grad = -torch.bmm(prof, d1[:, :, None])[:, :, 0]
        hess = -torch.bmm(prof * d2[:, None, :], prof.transpose(1, 2))
    d_mat = _psd(hess)
    norm = _spectral_norm(d_mat)[:, None]
    d_mat = d_mat / norm[:, :, None] + 1e-7 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    d_vec = -grad / norm
    x = qp_nonneg(d_mat, torch.einsum("bkl,bl->bk", d_mat, w) + d_vec)   # x = w + step >= 0
    return w + 0.3 * (x - w)


def _iterate(prof, scale, y, thr, w, table, bulk, n_iter, min_change):
    """Damped Newton steps until each problem's L1 change falls below ``min_change``: a finished problem
    is frozen (its last step kept, as RCTD stops it) and the batch is compacted once a third is frozen."""
    w = w.clone()
    conv = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    act = torch.arange(w.shape[0], device=w.device)
    pa, sa, ya, ta, wa = prof, scale, y, thr, w
    frozen = torch.zeros(len(act), dtype=torch.bool, device=w.device)
    for _ in range(n_iter):
        new = _newton_step(pa, sa, ya, wa, ta, table, bulk)
        done = ((new - wa).abs().sum(1) <= min_change) & ~frozen
        wa = torch.where(frozen[:, None], wa, new)
        frozen |= done
        if bool(frozen.all()):
            break
        if frozen.float().mean() > 0.33:
            w[act] = wa
            conv[act[frozen]] = True
            keep = ~frozen
            act, sa, ya, ta, wa = act[keep], sa[keep], ya[keep], ta[keep], wa[keep]
            pa = pa if pa.dim() == 2 else pa[keep]
            frozen = frozen[keep]
    w[act] = wa
    conv[act[frozen]] = True
    return w, conv


def fit_weights(prof_t: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, table: LikelihoodTable | None, *,
                types: torch.Tensor | None = None, spots: torch.Tensor | None = None, n_iter: int = 50,
                min_change: float = 1e-3, bulk: bool = False, chunk: int = 2048,
                w0: torch.Tensor | None = None):
    """Non-negative weights of the cell types for many problems at once.

    ``prof_t`` (K, G): platform-normalised profiles; ``y`` (N, G) counts; ``numi`` (N,) spot totals.
    Without ``types`` problem ``i`` is spot ``i`` with every type; with ``types`` (P, k) and ``spots`` (P,)
    problem ``p`` fits spot ``spots[p]`` with the types ``types[p]``. Returns ``(weights (P, k),
    converged (P,) bool)``; weights are RCTD's unnormalised ones (start ``1/k``, stop at an L1 change
    below ``min_change`` or after ``n_iter`` steps; ``w0``: other starting weights). ``bulk``: RCTD's
    squared-log loss of the platform fit.
    """
    n_prob = y.shape[0] if spots is None else spots.shape[0]
    k = prof_t.shape[0] if types is None else types.shape[1]
    weights = torch.full((n_prob, k), 1.0 / k, dtype=prof_t.dtype, device=prof_t.device)
    if w0 is not None:
        weights = w0.to(prof_t.dtype).clone()
    conv = torch.zeros(n_prob, dtype=torch.bool, device=prof_t.device)
    for start in range(0, n_prob, chunk):
        idx = torch.arange(start, min(start + chunk, n_prob), device=prof_t.device)
        sp_idx = idx if spots is None else spots[idx]
        prof = prof_t if types is None else prof_t[types[idx]]
        thr = torch.clamp(numi[sp_idx] * 1e-7, min=1e-4)
        weights[idx], conv[idx] = _iterate(prof, numi[sp_idx], y[sp_idx], thr, weights[idx], table, bulk,
                                           n_iter, min_change)
    return weights, conv


def scores(prof_t, y, numi, table, weights, *, types=None, spots=None) -> torch.Tensor:
    """Negative log-likelihood of each problem at its weights (RCTD's score: no floor on the mean
    besides the table's range)."""
    sp_idx = torch.arange(y.shape[0], device=y.device) if spots is None else spots
    prof = prof_t.expand(len(sp_idx), -1, -1) if types is None else prof_t[types]
    lam = torch.bmm(weights[:, None, :], prof)[:, 0] * numi[sp_idx][:, None]
    return table.nll(y[sp_idx], lam).sum(1)


# --------------------------------------------------------------------------------------------
# reference profiles, gene selection, platform effect, sigma
# --------------------------------------------------------------------------------------------
def cell_type_profiles_scaled(scaled, codes: np.ndarray, n_types: int) -> np.ndarray:
    """(K, G) mean over each type's cells of ``scaled`` (cells x genes, each cell already divided by its
    total count over all genes: RCTD's normalised mean expression)."""
    import scipy.sparse as sp

    x = sp.csr_matrix(scaled, dtype=np.float64)
    member = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_types, len(codes)))
    sizes = np.asarray(member.sum(1)).ravel()
    return np.asarray((member @ x).todense()) / sizes[:, None]


def de_genes(profiles: np.ndarray, bulk: np.ndarray, fc_thresh: float, expr_thresh: float,
             min_obs: float = 3, keep: np.ndarray | None = None) -> np.ndarray:
    """RCTD's gene list: for any type, log fold change over the mean of the other types above
    ``fc_thresh`` and normalised expression above ``expr_thresh``, among genes seen at least ``min_obs``
    times in the spatial data (and ``keep``, e.g. not mitochondrial). Indices in gene order."""
    eps = 1e-9
    n_types = profiles.shape[0]
    ok = bulk >= min_obs if keep is None else (bulk >= min_obs) & keep
    other = (profiles.sum(0, keepdims=True) - profiles) / max(n_types - 1, 1)
    logfc = np.log(profiles + eps) - np.log(other + eps)
    hit = ((logfc > fc_thresh) & (profiles > expr_thresh)).any(0)
    return np.flatnonzero(hit & ok)


def platform_effect(profiles: np.ndarray, bulk: np.ndarray, total_umi: float, genes: np.ndarray,
                    device: torch.device, min_obs: float = 10):
    """RCTD's fitBulk: bulk type weights by the squared-log fit of the pseudo-bulk (genes with at least
    ``min_obs`` counts), then profiles rescaled per gene so that their weighted mean matches the bulk.
    Returns ``(bulk weights (K,), renormalised profiles (K, len(genes)))``."""
    fit = genes[bulk[genes] >= min_obs]
    prof = torch.as_tensor(profiles[:, fit], dtype=torch.float64, device=device)
    b = torch.as_tensor(bulk[fit], dtype=torch.float64, device=device)[None, :]
    numi = torch.tensor([float(total_umi)], dtype=torch.float64, device=device)
    w, _ = fit_weights(prof, b, numi, None, n_iter=100, min_change=1e-4, bulk=True)
    w = w[0].cpu().numpy()
    avg = (profiles[:, genes] * (w / w.sum())[:, None]).sum(0)
    target = bulk[genes] / float(total_umi)
    return w, profiles[:, genes] * (target / np.maximum(avg, 1e-300))[None, :]


def _sigma_score(sigma, y, pred, device, rows):
    tab = likelihood_table(float(sigma), device, rows)
    return min(float(tab.nll(y, pred * m).sum()) for m in (0.8, 0.9, 1.0, 1.1, 1.2))


def _window_argmin(score, i0: int, lo: int, hi: int) -> int:
    """Argmin of ``score`` over grid indices ``lo..hi`` by descent from ``i0`` (the score, a likelihood
    profile in sigma, is unimodal in practice: this equals the window's argmin with far fewer tables)."""
    cache = {i0: score(i0)}

    def f(i):
        if i not in cache:
            cache[i] = score(i)
        return cache[i]

    best = i0
    for step in (-1, 1):
        i = best
        while lo <= i + step <= hi and f(i + step) < f(i):
            i += step
        if f(i) < f(best):
            best = i
    return best


def choose_sigma(prof_t: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, *, n_epoch: int = 8,
                 sigma0: float = 1.0, log=None) -> float:
    """RCTD's choose_sigma_c on the spots given: fit the weights at the current sigma, then the sigma
    (of RCTD's grid, within 8 steps of the current one) whose likelihood of the counts at the fitted
    means, scaled by the best of 0.8..1.2, is highest; repeat until it stays put. Each epoch's fit starts
    from the previous epoch's weights (RCTD restarts from uniform weights: same optimum, fewer steps)."""
    rows = needed_rows(y)
    sigma = float(sigma0)
    w = None
    for _ in range(n_epoch):
        table = likelihood_table(sigma, prof_t.device, rows)
        w, _ = fit_weights(prof_t, y, numi, table, w0=w)
        pred = ((w @ prof_t) * numi[:, None]).clamp_min(1e-4)
        i0 = int(np.argmin(np.abs(SIGMA_GRID - sigma)))
        lo, hi = max(0, i0 - 8), min(len(SIGMA_GRID) - 1, i0 + 8)
        best = _window_argmin(lambda i: _sigma_score(SIGMA_GRID[i], y, pred, prof_t.device, rows), i0, lo, hi)
        new = float(SIGMA_GRID[best])
        if log is not None:
            log(f"sigma {sigma:.2f} -> {new:.2f}")
        if abs(new - sigma) < 1e-9:
            break
        sigma = new
    return sigma
