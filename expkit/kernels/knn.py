"""Exact k-nearest neighbours and UMAP's fuzzy simplicial set (the smooth-kNN graph).

Maths: McInnes, Healy & Melville (2018), "UMAP: Uniform Manifold Approximation and Projection",
section 3.1 / appendix: for each point i with sorted kNN distances d_i1 <= ... <= d_ik,
``rho_i`` is the distance to the nearest point at positive distance and ``sigma_i`` solves
``sum_{j>=1} exp(-max(0, d_ij - rho_i) / sigma_i) = log2(k)``; the directed membership strength is
``w_ij = exp(-max(0, d_ij - rho_i) / sigma_i)`` and the graph is the fuzzy union ``A + A' - A o A'``.

The neighbour search is brute force on ``device``, chunked over query rows so that memory stays within a
budget: a float32 screen picks ``k + extra`` candidates per row, their distances are recomputed exactly in
float64, and rows whose k-th candidate cannot be told apart from the screen's margin fall back to an exact
float64 pass over all points. Order is deterministic: the query point itself first, then by
(distance, index).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError, ResourceError

METRICS = ("euclidean", "cosine")
DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes for the per-chunk distance block(s)
_SMOOTH_K_TOLERANCE = 1e-5
_MIN_K_DIST_SCALE = 1e-3


def _prepare(X: np.ndarray, metric: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if metric == "euclidean":
        return X - X.mean(axis=0, keepdims=True)  # distances are translation invariant; less cancellation
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return X / norms


def _exact_dist(Q: torch.Tensor, R: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances between rows ``Q[..., :]`` and ``R[..., :]`` (same leading shape), float64, direct formula."""
    if metric == "euclidean":
        return torch.sqrt(((Q - R) ** 2).sum(-1))
    return (1.0 - (Q * R).sum(-1)).clamp(min=0.0, max=2.0)


def _lexsort_rows(d: torch.Tensor, idx: torch.Tensor, self_idx: torch.Tensor):
    """Sort each row by (not self, distance, index); returns sorted (d, idx)."""
    o = torch.argsort(idx, dim=1, stable=True)
    d, idx = torch.gather(d, 1, o), torch.gather(idx, 1, o)
    key = torch.where(idx == self_idx[:, None], torch.full_like(d, -1.0), d)
    o = torch.argsort(key, dim=1, stable=True)
    return torch.gather(d, 1, o), torch.gather(idx, 1, o)


def chunk_rows(n: int, *, bytes_per_row: int, budget: int) -> int:
    """Rows per chunk so that ``rows * bytes_per_row <= budget`` (at least 1, else ResourceError)."""
    rows = budget // max(bytes_per_row, 1)
    if rows < 1:
        raise ResourceError(f"kNN over {n} points needs {bytes_per_row / 2**20:.1f} MiB per query row, more than "
                            f"the memory budget of {budget / 2**20:.1f} MiB: raise memory_budget")
    return int(min(rows, n))


