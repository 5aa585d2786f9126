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
active-set method with batched linear solves, see :func:`expkit.kernels.nnls.qp_nonneg`, started from
the previous step's support), and ``w <- w + 0.3 step``; a spot stops when the step changes ``w`` by less
than ``min_change`` and leaves the batch. The Hessian of shared profiles is one matrix product with the
products of profile pairs; on the CPU a batch runs as two halves side by side
(:func:`expkit.kernels.device.run_parallel`).

Sigma. RCTD's search (:func:`choose_sigma`) on tables of the counts' rows only, the grid positions of
the fitted means computed once per epoch, and the window's argmin from a few tables (unimodal profile).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .device import parts, run_parallel
from .nnls import qp_nonneg

K_MAX = 1000                     # counts are clipped here (RCTD's K_val, the size of its shipped tables)
T_STEP = 0.02                    # grid step in log(lambda)
LAMBDA_MIN, LAMBDA_MAX = 1e-4, 5e3
EPS_RANGE = 20.0                 # the noise integral runs over e in [-20, 20]
SIGMA_GRID = np.concatenate([np.arange(10, 71), np.arange(36, 101) * 2]) / 100.0  # RCTD's candidate sigmas

_TABLES: dict = {}
_PLANES: list = []                # the tables holding derivative planes (at most 2)


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


T0 = math.log(LAMBDA_MIN)
N_T = int(math.ceil((math.log(LAMBDA_MAX) - T0) / T_STEP)) + 1      # grid points in log(lambda)


def grid_pos(lam: torch.Tensor):
    """Grid position ``pos`` of each ``lam`` (clamped to the grid) and its offset ``u = x - pos`` from it
    (``x`` the fractional grid index; ``u`` in [0, 1) but at the two ends of the grid)."""
    x = torch.log(lam.clamp(LAMBDA_MIN * 1.0001, LAMBDA_MAX * 0.999)).sub_(T0).div_(T_STEP)
    fl = x.floor().clamp_(1, N_T - 3)
    return fl.long(), x.sub_(fl)


def grid_coef(lam: torch.Tensor):
    """Grid position of each ``lam`` (clamped to the grid) and its four 4-point Lagrange weights (a list of
    tensors shaped like ``lam``): ``value = sum_j c_j table[pos - 1 + j]``."""
    pos, u = grid_pos(lam)
    omu, tmu, up1 = 1 - u, 2 - u, u + 1
    a = (u * omu).mul_(-1 / 6)                       # u (u - 1) / 6
    nb = (up1 * tmu).mul_(0.5)                       # -(u + 1)(u - 2) / 2
    return pos, [a * tmu, nb * omu, nb * u, a.mul_(up1)]


def _cubic_coefficients(plane: torch.Tensor) -> list:
    """The same cubic as the Lagrange weights, in powers of ``u``: ``a_j[i]`` from ``plane[i - 1 .. i + 2]``
    stored at ``i - 1`` (flat planes; the last three entries are never read)."""
    f = [plane[j: len(plane) - 3 + j] for j in range(4)]
    out = [torch.zeros_like(plane) for _ in range(4)]
    out[0][:-3] = f[1]
    out[1][:-3] = f[2] - f[0] / 3 - f[1] / 2 - f[3] / 6
    out[2][:-3] = (f[0] + f[2]) / 2 - f[1]
    out[3][:-3] = (f[3] - f[0]) / 6 + (f[1] - f[2]) / 2
    return out


