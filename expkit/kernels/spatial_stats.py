"""Label statistics on spatial graphs and point sets: arrays in, arrays out (no AnnData).

Notation: ``codes`` are label codes ``0..k-1`` per observation, ``(src, dst)`` the stored edges of the
spatial graph (row i -> column j of its CSR matrix).

- interaction counts ``C[a, b] = #{edges (i, j): l_i = a, l_j = b}`` (or the sum of edge weights);
- neighbourhood enrichment (Schapiro et al. 2017, squidpy's ``nhood_enrichment``): the same counts under
  random relabellings (labels shuffled over the observations, within groups when given), ``z = (C - mean_p
  C_p) / sd_p C_p`` (population sd). Every permutation is a row of a ``(P, n)`` label array shuffled by
  numpy's vectorised Fisher-Yates (``Generator.permuted``), seeded, generated on the CPU so that CPU and
  CUDA give identical numbers; the counts of a batch of permutations are one ``bincount`` over
  ``P x n_edges`` pair codes;
- co-occurrence (squidpy 1.8's definition): ``N_r[a, b]`` the ordered pairs ``i != j`` with
  ``|x_i - x_j|^2 <= t_r^2`` (cumulative in r), ``T_r = sum_ab N_r``, ``R_r[b] = sum_a N_r[a, b]``, and the
  ratio ``occ_r[a, b] = P(a | b) / P(a) = (N_r[b, a] / R_r[b]) / (R_r[a] / T_r)`` (0 where undefined);
  distances in float32 like squidpy; pairs counted over upper-triangular blocks of rows (each unordered
  pair once), never an n x n array;
- centrality per label on the undirected graph (``A = (W + W') > 0``, no self loops), the networkx
  definitions used by squidpy: group degree centrality ``|N(S) \\ S| / (n - |S|)``, group closeness
  ``|V \\ S| / sum_{v not in S, reachable} d(S, v)`` (0 when nothing is reachable; unreachable nodes add 0),
  by a multi-source breadth-first search of every label at once (one sparse product per level), and the
  average local clustering ``2 T_v / (d_v (d_v - 1))`` (0 when d_v < 2) over the label's nodes;
- connectivity: the connected components of the graph restricted to same-label edges, per label;
- convex hull area (volume in 3-D) per label.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..errors import InputError
from .device import single_thread

_CHUNK_ELEMENTS = 1 << 20  # ~1M pairs per co-occurrence block (~20 MiB of temporaries, reused)


# --------------------------------------------------------------------------------------------
# interaction counts and neighbourhood enrichment
# --------------------------------------------------------------------------------------------
def graph_edges(w: sp.spmatrix, keep: np.ndarray | None = None):
    """``(src, dst, weight)`` of the stored non-zero entries of ``w`` (optionally among ``keep`` only,
    renumbered ``0..keep.sum()-1``)."""
    w = sp.csr_matrix(w)
    if keep is not None and not keep.all():
        idx = np.flatnonzero(keep)
        w = w[idx][:, idx]
    w = w.tocoo()
    nz = w.data != 0
    return w.row[nz].astype(np.int64), w.col[nz].astype(np.int64), np.asarray(w.data[nz], dtype=np.float64)


def interaction_counts(src, dst, codes: np.ndarray, k: int, weights=None) -> np.ndarray:
    """``(k, k)`` counts (or weight sums) of edges from label a to label b."""
    pair = codes[src].astype(np.int64) * k + codes[dst]
    out = np.bincount(pair, weights=weights, minlength=k * k)
    return out.reshape(k, k)


def permuted_labels(codes: np.ndarray, n_perms: int, rng: np.random.Generator,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """``(n_perms, n)`` label arrays, each a random shuffle of ``codes`` (within ``groups`` when given)."""
    dtype = np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32
    tiled = np.broadcast_to(codes.astype(dtype), (int(n_perms), codes.size))
    if groups is None:
        return rng.permuted(tiled, axis=1)
    out = np.empty(tiled.shape, dtype=dtype)
    for g in np.unique(groups):  # over libraries (a handful), not observations
        cols = np.flatnonzero(groups == g)
        out[:, cols] = rng.permuted(tiled[:, cols], axis=1)
    return out


def _perm_batch(n_perms: int, n_edges: int, budget: int = 1 << 21) -> int:
    """Permutations per batch: ~2M pair codes, so that the buffers are reused rather than re-allocated."""
    return int(max(1, min(n_perms, budget // max(1, n_edges))))


def permutation_counts(src, dst, codes: np.ndarray, k: int, n_perms: int, seed: int, device: torch.device,
                       groups: np.ndarray | None = None) -> np.ndarray:
    """Interaction counts under ``n_perms`` seeded label shuffles: ``(n_perms, k, k)`` float64.

    The shuffles come from ``numpy.random.default_rng(seed)`` in batches (the same stream whatever the
    device); a batch's labels are held as an (n, P) array so that the labels at both ends of every edge are
    two row gathers, and its counts are one ``bincount`` of the ``n_edges x P`` pair codes.
    """
    rng = np.random.default_rng(int(seed))
    s = torch.as_tensor(src, device=device)
    d = torch.as_tensor(dst, device=device)
    n_perms = int(n_perms)
    out = torch.empty((n_perms, k * k), dtype=torch.float64, device=device)
    step = _perm_batch(n_perms, s.numel())
    buf_a = torch.empty((s.numel(), step), dtype=torch.int64, device=device)
    buf_b = torch.empty_like(buf_a)
    offs = torch.arange(step, device=device) * (k * k)
    with single_thread(device):
        for p0 in range(0, n_perms, step):  # batches of permutations (bounded memory), not single ones
            p1 = min(n_perms, p0 + step)
            m = p1 - p0
            lab = permuted_labels(codes, m, rng, groups)
            lab_t = torch.as_tensor(np.ascontiguousarray(lab.T), device=device).long()   # (n, m)
            if m != buf_a.shape[1]:  # the last, smaller batch
                buf_a, buf_b, offs = buf_a[:, :m].contiguous(), buf_b[:, :m].contiguous(), offs[:m]
            torch.index_select(lab_t, 0, s, out=buf_a)
            torch.index_select(lab_t, 0, d, out=buf_b)
            buf_a.mul_(k).add_(buf_b).add_(offs)
            out[p0:p1] = torch.bincount(buf_a.reshape(-1), minlength=m * k * k).view(m, k * k).double()
    return out.view(n_perms, k, k).cpu().numpy()


def enrichment_zscore(count: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``(count - mean) / sd`` over the permutation axis (population sd; NaN where sd is 0)."""
    mean = perms.mean(axis=0)
    sd = perms.std(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (count - mean) / sd


# --------------------------------------------------------------------------------------------
# co-occurrence
# --------------------------------------------------------------------------------------------
def squidpy_interval(xy32: np.ndarray, n: int) -> np.ndarray:
    """squidpy's default thresholds: ``n`` float32 values evenly spaced from the distance between the two
    points of smallest coordinate sum to half the distance from the first of them to the point of largest
    coordinate sum (the distances rounded to float32)."""
    s = xy32.sum(axis=1)
    lo1, lo2 = np.argpartition(s, 2)[:2]
    hi = np.argmax(s)

    def dist(a, b):
        d2 = np.sum((xy32[a].astype(np.float64) - xy32[b].astype(np.float64)) ** 2)
        return np.sqrt(np.float32(d2))

    t_min, t_max = dist(lo1, lo2), dist(lo1, hi) / np.float32(2.0)
    return np.linspace(np.float32(t_min), np.float32(t_max), num=int(n), dtype=np.float32)


def _pair_block(x: torch.Tensor, a: int, b: int, c0: int) -> torch.Tensor:
    """Squared float32 distances of rows a:b to rows c0:.

    In 2-D, ``fma(dy, dy, dx * dx)`` rounded once to float32 (``dx * dx`` rounded first), which is what
    squidpy's compiled loop computes on CPUs with fused multiply-add (its ``dx*dx + dy*dy`` is contracted);
    the product ``dy * dy`` of two float32 values is exact in float64. In 3-D the plain float32 sum.
    """
    dx = x[a:b, None, 0] - x[None, c0:, 0]
    dy = x[a:b, None, 1] - x[None, c0:, 1]
    if x.shape[1] == 2:
        d64 = dy.double()
        return d64.mul_(d64).add_(dx.mul_(dx)).float()
    d2 = dx.mul_(dx).add_(dy.mul_(dy))
    dz = x[a:b, None, 2] - x[None, c0:, 2]
    return d2.add_(dz.mul_(dz))


class _Binner:
    """Index of the first threshold a squared distance does not exceed (``bucketize(d2, t2)``, exact).

    Evenly spaced thresholds (squidpy's default) are binned arithmetically from ``sqrt(d2)`` and corrected by
    one comparison with the neighbouring squared thresholds on each side (the estimate is off by at most one),
    about 5x faster than the binary search; other thresholds use ``bucketize``.
    """

    def __init__(self, thresholds: np.ndarray, device: torch.device):
        t = np.asarray(thresholds, dtype=np.float32)
        self.t2 = torch.as_tensor(t, device=device) ** 2
        step = np.diff(t.astype(np.float64))
        self.even = t.size >= 3 and step.min() > 0 and np.allclose(step, step.mean(), rtol=1e-3, atol=0)
        if self.even:
            self.t0, self.inv_h, self.n = float(t[0]), 1.0 / float(step.mean()), t.size
            inf = torch.tensor([float("inf")], device=device)
            self.pad = torch.cat([-inf, self.t2, inf])            # pad[j] = t2[j - 1], pad[j + 1] = t2[j]

    def __call__(self, d2: torch.Tensor) -> torch.Tensor:
        if not self.even:
            return torch.bucketize(d2, self.t2, right=False)
        j = d2.sqrt().sub_(self.t0).mul_(self.inv_h).ceil_().clamp_(0, self.n).long()
        j -= (d2 <= self.pad[j]).long()                           # d2 <= t2[j - 1]: one bin lower
        j += (d2 > self.pad[j + 1]).long()                        # d2 > t2[j]: one bin higher
        return j


def cooccurrence_counts(xy: np.ndarray, codes: np.ndarray, k: int, thresholds: np.ndarray,
                        device: torch.device, chunk_elements: int = _CHUNK_ELEMENTS) -> np.ndarray:
    """``(k, k, L)`` int64 counts of ordered pairs ``i != j`` with squared distance <= ``thresholds[r]^2``.

    Coordinates and thresholds are float32 (squidpy's precision). Cells are sorted by label and processed in
    row blocks of one label against the cells after them (each unordered pair once); a pair falls in the
    first threshold it does not exceed (``bucketize``); one ``bincount`` per block over (column label, bin)
    accumulates the counts, made cumulative at the end. Blocks stay small (``chunk_elements`` pairs) so that
    their buffers are reused.
    """
    order = np.argsort(codes, kind="stable")
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(xy, dtype=np.float32)[order]), device=device)
    binner = _Binner(thresholds, device)
    lab_sorted = np.asarray(codes)[order]
    bounds = np.searchsorted(lab_sorted, np.arange(k + 1))
    n, nb = x.shape[0], len(thresholds) + 1  # bin nb-1: beyond the last threshold
    col_base = torch.as_tensor(lab_sorted, dtype=torch.int64, device=device) * nb
    hist = torch.zeros((k, k * nb), dtype=torch.int64, device=device)
    with single_thread(device):
        for c in range(k):  # over labels: the rows of one block share their label
            a = int(bounds[c])
            while a < bounds[c + 1]:  # row blocks
                b = int(min(bounds[c + 1], a + max(1, chunk_elements // max(1, n - a))))
                idx = binner(_pair_block(x, a, b, a))
                sq = idx[:, : b - a]  # the pairs among the block's own rows: keep j > i only
                sq.masked_fill_(torch.ones((b - a, b - a), dtype=torch.bool, device=device).tril_(), nb - 1)
                idx.add_(col_base[None, a:])
                hist[c] += torch.bincount(idx.reshape(-1), minlength=k * nb)
                a = b
    h = hist.view(k, k, nb)[:, :, : nb - 1]
    h = h + h.transpose(0, 1)  # unordered -> ordered pairs (i, j) and (j, i)
    return torch.cumsum(h, dim=2).cpu().numpy()


def cooccurrence_ratio(counts: np.ndarray) -> np.ndarray:
    """``occ[a, b, r] = (N[b, a, r] / R[b, r]) / (R[a, r] / T[r])`` with ``R[c, r] = sum_a N[a, c, r]``;
    0 where ``R[a, r]`` or ``R[b, r]`` is 0."""
    n = counts.astype(np.float64)
    col = n.sum(axis=0)                       # R[c, r]
    tot = col.sum(axis=0)                     # T[r]
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = col / tot[None, :]                                   # P(a) at r
        cond = np.transpose(n, (1, 0, 2)) / col[None, :, :]         # [a, b]: N[b, a] / R[b]
        occ = cond / prob[:, None, :]
    ok = (prob[:, None, :] != 0) & (col[None, :, :] != 0)
    return np.where(ok, occ, 0.0)


# --------------------------------------------------------------------------------------------
# centrality, components, hulls
# --------------------------------------------------------------------------------------------
def undirected(w: sp.spmatrix) -> sp.csr_matrix:
    """Binary symmetric adjacency without self loops (an edge where either direction is stored)."""
    w = sp.csr_matrix(w)
    a = (abs(w) + abs(w).T).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    a.data[:] = 1.0
    return a.astype(np.float32)


def onehot(codes: np.ndarray, k: int) -> sp.csr_matrix:
    n = codes.size
    return sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), codes)), shape=(n, k))


