"""Spatial covariance kernels as linear operators (arrays in, arrays out).

Kernels follow SpatialDE2's definitions (Kats, Vento-Tormo & Stegle 2021):

- ``SE``: squared exponential ``k(a, b) = exp(-|a - b|^2 / (2 l^2))`` (unnormalised, ``k(a, a) = 1``);
- ``PER``: cosine ``k(a, b) = cos(2 pi (sum_d a_d - sum_d b_d) / l)``; with ``u = sum_d a_d`` this is
  ``cos(u_a) cos(u_b) + sin(u_a) sin(u_b)``, i.e. exactly rank 2.

Each kernel is held in one of four representations behind the same small interface (``mm``, ``quad``,
``diag``, ``sq_rowsum``):

- :class:`DenseKernel`  the full ``n x n`` matrix (the exact path, ``n`` up to a few thousand);
- :class:`SparseKernel` SE entries below ``tol`` dropped (short lengthscales; chunked KD-tree search);
- :class:`LowRankKernel` ``K ~ F F'`` from a pivoted Cholesky stopped when the residual trace is below
  ``tol * n`` (long lengthscales), or the exact rank-2 factor of the cosine kernel;
- :class:`SumKernel` a sum of the above (the omnibus test);
- ``expkit.kernels.ski.SKIKernel`` (own module) the SE kernel in 2-D by grid interpolation (middle lengthscales
  on large samples, neither sparse nor low rank).

No ``n x n`` temporary is formed outside :class:`DenseKernel`.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import ConvexHull, cKDTree

__all__ = [
    "default_lengthscales", "DenseKernel", "SparseKernel", "LowRankKernel", "SumKernel",
    "sqdist", "se_dense", "se_sparse", "se_lowrank", "cosine_kernel", "se_sparse_nnz", "hadamard_rowsum",
]


# ----------------------------------------------------------------------------------------------
# lengthscale grid
# ----------------------------------------------------------------------------------------------
def _min_max_distance(coords: np.ndarray) -> tuple[float, float]:
    """Smallest non-zero and largest pairwise Euclidean distance without an n x n matrix."""
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tree = cKDTree(coords)
    k = min(n, 2)
    dmin = np.inf
    while k <= n:
        dist, _ = tree.query(coords, k=k)
        dist = np.atleast_2d(dist)
        pos = dist[dist > 1e-8]  # SpatialDE2 ignores squared distances below 1e-8 (duplicates)
        if pos.size:
            dmin = float(pos.min())
            # every point has a non-zero neighbour among its k nearest, or k = n
            if np.all((dist > 1e-8).any(axis=1)) or k == n:
                break
        if k == n:
            break
        k = min(n, 2 * k)
    # the diameter is attained between convex-hull vertices
    try:
        hull = coords[ConvexHull(coords).vertices] if coords.shape[1] == 2 and n > 3 else coords
    except Exception:  # degenerate (collinear) coordinates
        hull = coords
    dmax = 0.0
    for start in range(0, hull.shape[0], 2048):
        block = hull[start:start + 2048]
        d = np.sqrt(((block[:, None, :] - hull[None, :, :]) ** 2).sum(-1))
        dmax = max(dmax, float(d.max()))
    return dmin, dmax


def default_lengthscales(coords: np.ndarray, n: int = 5) -> np.ndarray:
    """SpatialDE2's default grid: ``n`` log-spaced values from twice the smallest non-zero distance
    to the largest distance between spots."""
    dmin, dmax = _min_max_distance(coords)
    if not np.isfinite(dmin) or dmax <= 0:
        raise ValueError("coordinates have fewer than two distinct positions")
    return np.logspace(np.log10(2.0 * dmin), np.log10(dmax), n)


# ----------------------------------------------------------------------------------------------
# operators
# ----------------------------------------------------------------------------------------------
class _Kernel:
    name: str = ""
    kind: str = ""
    n: int = 0

    def mm(self, x: torch.Tensor) -> torch.Tensor:  # K @ x
        raise NotImplementedError

    def quad(self, z: torch.Tensor) -> torch.Tensor:  # column-wise z' K z
        return (z * self.mm(z)).sum(0)

    def diag(self) -> torch.Tensor:
        raise NotImplementedError

    def sq_rowsum(self) -> torch.Tensor:  # rowsum(K o K)
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return 0

    def info(self) -> dict:
        return {"kind": self.kind}


class DenseKernel(_Kernel):
    kind = "dense"

    def __init__(self, K: torch.Tensor, name: str = ""):
        self.K, self.name, self.n = K, name, K.shape[0]

    def mm(self, x):
        return self.K @ x

    def diag(self):
        return torch.diagonal(self.K).clone()

    def sq_rowsum(self):
        return (self.K * self.K).sum(1)

    @property
    def nbytes(self):
        return self.K.numel() * self.K.element_size()


class SparseKernel(_Kernel):
    kind = "sparse"

    def __init__(self, K: torch.Tensor, name: str = "", tol: float = 0.0):
        self.K, self.name, self.n, self.tol = K, name, K.shape[0], tol  # torch sparse CSR
        self._rows = None
        self.tiles = None  # optional dense tile blocks of the same matrix (see _se_tiles), for quad

    def mm(self, x):
        return self.K @ x

    def quad(self, z):
        if self.tiles is None:
            return (z * self.mm(z)).sum(0)
        # z' K z over the dense blocks between neighbouring spatial tiles (each unordered pair once):
        # dense matrix products instead of a sparse one (several times faster on CPU)
        perm, blocks = self.tiles
        zp = z[perm]
        out = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
        for i0, i1, j0, j1, Kb, w in blocks:
            out += w * (zp[i0:i1] * (Kb @ zp[j0:j1])).sum(0)
        return out

    def diag(self):
        col, val = self.K.col_indices(), self.K.values()
        rows = self.rows()
        out = torch.zeros(self.n, dtype=val.dtype, device=val.device)
        m = rows == col
        return out.index_add_(0, rows[m], val[m])

    def rows(self):
        if self._rows is None:
            crow = self.K.crow_indices()
            self._rows = torch.repeat_interleave(torch.arange(self.n, device=crow.device), crow.diff())
        return self._rows

    def sq_rowsum(self):
        val = self.K.values()
        out = torch.zeros(self.n, dtype=val.dtype, device=val.device)
        return out.index_add_(0, self.rows(), val * val)

    @property
    def nbytes(self):
        tiles = 0 if self.tiles is None else sum(b[4].numel() * b[4].element_size() for b in self.tiles[1])
        return self.K.values().numel() * (self.K.values().element_size() + 8) + (self.n + 1) * 8 + tiles

    def info(self):
        return {"kind": self.kind, "nnz_per_row": float(self.K.values().numel() / max(self.n, 1)),
                "tol": self.tol}


class LowRankKernel(_Kernel):
    """``K ~ F F'``; ``exact_diag`` (when given) replaces ``diag(F F')`` in ``diag()``."""
    kind = "lowrank"

    def __init__(self, F: torch.Tensor, name: str = "", exact_diag: torch.Tensor | None = None,
                 residual: float = 0.0, tol: float = 0.0):
        self.F, self.name, self.n = F, name, F.shape[0]
        self.exact_diag, self.residual, self.tol = exact_diag, residual, tol
        self._G = None

    @property
    def G(self):
        if self._G is None:
            self._G = self.F.T @ self.F
        return self._G

    def mm(self, x):
        return self.F @ (self.F.T @ x)

    def quad(self, z):
        p = self.F.T @ z
        return (p * p).sum(0)

    def diag(self):
        return self.exact_diag.clone() if self.exact_diag is not None else (self.F * self.F).sum(1)

    def sq_rowsum(self):
        return ((self.F @ self.G) * self.F).sum(1)

    @property
    def nbytes(self):
        return self.F.numel() * self.F.element_size()

    def info(self):
        return {"kind": self.kind, "rank": int(self.F.shape[1]), "residual_trace_rel": self.residual,
                "tol": self.tol}


class SumKernel(_Kernel):
    """Sum of kernels (omnibus test). ``sq_rowsum`` includes the cross terms."""
    kind = "sum"

    def __init__(self, parts: list, name: str = "sum"):
        self.parts, self.name, self.n = parts, name, parts[0].n

    def mm(self, x):
        return sum(p.mm(x) for p in self.parts)

    def quad(self, z):
        return sum(p.quad(z) for p in self.parts)

    def diag(self):
        return sum(p.diag() for p in self.parts)

    def sq_rowsum(self):
        out = sum(p.sq_rowsum() for p in self.parts)
        for i in range(len(self.parts)):
            for j in range(i + 1, len(self.parts)):
                out = out + 2 * hadamard_rowsum(self.parts[i], self.parts[j])
        return out

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parts)

    def info(self):
        return {"kind": "sum", "parts": [p.info() for p in self.parts]}


def hadamard_rowsum(a: _Kernel, b: _Kernel) -> torch.Tensor:
    """``rowsum(A o B)`` for two kernel operators, without an n x n temporary where avoidable."""
    if isinstance(a, SumKernel):
        return sum(hadamard_rowsum(p, b) for p in a.parts)
    if isinstance(b, SumKernel):
        return sum(hadamard_rowsum(a, p) for p in b.parts)
    for x, y in ((a, b), (b, a)):  # operators that know their cross terms (expkit.kernels.ski)
        if hasattr(x, "hadamard_rowsum_with"):
            return x.hadamard_rowsum_with(y)
    if isinstance(a, DenseKernel) and isinstance(b, DenseKernel):
        return (a.K * b.K).sum(1)
    if isinstance(b, DenseKernel):
        a, b = b, a
    if isinstance(a, DenseKernel):
        if isinstance(b, LowRankKernel):
            return ((a.K @ b.F) * b.F).sum(1)
        if isinstance(b, SparseKernel):
            return (a.K * b.K.to_dense()).sum(1)
    if isinstance(a, LowRankKernel) and isinstance(b, LowRankKernel):
        return ((a.F @ (a.F.T @ b.F)) * b.F).sum(1)
    if isinstance(b, SparseKernel) and isinstance(a, LowRankKernel):
        a, b = b, a
    if isinstance(a, SparseKernel) and isinstance(b, LowRankKernel):
        rows, cols, val = a.rows(), a.K.col_indices(), a.K.values()
        out = torch.zeros(a.n, dtype=val.dtype, device=val.device)
        step = max(1, int(2 ** 24 // max(b.F.shape[1], 1)))
        for s in range(0, val.numel(), step):  # chunks over non-zeros (bounded memory)
            r, c = rows[s:s + step], cols[s:s + step]
            out.index_add_(0, r, val[s:s + step] * (b.F[r] * b.F[c]).sum(1))
        return out
    if isinstance(a, SparseKernel) and isinstance(b, SparseKernel):
        prod = (a.K.to_sparse_coo() * b.K.to_sparse_coo()).coalesce()
        out = torch.zeros(a.n, dtype=prod.values().dtype, device=prod.values().device)
        return out.index_add_(0, prod.indices()[0], prod.values())
    raise TypeError(f"no Hadamard row sum for {type(a).__name__} and {type(b).__name__}")


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------
def _sqdist_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # exact differences (no |a|^2 + |b|^2 - 2ab cancellation)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    for d in range(a.shape[1]):
        out += (a[:, d, None] - b[None, :, d]) ** 2
    return out


def sqdist(coords, device: torch.device, chunk: int = 2048) -> torch.Tensor:
    """The full matrix of squared distances (exact differences, row chunks)."""
    x = torch.as_tensor(np.asarray(coords, dtype=np.float64), device=device)
    n = x.shape[0]
    D = torch.empty(n, n, dtype=torch.float64, device=device)
    for s in range(0, n, chunk):
        D[s:s + chunk] = _sqdist_block(x[s:s + chunk], x)
    return D


def se_dense(coords, lengthscale: float, device: torch.device, dtype=torch.float64,
             chunk: int = 2048, sqdist_matrix: torch.Tensor | None = None) -> DenseKernel:
    """The full SE kernel matrix (from a shared squared-distance matrix when given)."""
    D = sqdist(coords, device, chunk) if sqdist_matrix is None else sqdist_matrix
    K = torch.exp(D * (-1.0 / (2.0 * lengthscale ** 2))).to(dtype)
    return DenseKernel(K, name=f"SE_l{lengthscale:.5g}")


def _se_cutoff(lengthscale: float, tol: float) -> float:
    return float(lengthscale * math.sqrt(2.0 * math.log(1.0 / tol)))


def se_sparse_nnz(coords, lengthscale: float, tol: float, sample: int = 2000, seed: int = 0) -> float:
    """Estimated non-zeros per row of the truncated SE kernel (KD-tree count on a sample of rows)."""
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tree = cKDTree(coords)
    idx = np.random.default_rng(seed).choice(n, min(n, sample), replace=False) if n > sample else np.arange(n)
    counts = tree.query_ball_point(coords[idx], _se_cutoff(lengthscale, tol), return_length=True)
    return float(np.mean(counts))


def se_sparse(coords, lengthscale: float, tol: float, device: torch.device, dtype=torch.float64,
              chunk: int = 4096) -> SparseKernel:
    """SE kernel with entries below ``tol`` dropped (chunked neighbour search, CSR)."""
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tree = cKDTree(coords)
    r = _se_cutoff(lengthscale, tol)
    blocks = []
    for s in range(0, n, chunk):
        sub = cKDTree(coords[s:s + chunk])
        m = sub.sparse_distance_matrix(tree, r, output_type="ndarray")
        # (the ndarray output keeps zero distances: the diagonal and duplicated positions)
        b = sp.csr_matrix((np.exp(-(m["v"] ** 2) / (2.0 * lengthscale ** 2)), (m["i"], m["j"])),
                          shape=(min(chunk, n - s), n))
        del m
        b.sum_duplicates()
        b.sort_indices()
        blocks.append(b)  # CSR per row chunk: no n-wide coordinate arrays of all non-zeros at once
    m = sp.vstack(blocks, format="csr")
    del blocks
    m.indices = m.indices.astype(np.int64, copy=False)
    m.indptr = m.indptr.astype(np.int64, copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        K = torch.sparse_csr_tensor(torch.as_tensor(m.indptr, dtype=torch.int64),
                                    torch.as_tensor(m.indices, dtype=torch.int64),
                                    torch.as_tensor(m.data, dtype=dtype), size=(n, n),
                                    check_invariants=False).to(device)
    op = SparseKernel(K, name=f"SE_l{lengthscale:.5g}", tol=tol)
    op.tiles = _se_tiles(coords, lengthscale, r, device, dtype)
    return op


def _se_tiles(coords, lengthscale, r, device, dtype, min_per_tile: float = 32.0, max_blocks: int = 4096):
    """Dense blocks of the truncated SE kernel (entries at distance > ``r`` set to 0, as in the sparse
    form) between spatial tiles of side ``r`` that can hold pairs within ``r`` (the tile and its 8
    neighbours; each unordered pair of tiles once, weight 2 off the diagonal). Returns ``(perm, blocks)``
    (spots in tile order) or None when the tiles are too small for dense blocks to pay off (2-D only)."""
    n, d = coords.shape
    if d != 2 or r <= 0:
        return None
    lo = coords.min(0)
    cell = np.floor((coords - lo) / r).astype(np.int64)
    nx = int(cell[:, 0].max()) + 1
    tile = cell[:, 1] * nx + cell[:, 0]
    uniq, counts = np.unique(tile, return_counts=True)
    if n / uniq.size < min_per_tile or uniq.size * 5 > max_blocks:
        return None
    perm = np.argsort(tile, kind="stable")
    start = dict(zip(uniq.tolist(), np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()))
    size = dict(zip(uniq.tolist(), counts.tolist()))
    xs = torch.as_tensor(coords[perm], dtype=torch.float64, device=device)
    inv2l2 = 1.0 / (2.0 * lengthscale ** 2)
    blocks = []
    for a in uniq.tolist():
        ay, ax = divmod(a, nx)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                bx, by = ax + dx, ay + dy
                b = by * nx + bx
                if bx < 0 or bx >= nx or b < a or b not in start:
                    continue
                i0, j0 = start[a], start[b]
                i1, j1 = i0 + size[a], j0 + size[b]
                D = _sqdist_block(xs[i0:i1], xs[j0:j1])
                Kb = torch.where(D <= r * r, torch.exp(-D * inv2l2), torch.zeros_like(D)).to(dtype)
                blocks.append((i0, i1, j0, j1, Kb.contiguous(), 1.0 if a == b else 2.0))
    return torch.as_tensor(perm, device=device), blocks


def se_lowrank(coords, lengthscale: float, tol: float, device: torch.device, max_rank: int,
               dtype=torch.float64, block: int = 1) -> LowRankKernel | None:
    """Pivoted Cholesky ``K ~ F F'`` of the SE kernel, stopped when ``trace(K - F F') <= tol * n``.

    Returns None when ``max_rank`` columns do not reach the tolerance (the kernel is not low rank).
    Cost ``O(n r^2)``, memory ``n x max_rank``.
    """
    x = torch.as_tensor(np.asarray(coords, dtype=np.float64), device=device)
    n = x.shape[0]
    max_rank = int(min(max_rank, n))
    Ft = torch.zeros(max_rank, n, dtype=torch.float64, device=device)  # rows = factor columns
    dres = torch.ones(n, dtype=torch.float64, device=device)
    target = tol * n
    k = 0
    inv2l2 = 1.0 / (2.0 * lengthscale ** 2)
    # a sequential loop of small vector operations: extra threads only add synchronisation (7x slower
    # with 2 threads on a loaded 2-core machine)
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        k = _pivoted_cholesky_loop(x, Ft, dres, target, max_rank, inv2l2)
    finally:
        torch.set_num_threads(threads)
    F = Ft[:k].T
    residual = float(dres.sum()) / n
    if residual > tol:
        return None
    F = F.contiguous().to(dtype)
    return LowRankKernel(F, name=f"SE_l{lengthscale:.5g}",
                         exact_diag=torch.ones(n, dtype=dtype, device=device), residual=residual, tol=tol)


def _pivoted_cholesky_loop(x, Ft, dres, target, max_rank, inv2l2) -> int:
    k = 0
    while k < max_rank:
        if k % 8 == 0 and float(dres.sum()) <= target:  # one host sync every 8 steps
            break
        piv, i = torch.max(dres, 0)
        piv = float(piv)
        if piv <= 0:
            break
        col = torch.exp(-((x - x[i]) ** 2).sum(1) * inv2l2)
        if k:
            col = col - Ft[:k, i] @ Ft[:k]
        f = col / math.sqrt(piv)
        Ft[k] = f
        dres.sub_(f * f).clamp_(min=0.0)
        dres[i] = 0.0
        k += 1
    return k


def cosine_kernel(coords, lengthscale: float, device: torch.device, dtype=torch.float64) -> LowRankKernel:
    """SpatialDE2's ``PER`` kernel, ``cos(2 pi (sum(a) - sum(b)) / l)``, as its exact rank-2 factor."""
    u = 2.0 * math.pi * np.asarray(coords, dtype=np.float64).sum(1) / lengthscale
    F = torch.as_tensor(np.stack([np.cos(u), np.sin(u)], axis=1), dtype=dtype, device=device)
    return LowRankKernel(F, name=f"PER_l{lengthscale:.5g}",
                         exact_diag=torch.ones(F.shape[0], dtype=dtype, device=device))
