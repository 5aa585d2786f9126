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
  ratio ``occ_r[a, b] = P(a | b) / P(a) = (N_r[b, a] / R_r[b]) / (R_r[a] / T_r)`` (0 where undefined): in
  ``cooccurrence.py``;
- centrality per label on the undirected graph (``A = (W + W') > 0``, no self loops), the networkx
  definitions used by squidpy: group degree centrality ``|N(S) \\ S| / (n - |S|)``, group closeness
  ``|V \\ S| / sum_{v not in S, reachable} d(S, v)`` (0 when nothing is reachable; unreachable nodes add 0),
  by a multi-source breadth-first search of every label at once (one sparse product per level), and the
  average local clustering ``2 T_v / (d_v (d_v - 1))`` (0 when d_v < 2) over the label's nodes;
- connectivity: the connected components of the graph restricted to same-label edges, per label;
- convex hull area (volume in 3-D) per label.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..errors import InputError
from .cooccurrence import cooccurrence_counts, cooccurrence_ratio, squidpy_interval  # noqa: F401
from .device import single_thread



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
    """``(n_perms, n)`` label arrays, each a random shuffle of ``codes`` (within ``groups`` when given).

    Rows are shuffled in place in a contiguous array (3x faster than from a broadcast view, the same draws):
    a batch of rows continues the generator's stream, so the shuffles do not depend on the batch size."""
    dtype = np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32
    out = np.tile(codes.astype(dtype), (int(n_perms), 1))
    if groups is None:
        return rng.permuted(out, axis=1, out=out)
    for g in np.unique(groups):  # over libraries (a handful), not observations
        cols = np.flatnonzero(groups == g)
        out[:, cols] = rng.permuted(np.ascontiguousarray(out[:, cols]), axis=1)
    return out


def _perm_batch(n_perms: int, n_edges: int, budget: int = 1 << 21) -> int:
    """Permutations per batch: ~2M pair codes, so that the buffers are reused rather than re-allocated."""
    return int(max(1, min(n_perms, budget // max(1, n_edges))))


def _batch_counts(lab: np.ndarray, s: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """``(m, k * k)`` edge counts of a batch of ``m`` label rows: two row gathers of the (n, m) transposed
    labels, the pair code ``m' * k^2 + a * k + b`` in the smallest integer type, one ``bincount``."""
    m = lab.shape[0]
    dt = torch.int16 if m * k * k < 2 ** 15 else (torch.int32 if m * k * k < 2 ** 31 else torch.int64)
    lab_t = torch.as_tensor(np.ascontiguousarray(lab.T), device=s.device).to(dt)   # (n, m)
    a = torch.index_select(lab_t, 0, s)
    a.mul_(k).add_(torch.index_select(lab_t, 0, d))
    a.add_(torch.arange(m, device=s.device, dtype=dt) * (k * k))
    return torch.bincount(a.view(-1), minlength=m * k * k).view(m, k * k)


def permutation_counts(src, dst, codes: np.ndarray, k: int, n_perms: int, seed: int, device: torch.device,
                       groups: np.ndarray | None = None) -> np.ndarray:
    """Interaction counts under ``n_perms`` seeded label shuffles: ``(n_perms, k, k)`` float64.

    The shuffles come from ``numpy.random.default_rng(seed)`` in batches (the same stream whatever the
    device or the batch size), the next batch drawn in a second thread while the current one is counted
    (``_batch_counts``: no loop over permutations or edges).
    """
    rng = np.random.default_rng(int(seed))
    s = torch.as_tensor(src, device=device)
    d = torch.as_tensor(dst, device=device)
    n_perms = int(n_perms)
    out = torch.empty((n_perms, k * k), dtype=torch.float64, device=device)
    step = _perm_batch(n_perms, s.numel())
    batches = [(p0, min(n_perms, p0 + step)) for p0 in range(0, n_perms, step)]
    with single_thread(device), ThreadPoolExecutor(1) as gen:
        nxt = gen.submit(permuted_labels, codes, batches[0][1] - batches[0][0], rng, groups) if batches else None
        for i, (p0, p1) in enumerate(batches):  # batches of permutations (bounded memory), not single ones
            lab = nxt.result()
            if i + 1 < len(batches):  # the stream stays in order: one generator thread, one batch ahead
                nxt = gen.submit(permuted_labels, codes, batches[i + 1][1] - batches[i + 1][0], rng, groups)
            out[p0:p1] = _batch_counts(lab, s, d, k).double()
    return out.view(n_perms, k, k).cpu().numpy()


def enrichment_zscore(count: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``(count - mean) / sd`` over the permutation axis (population sd; NaN where sd is 0)."""
    mean = perms.mean(axis=0)
    sd = perms.std(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (count - mean) / sd


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
