"""Sparse-aware scaling and principal component analysis in torch (CPU and CUDA, same code).

The matrix analysed is ``Z = D - 1 mu^T``: a sparse (or dense) ``D`` minus its column means ``mu``.
``Z`` is never formed: products use ``Z A = D A - 1 (mu^T A)`` and ``Z^T B = D^T B - mu (1^T B)``.
Scaling to unit variance with clipping keeps that shape, because a standardised zero is the same
constant for every cell of a gene (see :func:`scale_sparse`).

Three solvers:
- ``"arpack"``: the implicitly restarted Lanczos method (ARPACK through ``scipy.sparse.linalg.eigsh``) on
  the p x p covariance operator ``v -> Z^T (Z v) / (n - 1)``, the products running in torch on the
  device. Exact to machine precision for the leading ``k`` components at O(nnz) per product; the
  starting vector comes from ``seed``.
- ``"full"``: the p x p covariance ``(D^T D - n mu mu^T) / (n - 1)`` is formed exactly, ``D^T D``
  accumulated over row blocks (a block of rows densified at a time: memory O(p^2 + block x p), dense
  BLAS work), then eigen-decomposed: ``torch.linalg.eigh`` on CUDA or for p <= 1000, else ARPACK for the
  leading k on the dense covariance (machine precision, much cheaper than a full eigh on the CPU).
  Deterministic; the default while p (the number of genes) is at most 10,000.
- ``"randomized"``: the randomized range finder with subspace (power) iterations of Halko, Martinsson &
  Tropp (2011, SIAM Review 53:217), with the implicit centring above. O(nnz x (k + oversampling)) per
  pass. The random test matrix is drawn on the CPU from ``seed`` so CPU and CUDA runs start alike.

Components are sign-fixed: each loading vector has its largest-magnitude entry positive.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError
from .device import sparse_as_tensor
from .stats import mean_var


def scale_sparse(x, *, center: bool = True, scale: bool = True, max_value: float | None = None,
                 dtype=np.float64) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Standardise the columns of ``x`` (cells x genes) without densifying it.

    The standardised matrix ``S = clip((x - mean) / std)`` (std with ddof=1; zero std taken as 1; clip to
    ``[-max_value, max_value]``) is returned as ``S = D + 1 c^T`` where ``D`` has ``x``'s sparsity
    pattern and ``c_j = clip(-mean_j / std_j)`` is the standardised value of a zero. Without
    ``center`` the values are ``clip(x / std)`` and ``c = 0``. Returns ``(D, c, mean, std)``; a PCA
    of ``S`` is a PCA of ``D`` (centring removes ``c``).
    """
    x = x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
    mean, var = mean_var(x, axis=0, ddof=1)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    if not scale:
        std = np.ones_like(std)
    col = x.indices
    vals = np.asarray(x.data, dtype=np.float64)
    shift = mean if center else np.zeros_like(mean)
    vals = (vals - shift[col]) / std[col]
    c = -shift / std
    if max_value is not None:
        lo = -max_value if center else -np.inf
        vals = np.clip(vals, lo, max_value)
        c = np.clip(c, lo, max_value)
    d = sp.csr_matrix(((vals - c[col]).astype(dtype), col.copy(), x.indptr.copy()), shape=x.shape)
    return d, c, mean, std


