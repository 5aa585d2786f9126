"""Structured kernel interpolation (SKI / KISS-GP, Wilson & Nickisch 2015) of the 2-D SE kernel.

``K ~ M' G M``: ``M`` (grid x spots, stored as spots x grid CSR and its transpose) interpolates from a
regular 2-D grid to the spots with local Lagrange polynomials of ``order`` nodes per axis (``order^2``
weights per spot), and ``G`` is the SE kernel between grid nodes. SE is separable,
``exp(-(dx^2 + dy^2) / 2l^2) = exp(-dx^2 / 2l^2) exp(-dy^2 / 2l^2)``, so ``G = Gx (x) Gy`` (Kronecker) and
``G V`` for a block of columns is two small dense products on the grid reshaped to ``(gx, gy, cols)``.

Grid spacing ``h = l / c``. The largest entry error of ``M' G M`` against the exact kernel, measured on
random points (1-D, both arguments interpolated), is ``~0.14 c^-order`` for order 4 and 6 (c = 2..8; ~0.2 c^-8 for order 8); in
2-D the two axes add, so ``c = (0.28 / eps)^(1/order)`` for a target entry error ``eps`` (checked on DLPFC:
the largest entry error of the built operator is 1.0e-6 for ``eps = 1e-6``, order 6, every default lengthscale).
Order 6 (36 weights per spot) is the default: at ``eps = 1e-6`` it needs a 3.3x coarser grid per axis
than cubic (order 4) interpolation, and the grid products dominate the cost.

Everything the score test needs:

- ``K Z``: ``M' (G (M Z))``; ``z'Kz = (M z)' G (M z)`` (one interpolation fewer);
- ``diag K = 1`` (exact, SE);
- ``rowsum(K o K)``: ``K o K`` is the SE kernel with lengthscale ``l / sqrt 2``, applied to ones by its own
  SKI operator;
- ``rowsum(A o B)`` (omnibus): SE x SE is SE with ``1/l^2 = 1/la^2 + 1/lb^2`` (SKI on ones); with a
  factor ``F`` (low rank, cosine) ``sum_k f_k o (A f_k)``; with a sparse or dense SE matrix the SE entries
  are evaluated exactly at its stored entries.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from . import spatial_kernels as sk

__all__ = ["SKIKernel", "se_ski", "ski_grid_shape", "ski_bytes", "ski_cost", "ski_factor"]

# entry error ~ _ERR_CONST[order] * c^-order per axis (measured, see the module docstring)
_ERR_CONST = {4: 0.14, 6: 0.14, 8: 0.2}


def ski_factor(order: int, eps: float) -> float:
    """Grid points per lengthscale ``c`` for a target largest entry error ``eps`` (2-D)."""
    return max(2.0, (2.0 * _ERR_CONST.get(order, 0.2) / eps) ** (1.0 / order))


def _axis(x: np.ndarray, h: float, order: int):
    """Grid origin and size along one axis so that every point has ``order`` nodes around it."""
    left = order // 2 - 1
    lo, hi = float(x.min()), float(x.max())
    x0 = lo - left * h
    g = int(math.floor((hi - x0) / h)) + order // 2 + 1
    return x0, g


def ski_grid_shape(coords, lengthscale: float, order: int = 6, eps: float = 1e-6) -> tuple[int, int, float]:
    """``(gx, gy, h)`` of the grid for ``lengthscale`` (no allocation).

    ``h = l / c`` with ``c = ski_factor(order, eps)``; where the grid products then cost less than the
    interpolations (long lengthscales: small grids), the grid is refined almost for free, by factors of 1.25
    while ``gx gy (gx + gy) <= 2 order^2 n`` (a third of the interpolation cost), up to ``c`` for
    ``eps = 1e-13``. Long
    lengthscales need it: there ``P K`` is small against ``K`` (``P 1 = 0`` removes the near-constant part),
    so ``e`` and ``I`` cancel and amplify the entry error (on DLPFC, ``l = 10787``: ``I`` 1.7e-4 relative at
    ``eps = 1e-6`` without refinement).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    c = ski_factor(order, eps)
    c_max = max(c, ski_factor(order, 1e-13))

    def shape(c):
        h = lengthscale / c
        return _axis(coords[:, 0], h, order)[1], _axis(coords[:, 1], h, order)[1], h

    gx, gy, h = shape(c)
    while c * 1.25 <= c_max:
        nx, ny, nh = shape(c * 1.25)
        if nx * ny * (nx + ny) > 2.0 * order * order * n:
            break
        c, gx, gy, h = c * 1.25, nx, ny, nh
    return gx, gy, h


