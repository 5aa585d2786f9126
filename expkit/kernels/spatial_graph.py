"""Spatial neighbour graphs: exact k nearest neighbours, radius graphs, lattice (grid) graphs and rings.

Arrays in, arrays out. Every builder returns an edge list ``(rows, cols, dist)`` (int64, int64, float64)
without self loops; the caller assembles the sparse matrices. Nothing here ever forms an n x n array:
brute-force distances are computed over row chunks whose size is bounded by ``chunk_bytes``.

On the CPU the exact searches go through :class:`scipy.spatial.cKDTree` (exact, O(n log n)); on CUDA
(or with ``method="brute"``) through chunked exact pairwise distances and ``torch.topk``. Both are exact;
they may order ties differently, never choose different distances.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError, ResourceError

# Visium array coordinates are "doubled": a spot's hexagonal neighbours are (r, c +- 2) and (r +- 1, c +- 1)
HEX_OFFSETS = np.array([(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)], dtype=np.int64)
SQUARE4_OFFSETS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], dtype=np.int64)
SQUARE8_OFFSETS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)],
                           dtype=np.int64)

_DEFAULT_CHUNK_BYTES = 1 << 28  # 256 MiB per distance block


def _use_brute(device: torch.device, method: str) -> bool:
    if method not in ("auto", "kdtree", "brute"):
        raise InputError(f"method must be 'auto', 'kdtree' or 'brute', not {method!r}")
    if method == "auto":
        return device.type != "cpu"
    return method == "brute"


def _chunk_rows(n: int, bytes_per_row: int, chunk_bytes: int) -> int:
    return int(max(1, min(n, chunk_bytes // max(1, bytes_per_row))))


def _sq_dist_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact squared distances (differences, not the |a|^2 + |b|^2 - 2ab expansion)."""
    d2 = (a[:, None, 0] - b[None, :, 0]) ** 2
    for j in range(1, a.shape[1]):  # over coordinate dimensions (2 or 3), not over spots
        d2 += (a[:, None, j] - b[None, :, j]) ** 2
    return d2