class _Centered:
    """Products with ``Z = D - 1 mu^T`` for a sparse or dense ``D`` held on ``device``.

    A sparse ``D`` dense enough that a dense float64 copy is no larger than its sparse copies (about
    20 bytes per stored value) is held dense: same memory, faster products.
    """

    def __init__(self, d, device: torch.device, chunk_elems: int = 1 << 23):
        self.device = device
        self.n, self.p = d.shape
        self.sparse = sp.issparse(d)
        if self.sparse and 8.0 * self.n * self.p <= 20.0 * d.nnz:
            d, self.sparse = d.toarray(), False
        self._dt = None
        if self.sparse:
            d = d.tocsr()
            self.d_host = d
            with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
                warnings.simplefilter("ignore", UserWarning)
                self.d = sparse_as_tensor(d, device)
            data = np.asarray(d.data, dtype=np.float64)
            self.mu = torch.as_tensor(np.bincount(d.indices, weights=data, minlength=self.p) / self.n,
                                      device=device)
            sumsq = float(np.dot(data, data))
        else:
            self.d = torch.as_tensor(np.asarray(d, dtype=np.float64), device=device)
            self.mu = self.d.mean(0)
            sumsq = float((self.d**2).sum())
        self.total_var = (sumsq - self.n * float((self.mu**2).sum())) / max(self.n - 1, 1)
        self.chunk_rows = max(1, chunk_elems // max(self.p, 1))

    def mv(self, a: torch.Tensor) -> torch.Tensor:  # Z @ a
        return self.d @ a - (self.mu @ a)[None, :]

    @property
    def dt(self):  # D^T as its own CSR tensor, built on first use (ARPACK / randomized only)
        if self._dt is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._dt = sparse_as_tensor(self.d_host.T.tocsr(), self.device)
        return self._dt

    def rmv(self, b: torch.Tensor) -> torch.Tensor:  # Z^T @ b
        zt = self.dt @ b if self.sparse else self.d.T @ b
        return zt - self.mu[:, None] * b.sum(0)[None, :]

    def gram(self) -> torch.Tensor:  # Z^T Z
        g = torch.zeros(self.p, self.p, dtype=torch.float64, device=self.device)
        for start in range(0, self.n, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.n)
            if self.sparse:
                block = torch.as_tensor(self.d_host[start:stop].toarray(), device=self.device)
            else:
                block = self.d[start:stop]
            g.addmm_(block.T, block)
        return g - self.n * torch.outer(self.mu, self.mu)


def _eigsh(matmat, p: int, k: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``k`` eigenpairs of a symmetric p x p operator given by ``matmat`` (torch on ``device``).

    ARPACK (``scipy.sparse.linalg.eigsh``) drives the iteration on the host with a seeded starting
    vector and tolerance 0 (machine precision); only p-vectors cross to the device.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    def mm(b):
        bt = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(p, -1), device=device)
        return matmat(bt).cpu().numpy()

    op = LinearOperator((p, p), matvec=lambda b: mm(b).ravel(), matmat=mm, dtype=np.float64)
    v0 = np.random.default_rng(int(seed)).uniform(-1.0, 1.0, p)
    evals, evecs = eigsh(op, k=k, which="LA", v0=v0, tol=0)
    order = np.argsort(evals)[::-1]
    variance = torch.as_tensor(np.clip(evals[order], 0, None), device=device)
    return variance, torch.as_tensor(np.ascontiguousarray(evecs[:, order]), device=device)


def _sign_fix(v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = v.abs().argmax(0)
    s = torch.sign(v[idx, torch.arange(v.shape[1], device=v.device)])
    s[s == 0] = 1
    return v * s, u * s


def choose_solver(n: int, p: int, n_comps: int, device: torch.device | None = None) -> str:
    """``"full"`` while the p x p covariance is small (p <= 10,000 genes), else ``"arpack"``.

    Accumulating ``D^T D`` is dense BLAS work (n p^2 flops) and measured ~50x faster per operation than
    the sparse products that ARPACK repeats a few hundred times, so the covariance route wins whenever
    it fits in memory.
    """
    return "full" if p <= 10_000 else "arpack"


def pca(d, n_comps: int = 50, *, solver: str = "auto", seed: int = 0, device: torch.device | None = None,
        n_iter: int = 7, n_oversamples: int = 20) -> dict[str, np.ndarray]:
    """PCA of the column-centred ``d`` (cells x genes, sparse or dense), centring never materialised.

    Returns float64 arrays: ``scores`` (n x k), ``components`` (p x k loadings, unit columns),
    ``variance`` (k, the eigenvalues of the ddof=1 covariance), ``variance_ratio`` (over the total
    variance of all p columns), ``mean`` (p); and ``solver``, the one used.
    """
    device = device or torch.device("cpu")
    n, p = d.shape
    k = int(n_comps)
    if k < 1 or k > min(n, p):
        raise InputError(f"n_comps={n_comps} must lie in [1, min(n_obs, n_vars) = {min(n, p)}]")
    if solver == "auto":
        solver = choose_solver(n, p, k, device)
    if solver not in ("full", "arpack", "randomized"):
        raise InputError(f"svd_solver must be 'auto', 'full', 'arpack' or 'randomized', not {solver!r}")
    if solver == "arpack" and k >= p:
        solver = "full"  # ARPACK finds at most p - 1 eigenpairs
    if solver == "full":
        check_dense_fits(p, 2 * p, f"PCA svd_solver='full' on {p} genes (use 'randomized')")
    elif not sp.issparse(d):
        check_dense_fits(n, p, "PCA on a dense matrix")
    z = _Centered(d, device)
    if solver == "full":
        cov = z.gram() / max(n - 1, 1)
        if device.type == "cuda" or p <= 1000 or k >= p - 1:
            evals, evecs = torch.linalg.eigh(cov)
            variance = evals.flip(0)[:k].clamp_min(0)
            v = evecs.flip(1)[:, :k].contiguous()
        else:  # on the CPU, Lanczos for the leading k of the dense covariance beats a full eigh
            variance, v = _eigsh(lambda b: cov @ b, p, k, seed, device)
        u = z.mv(v)  # scores = Z V
    elif solver == "arpack":
        variance, v = _eigsh(lambda b: z.rmv(z.mv(b)) / max(n - 1, 1), p, k, seed, device)
        u = z.mv(v)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        ell = min(k + int(n_oversamples), min(n, p))
        omega = torch.randn(p, ell, generator=gen, dtype=torch.float64).to(device)
        q, _ = torch.linalg.qr(z.mv(omega))
        for _ in range(int(n_iter)):
            w, _ = torch.linalg.qr(z.rmv(q))
            q, _ = torch.linalg.qr(z.mv(w))
        bt = z.rmv(q)                                      # p x ell = (Q^T Z)^T
        wv, s, uth = torch.linalg.svd(bt, full_matrices=False)
        v = wv[:, :k].contiguous()
        u = q @ (uth.T[:, :k] * s[:k])                      # scores = Q U_B S
        variance = s[:k] ** 2 / max(n - 1, 1)
    v, u = _sign_fix(v, u)
    tv = z.total_var if z.total_var > 0 else 1.0
    return {"scores": u.cpu().numpy(), "components": v.cpu().numpy(),
            "variance": variance.cpu().numpy(), "variance_ratio": variance.cpu().numpy() / tv,
            "mean": z.mu.cpu().numpy(), "solver": solver}


def check_dense_fits(n: int, p: int, what: str, limit_bytes: float = 8e9) -> None:
    """Raise ResourceError before a dense n x p float64 array larger than ``limit_bytes`` is made."""
    from ..errors import ResourceError

    need = 8.0 * n * p
    if need > limit_bytes:
        raise ResourceError(f"{what}: a dense {n} x {p} float64 array needs {need / 1e9:.1f} GB "
                            f"(limit {limit_bytes / 1e9:.1f} GB)")


__all__ = ["scale_sparse", "pca", "choose_solver", "check_dense_fits"]