def _horner(coef: list, idx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``a0 + u (a1 + u (a2 + u a3))`` with the coefficients read at ``idx``."""
    flat = idx.reshape(-1)
    uf = u.reshape(-1)
    v = coef[3].index_select(0, flat).mul_(uf).add_(coef[2].index_select(0, flat))
    v.mul_(uf).add_(coef[1].index_select(0, flat))
    return v.mul_(uf).add_(coef[0].index_select(0, flat)).reshape(idx.shape)


def _interp(plane: torch.Tensor, idx: torch.Tensor, c) -> torch.Tensor:
    """``sum_j c_j plane[idx + j]``: ``plane`` a flat table, ``idx`` the flat index of each first point."""
    flat_idx = idx.reshape(-1)
    out = plane.index_select(0, flat_idx).mul_(c[0].reshape(-1))
    for j in range(1, 4):
        out.addcmul_(plane[j:].index_select(0, flat_idx), c[j].reshape(-1))
    return out.reshape(idx.shape)


def row_offsets(rows: np.ndarray, derivs: bool) -> torch.Tensor:
    """For each count ``k <= K_MAX + 2`` the flat offset of its row in a table of ``rows``, or -1
    where the table cannot answer: ``k`` not a row, or with ``derivs`` ``k + 1`` / ``k + 2`` not the next rows."""
    row_of = torch.full((K_MAX + 5,), -1, dtype=torch.long)
    row_of[torch.as_tensor(rows)] = torch.arange(len(rows))
    ok = row_of[:-2] >= 0
    if derivs:
        ok &= (row_of[1:-1] == row_of[:-2] + 1) & (row_of[2:] == row_of[:-2] + 2)
    return torch.where(ok, row_of[:-2] * N_T, -1)


def count_offsets(y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The flat offsets of the (clipped) counts ``y`` in a table (see :func:`row_offsets`), checked once."""
    off = offsets[y.clamp(0, K_MAX).long()]
    if bool((off < 0).any()):
        raise ValueError("likelihood table built without the rows these counts need (see needed_rows)")
    return off


def count_constants(kf: torch.Tensor):
    """``(k + 1, k (k - 1), 2 k (k + 1), (k + 1)(k + 2))`` of float counts: the derivatives' polynomials."""
    k1 = kf + 1
    return k1, kf * (kf - 1), 2 * kf * k1, k1 * (kf + 2)


class LikelihoodTable:
    """``log P(y = k | lambda)`` on a uniform grid of ``log lambda`` for the counts ``rows`` (sorted; by
    default ``0 .. K_MAX + 2``): only the counts a data set holds (and ``+1``, ``+2`` for the derivatives)
    are ever read, so a table of those rows gives the same values as the full one at a fraction of the cost.
    Counts above ``K_MAX`` are clipped to it. The derivatives read two planes built on first use,
    ``log P_{k+1} - log P_k`` and ``log P_{k+2} - log P_k``, as the coefficients of the same cubic in
    powers of the grid offset (Horner's rule: no interpolation weights per call)."""

    def __init__(self, sigma: float, device: torch.device, rows: np.ndarray | None = None):
        self.sigma = float(sigma)
        self.device = device
        self.rows = np.arange(K_MAX + 3) if rows is None else np.asarray(rows, dtype=np.int64)
        self.k_max = K_MAX
        self.t0, self.n_t = T0, N_T
        self.log_q = _log_q_table(self.sigma, self.t0, self.n_t, torch.as_tensor(self.rows)).to(device)
        self.flat = self.log_q.reshape(-1)
        self.offsets1 = row_offsets(self.rows, False).to(device)
        self.offsets3 = row_offsets(self.rows, True).to(device)
        self._planes = None

    def planes(self):
        """The cubic coefficients (:func:`_cubic_coefficients`) of ``log P_{k+1} - log P_k`` and of
        ``log P_{k+2} - log P_k`` at every row ``k`` (rows whose ``k + 1``, ``k + 2`` are not the next
        rows hold values never read); built on first use and kept for the most recent tables only."""
        if self._planes is None:
            q = self.log_q
            d1, d2 = torch.zeros_like(q), torch.zeros_like(q)
            d1[:-1] = q[1:] - q[:-1]
            d2[:-2] = q[2:] - q[:-2]
            self._planes = (_cubic_coefficients(d1.reshape(-1)), _cubic_coefficients(d2.reshape(-1)))
            _PLANES.append(self)
            while len(_PLANES) > 2:
                _PLANES.pop(0)._planes = None
        return self._planes

    def _coef(self, lam: torch.Tensor):
        """Clamped ``lam``, grid position and the 4-point Lagrange weights (..., 4) of each ``lam``."""
        pos, c = grid_coef(lam)
        return lam.clamp(LAMBDA_MIN * 1.0001, LAMBDA_MAX * 0.999), pos, torch.stack(c, -1)

    def _rows(self, k: torch.Tensor, pos: torch.Tensor, c: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Interpolated ``log_q[k + r]`` at the positions, for ``r < n_rows``: (..., n_rows)."""
        base = (self.offsets3 if n_rows > 1 else self.offsets1)[k]
        if bool((base < 0).any()):
            raise ValueError("likelihood table built without the rows these counts need (see needed_rows)")
        cs = c.unbind(-1)
        return torch.stack([_interp(self.flat, base + pos + (r * self.n_t - 1), cs) for r in range(n_rows)], -1)

    def nll(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each count ``y`` (clipped at ``K_MAX``) at mean ``lam``."""
        pos, c = grid_coef(lam)
        return -_interp(self.flat, pos.add_(count_offsets(y, self.offsets1)).sub_(1), c)

    def derivatives_at(self, off: torch.Tensor, kf: torch.Tensor, lam: torch.Tensor, consts=None):
        """First and second derivatives in ``lam`` of the log-likelihood of the counts ``kf`` (float,
        clipped) whose offsets ``off`` come from :func:`count_offsets` of ``offsets3`` (``consts``: the
        count polynomials of :func:`count_constants`, precomputed for repeated calls)."""
        k1, a2, a3, a4 = count_constants(kf) if consts is None else consts
        lam = lam.clamp(LAMBDA_MIN * 1.0001, LAMBDA_MAX * 0.999)
        pos, u = grid_pos(lam)
        p1, p2 = self.planes()
        idx = pos.add_(off).sub_(1)
        r1 = _horner(p1, idx, u).exp_()
        r2 = _horner(p2, idx, u).exp_()
        d1 = torch.addcmul(kf, k1, r1, value=-1).div_(lam)
        d2 = torch.addcmul(a2, a3, r1, value=-1).addcmul_(a4, r2).div_(lam).div_(lam).addcmul_(d1, d1, value=-1)
        return d1, d2

    def derivatives(self, y: torch.Tensor, lam: torch.Tensor):
        """First and second derivatives in ``lam`` of the log-likelihood, elementwise."""
        kf = y.clamp(0, K_MAX).to(lam.dtype)
        return self.derivatives_at(count_offsets(y, self.offsets3), kf, lam)


_F_SPEC: dict = {}


@functools.lru_cache(maxsize=8)
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
    f_spec = _poisson_spectrum(t0, n_t, n_e, n_fft)
    p_spec = torch.fft.rfft(torch.flip(p, [0]), n_fft)[None, :]
    rows = rows.long()

    def part(bounds):
        spec = f_spec.index_select(0, rows[bounds[0]:bounds[1]]).mul_(p_spec)
        return torch.fft.irfft(spec, n_fft)[:, 2 * n_e: 2 * n_e + n_t].clamp_min(1e-300).log_()

    cpu = torch.device("cpu")
    return torch.cat(run_parallel(part, parts(len(rows), 1 << 30, cpu), cpu))     # two halves of the rows


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
def _psd_norm(h: torch.Tensor, floor: float = 1e-3):
    """The matrices with their eigenvalues clipped at ``floor`` (RCTD's psd) and their largest eigenvalue
    (RCTD's 2-norm). A Cholesky test skips the eigendecomposition for the matrices that already have every
    eigenvalue above the floor; their norm comes from power iteration."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    _, info = torch.linalg.cholesky_ex(h - floor * eye)
    bad = info != 0
    norm = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
    n_bad = int(bad.sum())
    if n_bad:
        vals, vecs = torch.linalg.eigh(h[bad])
        vals = vals.clamp_min(floor)
        h = h.clone()
        h[bad] = (vecs * vals[:, None, :]) @ vecs.transpose(1, 2)
        norm[bad] = vals[:, -1]
    if n_bad < h.shape[0]:
        good = ~bad
        norm[good] = _spectral_norm(h[good])
    return h, norm


def _spectral_norm(m: torch.Tensor, n_iter: int = 12) -> torch.Tensor:
    """Largest eigenvalue of a batch of symmetric positive definite matrices (power iteration)."""
    v = torch.ones(m.shape[:-1] + (1,), dtype=m.dtype, device=m.device)
    for _ in range(n_iter):
        v = torch.bmm(m, v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (v * torch.bmm(m, v)).sum((1, 2))


def _bulk_derivatives(b: torch.Tensor, lam: torch.Tensor):
    """RCTD's bulk mode: the log-likelihood is replaced by ``-(log lam - log b)^2``."""
    r = torch.log(lam) - torch.log(b)
    return -2 * r / lam, -2 * (1 - r) / lam ** 2


class _Batch:
    """The fixed part of a batch of problems: profiles ``prof`` (k, G) shared or (B, k, G) per problem,
    the spots' totals, counts, floors on the mean and, for the likelihood, the counts' table offsets;
    for shared profiles the products ``prof_k * prof_l`` of the Hessian's upper triangle (G, pairs)."""

    def __init__(self, prof, scale, y, thr, table, pairs=None):
        self.prof, self.scale, self.y, self.thr = prof, scale, y, thr
        self.shared = prof.dim() == 2
        if table is not None:
            self.kf = y.clamp(0, K_MAX)
            self.off = count_offsets(y, table.offsets3)
            self.consts = count_constants(self.kf)
        if self.shared and pairs is None:
            k = prof.shape[0]
            iu, ju = torch.triu_indices(k, k, device=prof.device)
            pairs = (iu, ju, (prof[iu] * prof[ju]).T.contiguous())
        self.pairs = pairs

    def take(self, keep: torch.Tensor) -> "_Batch":
        out = _Batch.__new__(_Batch)
        out.__dict__.update(self.__dict__)
        for name in ("scale", "y", "thr", "kf", "off"):
            if name in self.__dict__:
                setattr(out, name, self.__dict__[name][keep])
        if "consts" in self.__dict__:
            out.consts = tuple(v[keep] for v in self.consts)
        if not self.shared:
            out.prof = self.prof[keep]
        return out

    def hessian(self, d2: torch.Tensor) -> torch.Tensor:
        """``-sum_g d2_g prof_g prof_g'`` per problem."""
        if not self.shared:
            return -torch.bmm(self.prof * d2[:, None, :], self.prof.transpose(1, 2))
        iu, ju, p2 = self.pairs
        h = d2 @ p2
        k = self.prof.shape[0]
        out = torch.empty((d2.shape[0], k, k), dtype=h.dtype, device=h.device)
        out[:, iu, ju] = h
        out[:, ju, iu] = h
        return out.neg_()


def _newton_step(batch: _Batch, w, table, bulk, free):
    """One damped step for a batch (``w`` (B, k)); returns the new weights and the QP's support (the
    next step's starting guess)."""
    w = w.clamp_min(0.0)
    prof, scale = batch.prof, batch.scale
    raw = w @ prof if batch.shared else torch.bmm(w[:, None, :], prof)[:, 0]
    lam = torch.maximum((raw * scale[:, None]).abs(), batch.thr[:, None])
    if bulk:
        d1, d2 = _bulk_derivatives(batch.y, lam)
    else:
        d1, d2 = table.derivatives_at(batch.off, batch.kf, lam, batch.consts)
    d1, d2 = d1.mul_(scale[:, None]), d2.mul_((scale * scale)[:, None])
    grad = -(d1 @ prof.T) if batch.shared else -torch.bmm(prof, d1[:, :, None])[:, :, 0]
    d_mat, norm = _psd_norm(batch.hessian(d2))
    d_mat = d_mat / norm[:, None, None] + 1e-7 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    d_vec = -grad / norm[:, None]
    x = qp_nonneg(d_mat, torch.bmm(d_mat, w[:, :, None])[:, :, 0] + d_vec, free0=free)   # x = w + step >= 0
    return w + 0.3 * (x - w), x > 0


def _iterate(batch: _Batch, w, table, bulk, n_iter, min_change):
    """Damped Newton steps until each problem's L1 change falls below ``min_change``: a finished problem
    keeps its last step (as RCTD stops it) and leaves the batch at once."""
    w = w.clone()
    conv = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    act = torch.arange(w.shape[0], device=w.device)
    wa, free = w, None
    for _ in range(n_iter):
        new, free = _newton_step(batch, wa, table, bulk, free)
        done = (new - wa).abs().sum(1) <= min_change
        wa = new
        if bool(done.any()):
            w[act[done]] = new[done]
            conv[act[done]] = True
            keep = ~done
            if not bool(keep.any()):
                return w, conv
            act, wa, free, batch = act[keep], wa[keep], free[keep], batch.take(keep)
    w[act] = wa
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
    dev = prof_t.device
    weights = torch.full((n_prob, k), 1.0 / k, dtype=prof_t.dtype, device=dev)
    if w0 is not None:
        weights = w0.to(prof_t.dtype).clone()
    conv = torch.zeros(n_prob, dtype=torch.bool, device=dev)
    if n_prob == 0:
        return weights, conv
    pairs = None
    if types is None and not bulk:
        iu, ju = torch.triu_indices(prof_t.shape[0], prof_t.shape[0], device=dev)
        pairs = (iu, ju, (prof_t[iu] * prof_t[ju]).T.contiguous())
    if table is not None and not bulk:
        table.planes()                                   # built once, before any worker reads it

    def part(bounds):
        idx = torch.arange(bounds[0], bounds[1], device=dev)
        sp_idx = idx if spots is None else spots[idx]
        prof = prof_t if types is None else prof_t[types[idx]]
        thr = torch.clamp(numi[sp_idx] * 1e-7, min=1e-4)
        batch = _Batch(prof, numi[sp_idx], y[sp_idx], thr, None if bulk else table, pairs)
        return _iterate(batch, weights[idx], table, bulk, n_iter, min_change)

    jobs = parts(n_prob, chunk, dev)
    for (lo, hi), (w, c) in zip(jobs, run_parallel(part, jobs, dev)):
        weights[lo:hi], conv[lo:hi] = w, c
    return weights, conv


def scores(prof_t, y, numi, table, weights, *, types=None, spots=None) -> torch.Tensor:
    """Negative log-likelihood of each problem at its weights (RCTD's score: no floor on the mean
    besides the table's range)."""
    sp_idx = torch.arange(y.shape[0], device=y.device) if spots is None else spots
    if types is None:
        lam = (weights @ prof_t) * numi[sp_idx][:, None]
    else:
        lam = torch.bmm(weights[:, None, :], prof_t[types])[:, 0] * numi[sp_idx][:, None]
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


class _SigmaProfile:
    """The score of each candidate sigma at fixed fitted means: ``min over m in 0.8..1.2`` of the negative
    log-likelihood of the counts at ``m * pred``. Tables of the counts' rows only (no derivatives); the grid
    positions of the scaled means are computed once per set of means and reused for every sigma."""

    MULTIPLIERS = (0.8, 0.9, 1.0, 1.1, 1.2)
    MAX_CACHED = 1 << 23          # elements (5 x spots x genes) up to which the positions are kept

    def __init__(self, y: torch.Tensor):
        self.device = y.device
        self.rows = torch.unique(y.clamp(0, K_MAX).long()).cpu().numpy()
        self.off = count_offsets(y, row_offsets(self.rows, False).to(y.device))
        self.pred = None
        self.coef = None

    def set_means(self, pred: torch.Tensor):
        self.pred = pred
        self.coef = None
        if pred.numel() * len(self.MULTIPLIERS) <= self.MAX_CACHED:
            self.coef = [self._at(pred * m) for m in self.MULTIPLIERS]

    def _at(self, lam):
        pos, c = grid_coef(lam)
        return pos.add_(self.off).sub_(1), c

    def __call__(self, sigma: float) -> float:
        tab = likelihood_table(float(sigma), self.device, self.rows)

        def one(i):
            idx, c = self.coef[i] if self.coef is not None else self._at(self.pred * self.MULTIPLIERS[i])
            return -float(_interp(tab.flat, idx, c).sum())

        return min(run_parallel(one, list(range(len(self.MULTIPLIERS))), self.device))


def _window_argmin(score, i0: int, lo: int, hi: int) -> int:
    """Argmin of ``score`` over grid indices ``lo..hi`` for a unimodal score (a likelihood profile in
    sigma is, in practice): the downhill side of ``i0``, then its far end (RCTD's window is often
    crossed in one epoch: two tables settle it), else a descent from ``i0``. Equals the window's argmin,
    which RCTD computes from all 17 tables, whenever the profile is unimodal on the window."""
    cache = {}

    def f(i):
        if i not in cache:
            cache[i] = score(i)
        return cache[i]

    for step, end in ((-1, lo), (1, hi)):
        if i0 == end or f(i0 + step) >= f(i0):
            continue
        i = i0 + step
        if abs(end - i) >= 2 and f(end) < f(end - step) and f(end) < f(i):
            return end
        while i != end and f(i + step) < f(i):
            i += step
        return i
    return i0


def choose_sigma(prof_t: torch.Tensor, y: torch.Tensor, numi: torch.Tensor, *, n_epoch: int = 8,
                 sigma0: float = 1.0, log=None, exhaustive: bool = False) -> float:
    """RCTD's choose_sigma_c on the spots given: fit the weights at the current sigma, then the sigma
    (of RCTD's grid, within 8 steps of the current one) whose likelihood of the counts at the fitted
    means, scaled by the best of 0.8..1.2, is highest; repeat until it stays put (at most ``n_epoch``
    fits). Each epoch's fit starts from the previous epoch's weights (RCTD restarts from uniform weights:
    same optimum, fewer steps). The window's argmin by :func:`_window_argmin` (a few tables per epoch);
    ``exhaustive``: from all its tables, as RCTD does (the same sigma when the profile is unimodal)."""
    rows = needed_rows(y)
    profile = _SigmaProfile(y)
    sigma = float(sigma0)
    w = None
    for _ in range(n_epoch):
        table = likelihood_table(sigma, prof_t.device, rows)
        w, _ = fit_weights(prof_t, y, numi, table, w0=w)
        profile.set_means(((w @ prof_t) * numi[:, None]).clamp_min(1e-4))
        i0 = int(np.argmin(np.abs(SIGMA_GRID - sigma)))
        lo, hi = max(0, i0 - 8), min(len(SIGMA_GRID) - 1, i0 + 8)
        if exhaustive:
            best = min(range(lo, hi + 1), key=lambda i: profile(SIGMA_GRID[i]))
        else:
            best = _window_argmin(lambda i: profile(SIGMA_GRID[i]), i0, lo, hi)
        new = float(SIGMA_GRID[best])
        if log is not None:
            log(f"sigma {sigma:.2f} -> {new:.2f}")
        if abs(new - sigma) < 1e-9:
            break
        sigma = new
    return sigma
