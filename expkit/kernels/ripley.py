"""Ripley's statistics of point sets (arrays in, arrays out), with squidpy 1.8's definitions.

On a support ``s_0 = 0 < ... < s_{m-1}`` (``n_steps`` values up to ``max_dist``, default ``sqrt(area / 2)`` of
the convex hull of all points):

- F and G: ``D`` a pool of nearest-neighbour distances (F: from random points of the hull to the label's
  points; G: from the cells of the other labels to the label's points; ``n_neigh`` nearest each, pooled);
  the histogram of ``D`` on the support (bins ``[s_k, s_k+1)``, the last one closed) gives
  ``stat = [0, cumsum(counts) / sum(counts)]``;
- K and L: ``n_<(s)`` the unordered pairs of the label's points closer than ``s`` (strictly),
  ``K(s) = 2 n_<(s) / N / (N / area)`` and ``L = sqrt(K / pi)``, where N is the number of all points of the
  sample (squidpy's normalisation).

Simulations are uniform (Poisson) point sets of ``n_observations`` points in the convex hull, by rejection
from its bounding box, all drawn from one seeded generator and processed in batches: nearest-neighbour
queries against many sets at once go through one k-d tree of the sets shifted apart, pair counts through
blocks of distances, never a loop over simulations.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import ConvexHull, cKDTree

from ..errors import InputError

_BLOCK = 1 << 23  # distance entries per block


class Hull:
    """Convex hull of a point set: area (volume in 3-D), bounding box, the half-space test."""

    def __init__(self, xy: np.ndarray):
        try:
            h = ConvexHull(np.asarray(xy, dtype=np.float64))
        except Exception as exc:  # QhullError: degenerate (collinear) points
            raise InputError(f"the points do not span a convex hull: {exc}") from None
        self.area = float(h.volume)
        self.eq = h.equations                      # (f, d + 1): a.x + b <= 0 inside
        vx = h.points[h.vertices]
        self.lo, self.hi = vx.min(axis=0), vx.max(axis=0)

    def inside(self, p: np.ndarray) -> np.ndarray:
        return np.all(p @ self.eq[:, :-1].T + self.eq[:, -1] <= 1e-12, axis=-1)

    def sample(self, n_sets: int, n_points: int, rng: np.random.Generator) -> np.ndarray:
        """``(n_sets, n_points, d)`` independent uniform points in the hull (rejection from the box)."""
        need = int(n_sets) * int(n_points)
        box = float(np.prod(self.hi - self.lo))
        ratio = box / max(self.area, 1e-300)
        got, n_got = [], 0
        for _ in range(1000):  # rounds of rejection sampling (usually one or two), not points
            m = int(1.2 * ratio * (need - n_got)) + 64
            cand = self.lo + rng.random((m, self.lo.size)) * (self.hi - self.lo)
            cand = cand[self.inside(cand)]
            got.append(cand)
            n_got += len(cand)
            if n_got >= need:
                break
        pts = np.concatenate(got)[:need]
        return pts.reshape(int(n_sets), int(n_points), self.lo.size)


def support(max_dist: float, n_steps: int) -> np.ndarray:
    return np.linspace(0.0, float(max_dist), int(n_steps))


def fg_stat(dist: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """F/G statistic of pooled distances: rows of ``dist`` (..., m) are separate pools -> (..., n_steps)."""
    d = torch.as_tensor(np.asarray(dist, dtype=np.float64))
    s = torch.as_tensor(sup, dtype=torch.float64)
    nb = s.numel() - 1
    i = torch.bucketize(d, s, right=True) - 1            # s[i] <= d < s[i + 1]
    i = torch.where(d == s[-1], torch.full_like(i, nb - 1), i)
    i = torch.where((d >= s[0]) & (d <= s[-1]), i, torch.full_like(i, nb))
    lead = d.shape[:-1]
    flat = i.reshape(-1, d.shape[-1]) + (torch.arange(int(np.prod(lead)) if lead else 1)[:, None] * (nb + 1))
    counts = torch.bincount(flat.reshape(-1), minlength=flat.shape[0] * (nb + 1)).view(-1, nb + 1)[:, :nb]
    frac = torch.cumsum(counts, dim=1).double() / counts.sum(dim=1, keepdim=True).double()
    out = torch.cat([torch.zeros((frac.shape[0], 1), dtype=torch.float64), frac], dim=1)
    return out.reshape(*lead, nb + 1).numpy()


def knn_distances(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Distances from each query to its ``k`` nearest ``points`` (``(q, k)``)."""
    k = int(min(k, len(points)))
    d, _ = cKDTree(points).query(queries, k=k)
    return d.reshape(len(queries), k)