def _col_chunk(ngrid: int, target_bytes: int = 64 * 1024 ** 2) -> int:
    return max(1, target_bytes // (8 * max(ngrid, 1)))


def ski_bytes(n: int, gx: int, gy: int, order: int = 6) -> int:
    """Memory of the operator and one column block of grid work arrays (and the build's temporaries)."""
    nnz = n * order * order
    ngrid = gx * gy
    cc = _col_chunk(ngrid)
    return int(2 * 16 * nnz * 2 + 8 * (gx * gx + gy * gy) + 3 * 8 * ngrid * cc)


def ski_cost(n: int, gx: int, gy: int, order: int = 6) -> float:
    """Multiply-adds per column of ``K Z``: two interpolations (sparse products, weighted x3: measured
    ~3x slower per operation than the dense grid products on CPU) and two grid products."""
    return 6.0 * order * order * n + gx * gy * (gx + gy)


def _lagrange_weights(s: torch.Tensor, order: int) -> torch.Tensor:
    """Weights (n x order) of the Lagrange polynomial through nodes ``-(order/2 - 1) .. order/2`` at
    ``s`` in [0, 1]."""
    offs = [j - (order // 2 - 1) for j in range(order)]
    cols = []
    for j, oj in enumerate(offs):
        w = torch.ones_like(s)
        for m, om in enumerate(offs):
            if m != j:
                w = w * (s - om) / (oj - om)
        cols.append(w)
    return torch.stack(cols, 1)


def _csr(crow, col, val, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta", invariant checks
        return torch.sparse_csr_tensor(crow, col.contiguous(), val.contiguous(), size=size, check_invariants=False)


class SKIKernel(sk._Kernel):
    """SE kernel on 2-D coordinates as ``M' (Gx (x) Gy) M`` (see the module docstring)."""
    kind = "ski"

    def __init__(self, coords, lengthscale: float, device: torch.device, dtype=torch.float64,
                 order: int = 6, eps: float = 1e-6, name: str | None = None):
        if order < 2 or order % 2:
            raise ValueError("order must be even and >= 2")
        xy = np.asarray(coords, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError("SKI needs 2-D coordinates")
        self.n = xy.shape[0]
        self.lengthscale, self.order, self.eps = float(lengthscale), int(order), float(eps)
        self.name = name or f"SE_l{lengthscale:.5g}"
        self.device, self.dtype = device, dtype
        self.coords = torch.as_tensor(xy, device=device)
        gx, gy, h = ski_grid_shape(xy, lengthscale, order, eps)
        self.h = h
        (x0, gx), (y0, gy) = _axis(xy[:, 0], h, order), _axis(xy[:, 1], h, order)
        self.gx, self.gy = gx, gy
        left = order // 2 - 1
        idx, wts = [], []
        for d, (o, g) in enumerate(((x0, gx), (y0, gy))):
            t = (self.coords[:, d] - o) / h
            i0 = torch.floor(t).clamp(left, g - order // 2 - 1)
            wts.append(_lagrange_weights(t - i0, order))
            idx.append(i0.long() - left)
        # weights per spot: outer product of the axis weights; grid column = ix * gy + iy
        ar = torch.arange(order, device=device)
        cols = ((idx[0][:, None] + ar)[:, :, None] * gy + (idx[1][:, None] + ar)[:, None, :]).reshape(self.n, -1)
        vals = (wts[0][:, :, None] * wts[1][:, None, :]).reshape(self.n, -1).to(dtype)
        p2 = order * order
        crow = torch.arange(0, self.n * p2 + 1, p2, device=device)
        self.M = _csr(crow, cols.reshape(-1), vals.reshape(-1), (self.n, gx * gy))  # spots x grid
        m = sp.csr_matrix((vals.reshape(-1).cpu().numpy(), cols.reshape(-1).cpu().numpy(), crow.cpu().numpy()),
                          shape=(self.n, gx * gy)).T.tocsr()
        self.Mt = _csr(torch.as_tensor(m.indptr, dtype=torch.int64, device=device),
                       torch.as_tensor(m.indices, dtype=torch.int64, device=device),
                       torch.as_tensor(m.data, dtype=dtype, device=device), (gx * gy, self.n))
        ux = x0 + h * torch.arange(gx, device=device, dtype=torch.float64)
        uy = y0 + h * torch.arange(gy, device=device, dtype=torch.float64)
        inv = 1.0 / (2.0 * lengthscale ** 2)
        self.Gx = torch.exp(-((ux[:, None] - ux[None, :]) ** 2) * inv).to(dtype)
        self.Gy = torch.exp(-((uy[:, None] - uy[None, :]) ** 2) * inv).to(dtype)
        self._q = None

    # -- products
    def _grid(self, V: torch.Tensor) -> torch.Tensor:
        c = V.shape[1]
        T = (self.Gx @ V.reshape(self.gx, self.gy * c)).reshape(self.gx, self.gy, c)
        return torch.matmul(self.Gy, T).reshape(self.gx * self.gy, c)

    def _blocks(self, x: torch.Tensor):
        step = _col_chunk(self.gx * self.gy)
        for s in range(0, x.shape[1], step):
            yield s, x[:, s:s + step].contiguous()

    def mm(self, x):
        out = torch.empty(self.n, x.shape[1], dtype=x.dtype, device=x.device)
        for s, xb in self._blocks(x):
            out[:, s:s + xb.shape[1]] = self.M @ self._grid(self.Mt @ xb)
        return out

    def quad(self, z):
        out = torch.empty(z.shape[1], dtype=z.dtype, device=z.device)
        for s, zb in self._blocks(z):
            V = self.Mt @ zb
            out[s:s + zb.shape[1]] = (V * self._grid(V)).sum(0)
        return out

    def diag(self):
        return torch.ones(self.n, dtype=self.dtype, device=self.device)

    def _se_rowsum(self, lengthscale: float) -> torch.Tensor:
        """``rowsum`` of the SE kernel with another lengthscale on the same spots (its own SKI grid)."""
        op = SKIKernel(self.coords.cpu().numpy(), lengthscale, self.device, self.dtype, self.order, self.eps)
        return op.mm(torch.ones(self.n, 1, dtype=self.dtype, device=self.device))[:, 0]

    def sq_rowsum(self):
        if self._q is None:  # K o K = SE with lengthscale l / sqrt(2)
            self._q = self._se_rowsum(self.lengthscale / math.sqrt(2.0))
        return self._q

    def se_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Exact SE entries ``k(x_rows, x_cols)``."""
        d = ((self.coords[rows] - self.coords[cols]) ** 2).sum(1)
        return torch.exp(-d / (2.0 * self.lengthscale ** 2)).to(self.dtype)

    def hadamard_rowsum_with(self, other) -> torch.Tensor:
        """``rowsum(self o other)``."""
        if isinstance(other, SKIKernel):
            lc = 1.0 / math.sqrt(1.0 / self.lengthscale ** 2 + 1.0 / other.lengthscale ** 2)
            return self._se_rowsum(lc)
        if isinstance(other, sk.LowRankKernel):
            F = other.F
            out = torch.zeros(self.n, dtype=F.dtype, device=F.device)
            for s in range(0, F.shape[1], 256):
                Fb = F[:, s:s + 256]
                out += (self.mm(Fb) * Fb).sum(1)
            return out
        if isinstance(other, sk.SparseKernel):
            rows, cols, val = other.rows(), other.K.col_indices(), other.K.values()
            out = torch.zeros(self.n, dtype=val.dtype, device=val.device)
            step = 1 << 22
            for s in range(0, val.numel(), step):
                r, c = rows[s:s + step], cols[s:s + step]
                out.index_add_(0, r, val[s:s + step] * self.se_at(r, c))
            return out
        if isinstance(other, sk.DenseKernel):
            out = torch.empty(self.n, dtype=other.K.dtype, device=other.K.device)
            inv = 1.0 / (2.0 * self.lengthscale ** 2)
            for s in range(0, self.n, 1024):
                D = sk._sqdist_block(self.coords[s:s + 1024], self.coords)
                out[s:s + 1024] = (other.K[s:s + 1024] * torch.exp(-D * inv).to(other.K.dtype)).sum(1)
            return out
        raise TypeError(f"no Hadamard row sum for SKIKernel and {type(other).__name__}")

    @property
    def nbytes(self):
        nnz = self.M.values().numel()
        return int(2 * 16 * nnz + 8 * (self.gx ** 2 + self.gy ** 2))

    def info(self):
        return {"kind": self.kind, "grid": f"{self.gx} x {self.gy}", "spacing": self.h,
                "order": self.order, "eps": self.eps}


def se_ski(coords, lengthscale: float, device: torch.device, dtype=torch.float64, order: int = 6,
           eps: float = 1e-6) -> SKIKernel:
    """SKI representation of the SE kernel on 2-D ``coords`` (see :class:`SKIKernel`)."""
    return SKIKernel(coords, lengthscale, device, dtype, order=order, eps=eps)