def knn_exact(X, k: int, *, metric: str = "euclidean", device: torch.device | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, extra: int | None = None):
    """Exact kNN of every row of ``X`` among the rows of ``X`` (self included, at column 0).

    Returns ``(indices int64 (n, k), distances float64 (n, k))`` as numpy arrays, each row sorted by
    (distance, index) after self. Memory is bounded by ``memory_budget`` (the n x chunk blocks); no n x n
    matrix is built.
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, not {metric!r}")
    device = device or torch.device("cpu")
    X = _prepare(X, metric)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise InputError(f"n_neighbors={k} must be between 1 and the number of observations ({n})")
    extra = min(max(8, k // 2) if extra is None else extra, n - k)
    kc = k + extra
    # per query row: the float32 block (4n), topk's work space (~4n) and the candidates' exact distances
    # (two kc x p float64 temporaries)
    chunk = chunk_rows(n, bytes_per_row=8 * n + 16 * kc * X.shape[1], budget=memory_budget)

    X64 = torch.as_tensor(X, dtype=torch.float64, device=device)
    X32 = X64.to(torch.float32)
    sq32 = (X32 * X32).sum(1)
    sq64 = (X64 * X64).sum(1)
    # screen error bound on squared euclidean distance (or on 1 - cos) in float32
    eps32 = float(np.finfo(np.float32).eps)
    p = X.shape[1]
    maxsq = float(sq64.max()) if n else 0.0
    out_i = np.empty((n, k), dtype=np.int64)
    out_d = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = torch.arange(start, stop, device=device)
        Q32 = X32[start:stop]
        # screen: a row-constant shift of the squared distance (|x_j|^2 - 2 x_i.x_j) or of 1 - cos (-x_i.x_j)
        if metric == "euclidean":
            block = torch.addmm(sq32[None, :], Q32, X32.T, beta=1.0, alpha=-2.0)
            shift = sq64[start:stop]
            tol = (4.0 * (p + 4) * eps32) * (sq64[start:stop] + maxsq)
        else:
            block = torch.mm(Q32, X32.T).neg_()
            shift = torch.ones(stop - start, dtype=torch.float64, device=device)
            tol = torch.full((stop - start,), 4.0 * (p + 4) * eps32, dtype=torch.float64, device=device)
        block[torch.arange(stop - start, device=device), rows] = -torch.inf  # self always a candidate
        cand_v, cand_i = torch.topk(block, kc, dim=1, largest=False, sorted=True)
        del block
        d = _exact_dist(X64[start:stop, None, :], X64[cand_i], metric)
        d[cand_i == rows[:, None]] = 0.0
        ds, isrt = _lexsort_rows(d, cand_i, rows)
        # the screen is exact enough when every non-candidate is surely farther than the k-th chosen one
        if kc < n:
            kth = ds[:, k - 1]
            screen_kth = kth ** 2 if metric == "euclidean" else kth
            last = cand_v[:, -1].to(torch.float64) + shift
            unsure = last - 2.0 * tol <= screen_kth
        else:
            unsure = torch.zeros(stop - start, dtype=torch.bool, device=device)
        if bool(unsure.any()):
            bad = torch.nonzero(unsure).flatten()
            sub = chunk_rows(n, bytes_per_row=32 * n + 16 * kc * p, budget=memory_budget)
            for s in range(0, bad.numel(), sub):
                b = bad[s:s + sub]
                qi = rows[b]
                if metric == "euclidean":
                    full = _full_rows(X64, qi)
                else:
                    full = (1.0 - X64[qi] @ X64.T).clamp(min=0.0, max=2.0)
                full[torch.arange(b.numel(), device=device), qi] = 0.0
                allidx = torch.arange(n, device=device).expand(b.numel(), n)
                key = full.clone()
                key[torch.arange(b.numel(), device=device), qi] = -1.0
                o = torch.argsort(key, dim=1, stable=True)[:, :kc]  # stable: ties broken by index
                del key
                fi = torch.gather(allidx, 1, o)
                fd = _exact_dist(X64[qi][:, None, :], X64[fi], metric)
                fd[fi == qi[:, None]] = 0.0
                fd, fi = _lexsort_rows(fd, fi, qi)
                ds[b], isrt[b] = fd, fi
        out_i[start:stop] = isrt[:, :k].cpu().numpy()
        out_d[start:stop] = ds[:, :k].cpu().numpy()
    return out_i, out_d


def _full_rows(X64: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
    """Exact-enough float64 euclidean distances from rows ``qi`` to all rows (expansion, float64)."""
    q = X64[qi]
    d2 = (q * q).sum(1)[:, None] + (X64 * X64).sum(1)[None, :] - 2.0 * (q @ X64.T)
    return d2.clamp(min=0.0).sqrt()


# ------------------------------------------------------------------------------------------------
# fuzzy simplicial set


def smooth_knn_dist(dists, k: float, *, device: torch.device | None = None, n_iter: int = 64,
                    local_connectivity: float = 1.0, bandwidth: float = 1.0):
    """Per-point ``(sigma, rho)`` of UMAP's smooth kNN distances, by bisection on all points at once.

    ``dists`` (n, k) sorted kNN distances with the point itself in column 0 (float32 arithmetic for the
    distances, float64 for the sums, as in the reference implementation). Returns float32 numpy arrays.
    """
    device = device or torch.device("cpu")
    D = torch.as_tensor(np.asarray(dists, dtype=np.float32), device=device)
    n, kk = D.shape
    target = math.log2(k) * bandwidth
    # rho: the local_connectivity-th smallest positive distance (interpolated)
    pos = D > 0
    n_pos = pos.sum(1)
    big = torch.finfo(torch.float32).max
    Dpos = torch.where(pos, D, torch.full_like(D, big)).sort(dim=1).values
    rho = torch.zeros(n, dtype=torch.float32, device=device)
    index = int(math.floor(local_connectivity))
    interp = local_connectivity - index
    has = n_pos >= local_connectivity
    if index > 0:
        base = Dpos[:, index - 1]
        if interp > 1e-5:
            nxt = Dpos[:, min(index, kk - 1)]
            base = base + torch.tensor(interp, dtype=torch.float32, device=device) * (nxt - base)
        rho = torch.where(has, base, rho)
    else:
        rho = torch.where(has, torch.tensor(interp, dtype=torch.float32, device=device) * Dpos[:, 0], rho)
    some = (~has) & (n_pos > 0)
    rho = torch.where(some, torch.where(pos, D, torch.zeros_like(D)).max(1).values, rho)

    diff = (D[:, 1:] - rho[:, None]).to(torch.float64)  # float32 subtraction, as the reference
    positive = diff > 0
    lo = torch.zeros(n, dtype=torch.float64, device=device)
    hi = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    mid = torch.ones(n, dtype=torch.float64, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(n_iter):
        terms = torch.where(positive, torch.exp(-(diff / mid[:, None])), torch.ones_like(diff))
        psum = terms.sum(1)
        done = (psum - target).abs() < _SMOOTH_K_TOLERANCE
        active = active & ~done
        if not bool(active.any()):
            break
        over = active & (psum > target)
        under = active & ~(psum > target)
        hi = torch.where(over, mid, hi)
        lo = torch.where(under, mid, lo)
        halfway = (lo + hi) / 2.0
        mid = torch.where(over, halfway, mid)
        mid = torch.where(under, torch.where(torch.isinf(hi), mid * 2.0, halfway), mid)
    sigma = mid.to(torch.float32)
    mean_i = D.to(torch.float64).mean(1).to(torch.float32)
    mean_all = D.to(torch.float64).mean().to(torch.float32)
    floor_i = _MIN_K_DIST_SCALE * mean_i
    floor_all = _MIN_K_DIST_SCALE * mean_all
    sigma = torch.where(rho > 0, torch.where(sigma < floor_i, floor_i, sigma),
                        torch.where(sigma < floor_all, floor_all, sigma))
    return sigma.cpu().numpy(), rho.cpu().numpy()


def membership_strengths(indices, dists, sigma, rho, *, device: torch.device | None = None):
    """Directed membership strengths ``exp(-max(0, d - rho) / sigma)`` (float32), self edges 0."""
    device = device or torch.device("cpu")
    D = torch.as_tensor(np.asarray(dists, dtype=np.float32), device=device)
    I = torch.as_tensor(np.asarray(indices), device=device)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)[:, None]
    r = torch.as_tensor(rho, dtype=torch.float32, device=device)[:, None]
    diff = D - r
    val = torch.exp(-(diff / s))
    val = torch.where((diff <= 0) | (s == 0), torch.ones_like(val), val)
    rows = torch.arange(D.shape[0], device=device)[:, None].expand_as(I)
    val = torch.where(I == rows, torch.zeros_like(val), val)
    val = torch.where(I < 0, torch.zeros_like(val), val)
    return val.cpu().numpy()


def fuzzy_simplicial_set(indices, dists, n_neighbors: int | None = None, *,
                         device: torch.device | None = None, set_op_mix_ratio: float = 1.0,
                         local_connectivity: float = 1.0):
    """UMAP's fuzzy simplicial set from kNN ``(indices, dists)``: a symmetric float32 CSR matrix.

    Returns ``(graph, sigma, rho)``. The union is ``A + A' - A o A'`` (``set_op_mix_ratio=1``); with a
    ratio r the result is ``r * union + (1 - r) * intersection``.
    """
    indices = np.asarray(indices)
    n, k = indices.shape
    n_neighbors = k if n_neighbors is None else n_neighbors
    sigma, rho = smooth_knn_dist(dists, float(n_neighbors), device=device,
                                 local_connectivity=local_connectivity)
    vals = membership_strengths(indices, dists, sigma, rho, device=device)
    rows = np.repeat(np.arange(n), k)
    keep = indices.ravel() >= 0
    A = sp.coo_matrix((vals.ravel()[keep], (rows[keep], indices.ravel()[keep])), shape=(n, n)).tocsr()
    A.eliminate_zeros()
    At = A.T.tocsr()
    prod = A.multiply(At).tocsr()
    G = set_op_mix_ratio * (A + At - prod) + (1.0 - set_op_mix_ratio) * prod
    G = sp.csr_matrix(G, dtype=np.float32)
    G.eliminate_zeros()
    G.sort_indices()
    return G, sigma, rho


def graph_distances32(dists, metric: str = "euclidean") -> np.ndarray:
    """The float32 distances the fuzzy set is built from.

    Euclidean: ``sqrt`` in float32 of the float32 squared distance, the rounding of scikit-learn's brute kNN
    that scanpy feeds to UMAP. The smooth-kNN bisection stops at ``|psum - log2 k| < 1e-5``, so one ulp in a
    distance can move sigma by ~1e-3 relative; the same rounding gives the same graph.
    """
    d = np.asarray(dists, dtype=np.float64)
    if metric == "euclidean":
        return np.sqrt((d * d).astype(np.float32))
    return d.astype(np.float32)


def knn_distance_matrix(indices, dists, n: int | None = None, *, keep_self: bool = False) -> sp.csr_matrix:
    """The directed kNN distance graph (float64 CSR, row i holds i's neighbours), self edges dropped."""
    indices = np.asarray(indices)
    n = indices.shape[0] if n is None else n
    k = indices.shape[1]
    rows = np.repeat(np.arange(indices.shape[0]), k)
    cols = indices.ravel()
    vals = np.asarray(dists, dtype=np.float64).ravel()
    keep = cols >= 0
    if not keep_self:
        keep &= cols != rows
    M = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(indices.shape[0], n))
    M.sort_indices()
    return M