def knn_distances_sets(sets: np.ndarray, queries: np.ndarray, k: int = 1) -> np.ndarray:
    """Distances from every query to its ``k`` nearest points of each set: ``(n_sets, q, k)``.

    The sets (``(S, m, d)``) are shifted apart along the first axis by more than twice the span of points
    and queries, so one k-d tree over all of them answers every (set, query) pair at once.
    """
    S, m, dim = sets.shape
    lo = np.minimum(sets.reshape(-1, dim).min(0), queries.min(0))
    hi = np.maximum(sets.reshape(-1, dim).max(0), queries.max(0))
    shift = np.zeros(dim)
    shift[0] = 3.0 * float(np.sqrt(((hi - lo) ** 2).sum())) + 1.0
    offs = np.arange(S)[:, None, None] * shift
    tree = cKDTree((sets - lo + offs).reshape(-1, dim))
    q = (queries[None, :, :] - lo + offs).reshape(-1, dim)
    d, _ = tree.query(q, k=int(k))
    return d.reshape(S, len(queries), int(k))


def pairs_below(xy: np.ndarray, sup: np.ndarray, device: torch.device, block: int = _BLOCK) -> np.ndarray:
    """Unordered pairs of ``xy`` at distance strictly below each support value: ``(n_steps,)`` int64."""
    x = torch.as_tensor(np.asarray(xy, dtype=np.float64), device=device)
    s = torch.as_tensor(sup, dtype=torch.float64, device=device)
    n, nb = x.shape[0], s.numel() + 1
    hist = torch.zeros(nb, dtype=torch.int64, device=device)
    a = 0
    while a < n:  # upper-triangular row blocks
        rows = int(max(1, min(n - a, block // max(1, n - a))))
        b = a + rows
        d2 = (x[a:b, None, 0] - x[None, a:, 0]) ** 2
        for j in range(1, x.shape[1]):
            d2 += (x[a:b, None, j] - x[None, a:, j]) ** 2
        i = torch.bucketize(d2.sqrt_(), s, right=True)  # d < s[t]  <=>  i <= t
        tri = torch.arange(a, b, device=device)[:, None] >= torch.arange(a, n, device=device)[None, :]
        i.masked_fill_(tri, nb - 1)
        hist += torch.bincount(i.reshape(-1), minlength=nb)
        a = b
    return torch.cumsum(hist, 0)[: nb - 1].cpu().numpy()


def pairs_below_sets(sets: np.ndarray, sup: np.ndarray, device: torch.device, block: int = _BLOCK) -> np.ndarray:
    """``pairs_below`` of every set of ``(S, m, d)`` simulated points: ``(S, n_steps)``, batches of whole sets.

    For simulations only: float32 distances and arithmetic binning on the evenly spaced support (a pair lies
    below ``s_t = t h`` iff ``floor(d / h) + 1 <= t``); exact ties with a support value have probability 0.
    """
    S, m, dim = sets.shape
    nb = len(sup) + 1
    h = float(sup[1] - sup[0])
    out = torch.empty((S, nb - 1), dtype=torch.int64)
    step = int(max(1, min(S, block // max(1, m * m))))
    eye = torch.eye(m, dtype=torch.bool, device=device)
    for a in range(0, S, step):  # batches of simulations
        x = torch.as_tensor(sets[a:a + step], dtype=torch.float32, device=device)
        d2 = (x[:, :, None, 0] - x[:, None, :, 0]) ** 2
        for j in range(1, dim):
            d2 += (x[:, :, None, j] - x[:, None, :, j]) ** 2
        i = d2.sqrt_().mul_(1.0 / h).floor_().add_(1.0).clamp_(max=nb - 1).to(torch.int64)
        i.masked_fill_(eye, nb - 1)
        i += (torch.arange(x.shape[0], device=device) * nb)[:, None, None]
        hist = torch.bincount(i.reshape(-1), minlength=x.shape[0] * nb).view(x.shape[0], nb)
        out[a:a + x.shape[0]] = (torch.cumsum(hist, 1)[:, : nb - 1] // 2).cpu()  # ordered -> unordered
    return out.numpy()


def k_from_pairs(pairs: np.ndarray, n: int, area: float) -> np.ndarray:
    """Ripley's K from pair counts with squidpy's normalisation by all ``n`` points of the sample."""
    return (2.0 * np.asarray(pairs, dtype=np.float64) / n) / (n / area)


def l_from_k(k: np.ndarray) -> np.ndarray:
    return np.sqrt(k / np.pi)


def sim_pvalues(obs: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """``p = (1 + #{sims >= obs}) / (S + 1)``, folded to ``min(p, 1 - p)`` (squidpy): ``(k, n_steps)``."""
    ge = (sims[None, :, :] >= obs[:, None, :]).sum(axis=1)
    p = (1.0 + ge) / (sims.shape[0] + 1.0)
    return np.minimum(p, 1.0 - p)