def group_degree(a: sp.csr_matrix, codes: np.ndarray, k: int) -> np.ndarray:
    """Per label S: the fraction of the nodes outside S adjacent to a node of S."""
    touch = (a @ onehot(codes, k)).toarray() > 0          # node j has a neighbour of label c
    touch[np.arange(codes.size), codes] = False           # members of S do not count
    n_lab = np.bincount(codes, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return touch.sum(axis=0) / (codes.size - n_lab)


def group_closeness(a: sp.csr_matrix, codes: np.ndarray, k: int, max_levels: int | None = None) -> np.ndarray:
    """Per label S: ``|V \\ S| / sum of hop distances from S to the reachable nodes outside S``.

    Breadth-first search from every label at once: ``frontier`` (n x k) advances one hop per sparse
    product; the loop runs over distance levels (the graph's eccentricity), not over nodes.
    """
    n = codes.size
    frontier = onehot(codes, k).toarray().astype(bool)
    seen = frontier.copy()
    total = np.zeros(k, dtype=np.float64)
    level = 0
    limit = n if max_levels is None else int(max_levels)
    while frontier.any() and level < limit:
        level += 1
        nxt = (a @ frontier.astype(np.float32)) > 0
        nxt &= ~seen
        seen |= nxt
        total += level * nxt.sum(axis=0)
        frontier = nxt
    outside = n - np.bincount(codes, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, outside / np.where(total > 0, total, 1.0), 0.0)


def local_clustering(a: sp.csr_matrix) -> np.ndarray:
    """Local clustering coefficient of every node of a binary symmetric adjacency without self loops."""
    a = sp.csr_matrix(a, dtype=np.float64)
    deg = np.asarray(a.sum(axis=1)).ravel()
    tri2 = np.asarray((a @ a).multiply(a).sum(axis=1)).ravel()  # 2 x triangles through the node
    with np.errstate(invalid="ignore", divide="ignore"):
        c = tri2 / (deg * (deg - 1.0))
    return np.where(deg > 1, c, 0.0)


def label_mean(values: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(codes, weights=values, minlength=k) / np.bincount(codes, minlength=k)


def label_components(a: sp.csr_matrix, codes: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Connected components of each label's induced subgraph: counts, largest size and singletons."""
    coo = a.tocoo()
    same = codes[coo.row] == codes[coo.col]
    n = codes.size
    sub = sp.csr_matrix((np.ones(int(same.sum())), (coo.row[same], coo.col[same])), shape=(n, n))
    n_comp, comp = connected_components(sub, directed=False)
    size = np.bincount(comp, minlength=n_comp)
    comp_label = np.zeros(n_comp, dtype=np.int64)
    comp_label[comp] = codes                       # every component holds one label
    n_components = np.bincount(comp_label, minlength=k)
    largest = np.zeros(k, dtype=np.int64)
    np.maximum.at(largest, comp_label, size)
    singletons = np.bincount(comp_label, weights=(size == 1).astype(float), minlength=k)
    return {"n_components": n_components, "largest": largest, "singletons": singletons.astype(np.int64)}


def hull_measure(xy: np.ndarray) -> float:
    """Convex hull area (2-D) or volume (3-D); NaN for fewer than d + 1 points or a degenerate hull."""
    from scipy.spatial import ConvexHull, QhullError

    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape[0] < xy.shape[1] + 1:
        return float("nan")
    try:
        return float(ConvexHull(xy).volume)
    except (QhullError, ValueError):
        return float("nan")


def check_labels(k: int) -> None:
    if k < 2:
        raise InputError(f"needs at least 2 labels with 2 or more observations, found {k}")


# --------------------------------------------------------------------------------------------
# the same statistics per unit (sample or subunit) at once, for cohort tables
# --------------------------------------------------------------------------------------------
def within_unit_permutations(codes: np.ndarray, unit: np.ndarray, n_perms: int,
                             rng: np.random.Generator) -> np.ndarray:
    """``(n_perms, n)`` labels shuffled within each unit: per row, the cells ordered by (unit, random key)
    receive the labels of the cells ordered by unit, a uniform bijection inside every unit."""
    order = np.argsort(unit, kind="stable")
    keys = unit[None, :] + rng.random((int(n_perms), unit.size))
    sigma = np.argsort(keys, axis=1)
    out = np.empty((int(n_perms), unit.size), dtype=np.int32)
    np.put_along_axis(out, sigma, np.broadcast_to(codes[order].astype(np.int32), sigma.shape), axis=1)
    return out


def unit_pair_counts(src, dst, codes, unit, k: int, n_units: int) -> np.ndarray:
    """``(U, k, k)`` edge counts per unit (edges inside one unit only)."""
    idx = (unit[src] * k + codes[src]) * k + codes[dst]
    return np.bincount(idx, minlength=n_units * k * k).reshape(n_units, k, k).astype(np.float64)


def unit_enrichment(src, dst, codes, unit, k: int, n_units: int, n_perms: int, seed: int,
                    budget: int = 1 << 22) -> np.ndarray:
    """Neighbourhood enrichment z-scores per unit, labels shuffled within units: ``(U, k, k)``. The mean and
    variance of the shuffled counts are accumulated over batches of permutations (memory U x k x k)."""
    rng = np.random.default_rng(int(seed))
    obs = unit_pair_counts(src, dst, codes, unit, k, n_units)
    s1 = np.zeros(n_units * k * k)
    s2 = np.zeros(n_units * k * k)
    base = unit[src].astype(np.int64) * k * k
    step = int(max(1, min(n_perms, budget // max(1, src.size, n_units * k * k))))
    for p0 in range(0, int(n_perms), step):  # batches of permutations
        m = min(int(n_perms), p0 + step) - p0
        lab = within_unit_permutations(codes, unit, m, rng)
        idx = np.take(lab, src, axis=1).astype(np.int64)
        idx *= k
        idx += np.take(lab, dst, axis=1)
        idx += base[None, :]
        idx += (np.arange(m, dtype=np.int64) * (n_units * k * k))[:, None]
        c = np.bincount(idx.ravel(), minlength=m * n_units * k * k).reshape(m, -1).astype(np.float64)
        s1 += c.sum(axis=0)
        s2 += (c * c).sum(axis=0)
    mean = s1 / n_perms
    sd = np.sqrt(np.maximum(s2 / n_perms - mean ** 2, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (obs.ravel() - mean) / sd
    return np.where(sd > 1e-9 * np.maximum(1.0, mean), z, np.nan).reshape(n_units, k, k)


def unit_label_counts(codes, unit, k: int, n_units: int) -> np.ndarray:
    return np.bincount(unit * k + codes, minlength=n_units * k).reshape(n_units, k).astype(np.float64)


def unit_degree(a: sp.csr_matrix, codes, unit, k: int, n_units: int) -> np.ndarray:
    """Group degree centrality per (unit, label) on a graph whose edges stay inside units."""
    touch = (a @ onehot(codes, k)).toarray() > 0
    touch[np.arange(codes.size), codes] = False
    member = sp.csr_matrix((np.ones(codes.size), (unit, np.arange(codes.size))), shape=(n_units, codes.size))
    hits = member @ touch.astype(np.float64)
    n_u = np.bincount(unit, minlength=n_units).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / (n_u[:, None] - unit_label_counts(codes, unit, k, n_units))


def unit_label_mean(values, codes, unit, k: int, n_units: int) -> np.ndarray:
    s = np.bincount(unit * k + codes, weights=values, minlength=n_units * k).reshape(n_units, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / unit_label_counts(codes, unit, k, n_units)


def unit_moran(src, dst, codes, unit, k: int, n_units: int) -> np.ndarray:
    """Moran's I of each label indicator per unit, row-normalised weights on the unit's edges: ``(U, k)``."""
    n_u = np.bincount(unit, minlength=n_units).astype(np.float64)
    deg = np.bincount(src, minlength=codes.size).astype(np.float64)
    w = 1.0 / deg[src]
    s0 = np.bincount(unit[src], weights=w, minlength=n_units)
    frac = unit_label_counts(codes, unit, k, n_units) / np.maximum(n_u, 1)[:, None]
    out = np.full((n_units, k), np.nan)
    for c in range(k):  # over labels
        z = (codes == c).astype(np.float64) - frac[unit, c]
        num = np.bincount(unit[src], weights=w * z[src] * z[dst], minlength=n_units)
        den = np.bincount(unit, weights=z * z, minlength=n_units)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = n_u / s0 * num / den
    return out


def unit_components(a: sp.csr_matrix, codes, unit, k: int, n_units: int) -> np.ndarray:
    """Connected pieces per cell of each (unit, label), from same-label edges inside units: ``(U, k)``."""
    coo = a.tocoo()
    same = codes[coo.row] == codes[coo.col]
    n = codes.size
    sub = sp.csr_matrix((np.ones(int(same.sum())), (coo.row[same], coo.col[same])), shape=(n, n))
    n_comp, comp = connected_components(sub, directed=False)
    first = np.full(n_comp, -1, dtype=np.int64)
    first[comp[::-1]] = np.arange(n)[::-1]           # one cell of each component
    key = unit[first] * k + codes[first]
    pieces = np.bincount(key, minlength=n_units * k).reshape(n_units, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pieces / unit_label_counts(codes, unit, k, n_units)