def knn(coords: np.ndarray, k: int, device: torch.device, *, method: str = "auto",
        chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every point among the others (self excluded).

    Returns ``(idx, dist)``, both ``(n, k)``, sorted by distance. ``k`` is capped at ``n - 1``.
    """
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    n = coords.shape[0]
    k = int(min(k, n - 1))
    if k <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float64)
    if not _use_brute(device, method):
        from scipy.spatial import cKDTree

        dist, idx = cKDTree(coords).query(coords, k=k + 1)
        idx = idx.astype(np.int64, copy=False)
        is_self = idx == np.arange(n)[:, None]
        # a duplicate point may be listed before the point itself: drop self where found, else the last
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True
        keep = ~is_self
        return idx[keep].reshape(n, k), dist[keep].reshape(n, k)
    x = torch.as_tensor(coords, dtype=torch.float64, device=device)
    step = _chunk_rows(n, n * 8 * 2, chunk_bytes)
    out_i = torch.empty((n, k), dtype=torch.int64, device=device)
    out_d = torch.empty((n, k), dtype=torch.float64, device=device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        d2 = _sq_dist_block(x[start:stop], x)
        rows = torch.arange(stop - start, device=device)
        d2[rows, rows + start] = torch.inf
        val, ind = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        out_i[start:stop] = ind
        out_d[start:stop] = val.sqrt()
    return out_i.cpu().numpy(), out_d.cpu().numpy()


def knn_edges(coords: np.ndarray, k: int, device: torch.device, **kw):
    idx, dist = knn(coords, k, device, **kw)
    n, k = idx.shape
    return np.repeat(np.arange(n, dtype=np.int64), k), idx.ravel(), dist.ravel()


def radius_edges(coords: np.ndarray, r_max: float, device: torch.device, *, r_min: float = 0.0,
                 method: str = "auto", chunk_bytes: int = _DEFAULT_CHUNK_BYTES, max_bytes: int = 8 << 30):
    """All ordered pairs ``i != j`` with ``r_min <= |x_i - x_j| <= r_max``, sorted by (row, col).

    Raises :class:`~expkit.errors.ResourceError` before building when the graph (estimated from the
    neighbour counts of a sample of points) would exceed ``max_bytes``.
    """
    from scipy.spatial import cKDTree

    coords = np.ascontiguousarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tree = cKDTree(coords)
    # estimate the number of edges from a sample of points before building them
    probe = np.random.default_rng(0).choice(n, min(n, 2000), replace=False) if n else np.zeros(0, int)
    if probe.size:
        mean_deg = float(np.mean(tree.query_ball_point(coords[probe], float(r_max), return_length=True))) - 1
        est = mean_deg * n * 40  # bytes: edge arrays here and the two sparse matrices built from them
        if est > max_bytes:
            raise ResourceError(f"a radius graph with radius {r_max} would hold about {mean_deg:.0f} neighbours "
                                f"per point ({est / 2**30:.1f} GiB for {n} points); use a smaller radius")
    if not _use_brute(device, method):
        pairs = tree.sparse_distance_matrix(tree, float(r_max), output_type="ndarray")
        rows = pairs["i"].astype(np.int64)
        cols = pairs["j"].astype(np.int64)
        dist = pairs["v"].astype(np.float64)
        keep = (rows != cols) & (dist >= r_min)
        rows, cols, dist = rows[keep], cols[keep], dist[keep]
        order = np.lexsort((cols, rows))
        return rows[order], cols[order], dist[order]
    x = torch.as_tensor(coords, dtype=torch.float64, device=device)
    step = _chunk_rows(n, n * 8 * 2, chunk_bytes)
    r2max, r2min = float(r_max) ** 2, float(r_min) ** 2
    out_r, out_c, out_d = [], [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        d2 = _sq_dist_block(x[start:stop], x)
        rows = torch.arange(stop - start, device=device)
        d2[rows, rows + start] = torch.inf
        mask = (d2 <= r2max) & (d2 >= r2min)
        r, c = mask.nonzero(as_tuple=True)
        out_r.append((r + start).cpu())
        out_c.append(c.cpu())
        out_d.append(d2[r, c].sqrt().cpu())
    rows = torch.cat(out_r).numpy().astype(np.int64)
    cols = torch.cat(out_c).numpy().astype(np.int64)
    return rows, cols, torch.cat(out_d).numpy()


def grid_edges_from_coords(coords: np.ndarray, n_neighs: int, device: torch.device, *,
                           cutoff_factor: float = 1.3, **kw):
    """Lattice graph from continuous coordinates of lattice points (e.g. Visium pixel positions).

    Each point's ``n_neighs`` nearest neighbours are kept when closer than ``cutoff_factor`` times the
    median of all those nearest-neighbour distances: on a hexagonal lattice with ``n_neighs=6`` that is
    exactly the set of adjacent spots (the next shell lies at sqrt(3) times the spacing). The same rule as
    squidpy's ``coord_type="grid"``; the graph is directed in principle (row i lists i's neighbours) and
    symmetric on a regular lattice.
    """
    rows, cols, dist = knn_edges(coords, n_neighs, device, **kw)
    if dist.size == 0:
        return rows, cols, dist
    cutoff = np.median(dist) * cutoff_factor
    keep = dist < cutoff
    return rows[keep], cols[keep], dist[keep]


def grid_edges_from_array(array_rc: np.ndarray, n_neighs: int = 6):
    """Lattice graph from integer array coordinates (row, col): exact, no distances involved.

    ``n_neighs=6``: the Visium hexagonal lattice in doubled coordinates (row + col has one parity);
    ``4``/``8``: a square lattice (Spatial Transcriptomics) without/with diagonals.
    Returns ``(rows, cols, offset_index)``; lattice points given twice are an error.
    """
    a = np.asarray(array_rc)
    if a.ndim != 2 or a.shape[1] != 2:
        raise InputError(f"array coordinates must be (n, 2), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or not np.allclose(a, np.round(a)):
        raise InputError("array coordinates must be integers")
    a = np.round(a).astype(np.int64)
    if n_neighs == 6:
        parity = (a[:, 0] + a[:, 1]) % 2
        if a.shape[0] and np.any(parity != parity[0]):
            raise InputError("n_neighs=6 expects Visium (doubled) hexagonal array coordinates, where "
                             "row + col has the same parity for every spot; these are not")
        offsets = HEX_OFFSETS
    elif n_neighs == 4:
        offsets = SQUARE4_OFFSETS
    elif n_neighs == 8:
        offsets = SQUARE8_OFFSETS
    else:
        raise InputError(f"a lattice from array coordinates has n_neighs 4, 6 or 8, not {n_neighs}")
    n = a.shape[0]
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    lo = a.min(axis=0) - 2
    span = a.max(axis=0) + 2 - lo + 1
    key = (a[:, 0] - lo[0]) * span[1] + (a[:, 1] - lo[1])
    order = np.argsort(key, kind="stable")
    skey = key[order]
    if np.any(skey[1:] == skey[:-1]):
        raise InputError("two spots share the same array coordinates")
    rows, cols, which = [], [], []
    for o, (dr, dc) in enumerate(offsets):  # over the 4-8 lattice directions, vectorised over spots
        q = (a[:, 0] + dr - lo[0]) * span[1] + (a[:, 1] + dc - lo[1])
        pos = np.clip(np.searchsorted(skey, q), 0, n - 1)
        hit = skey[pos] == q
        rows.append(np.nonzero(hit)[0])
        cols.append(order[pos[hit]])
        which.append(np.full(int(hit.sum()), o, np.int64))
    return np.concatenate(rows), np.concatenate(cols).astype(np.int64), np.concatenate(which)


def rings(adj: sp.spmatrix, n_rings: int) -> sp.csr_matrix:
    """Graph distance (1..n_rings) along ``adj`` as a CSR matrix (breadth-first over sparse products).

    Entry (i, j) is the number of steps of the shortest path from i to j when it is at most ``n_rings``;
    the diagonal is empty.
    """
    a = sp.csr_matrix(adj, dtype=np.float64, copy=True)
    a.data[:] = 1.0
    n = a.shape[0]
    reached = (a + sp.identity(n, format="csr")).tocsr()
    reached.data[:] = 1.0
    out = a.copy()
    frontier = a
    for ring in range(2, int(n_rings) + 1):
        nxt = (frontier @ a).tocsr()
        nxt.data[:] = 1.0
        nxt = (nxt - nxt.multiply(reached)).tocsr()
        nxt.eliminate_zeros()
        if nxt.nnz == 0:
            break
        nxt.data[:] = 1.0
        reached = (reached + nxt).tocsr()
        reached.data[:] = 1.0
        out = (out + nxt * float(ring)).tocsr()
        frontier = nxt
    out.sort_indices()
    return out
