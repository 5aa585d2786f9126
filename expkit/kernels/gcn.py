"""SpaGCN-style spatial domain kernels (Hu et al., Nat Methods 2021): arrays in, arrays out.

The model: a Gaussian spatial graph ``A_ij = exp(-d_ij^2 / (2 l^2))`` (``A_ii = 1``) over spot coordinates
(optionally a third, histology coordinate), one linear graph convolution ``Z = A X W + b`` of the PCA features
``X``, and a DEC clustering head (Student-t soft assignment ``q``, sharpened target ``p``, KL(p || q)).

Because the graph convolution is linear and the graph fixed, ``A X`` is computed once (sparse, truncated
Gaussian) and each epoch only costs ``(A X) W``: no n x n matrix is ever formed.
"""
from __future__ import annotations

import math
import random

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from .._logging import logger
from ..errors import InputError, ResourceError
from .optim import Adam as _Adam

# weights below exp(-TRUNC^2 / 2) (1e-6 of the self weight) are dropped
TRUNC = math.sqrt(2.0 * math.log(1e6))
MAX_PAIRS = 50_000_000  # ~1.2 GB of pair lists


# --------------------------------------------------------------------------------------------
# spatial graph
# --------------------------------------------------------------------------------------------
class PairDistances:
    """Squared distances of all pairs (i != j) closer than ``radius``, grown on demand."""

    def __init__(self, coords: np.ndarray, radius: float | None = None, max_pairs: int = MAX_PAIRS):
        self.coords = np.ascontiguousarray(coords, dtype=np.float64)
        self.n = self.coords.shape[0]
        self.tree = cKDTree(self.coords)
        self.max_pairs = max_pairs
        self.radius = 0.0
        self.i = self.j = np.zeros(0, np.int64)
        self.d2 = np.zeros(0)
        if radius is None:  # a start radius: about 30 neighbours per point
            k = min(31, self.n)
            d, _ = self.tree.query(self.coords[: min(self.n, 2000)], k=k)
            radius = float(np.median(d[:, -1])) if k > 1 else 1.0
        self.grow(radius)

    def grow(self, radius: float) -> None:
        if radius <= self.radius:
            return
        expected = self._estimate(radius)
        if expected > self.max_pairs:
            raise ResourceError(f"the spatial graph would hold ~{expected:,.0f} pairs within radius {radius:.4g} "
                                f"(limit {self.max_pairs:,}): the lengthscale is too large for these coordinates")
        m = self.tree.sparse_distance_matrix(self.tree, radius, output_type="ndarray")
        keep = m["i"] != m["j"]
        self.i, self.j, self.d2 = m["i"][keep].astype(np.int64), m["j"][keep].astype(np.int64), m["v"][keep] ** 2
        self.radius = float(radius)

    def _estimate(self, radius: float) -> float:
        sub = self.coords[:: max(1, self.n // 500)]
        counts = self.tree.query_ball_point(sub, radius, return_length=True)
        return float(np.mean(counts)) * self.n

    def p(self, l: float) -> float:
        """Mean over points of the summed neighbour weight, ``mean_i sum_{j != i} exp(-d_ij^2 / 2 l^2)``
        (SpaGCN's ``calculate_p``); a lower bound when ``TRUNC * l`` exceeds the radius."""
        return float(np.exp(-self.d2 / (2.0 * l * l)).sum() / self.n)


def search_l(pairs: PairDistances, p: float = 0.5, *, start: float = 0.01, end: float = 1000.0,
             tol: float = 0.01, max_run: int = 100) -> float:
    """The lengthscale ``l`` whose expected neighbour weight is ``p`` (bisection as SpaGCN's ``search_l``).

    The pair list is grown whenever a tried ``l`` needs neighbours beyond its radius and a decision could
    depend on them (a truncated sum is a lower bound, so "too large" is always decided correctly).
    """
    def calc(l: float) -> float:
        v = pairs.p(l)
        if v < p + tol and TRUNC * l > pairs.radius:  # could be an underestimate that matters
            pairs.grow(TRUNC * l)
            v = pairs.p(l)
        return v

    p_low, p_high = calc(start), calc(end)
    if p_low > p + tol:
        raise InputError(f"no lengthscale found for p={p}: even l={start} gives p={p_low:.4g}; lower start")
    if p_high < p - tol:
        raise InputError(f"no lengthscale found for p={p}: even l={end} gives p={p_high:.4g}; raise end")
    if abs(p_low - p) <= tol:
        return float(start)
    if abs(p_high - p) <= tol:
        return float(end)
    run = 0
    while p_low + tol < p < p_high - tol:
        run += 1
        if run > max_run:
            break
        mid = (start + end) / 2.0
        p_mid = calc(mid)
        if abs(p_mid - p) <= tol:
            return float(mid)
        if p_mid <= p:
            start, p_low = mid, p_mid
        else:
            end, p_high = mid, p_mid
    logger.warning("search_l: exact l not found after %d runs; using l = %.4g (p = %.4g)", max_run, start, p_low)
    return float(start)


def gaussian_adjacency(pairs: PairDistances, l: float, dtype=np.float32) -> sp.csr_matrix:
    """``A_ij = exp(-d_ij^2 / 2 l^2)`` truncated at ``TRUNC * l`` (relative weight 1e-6), ``A_ii = 1``."""
    pairs.grow(TRUNC * l)
    keep = pairs.d2 <= (TRUNC * l) ** 2
    w = np.exp(-pairs.d2[keep] / (2.0 * l * l))
    n = pairs.n
    a = sp.coo_matrix((np.concatenate([w, np.ones(n)]),
                       (np.concatenate([pairs.i[keep], np.arange(n)]),
                        np.concatenate([pairs.j[keep], np.arange(n)]))), shape=(n, n))
    return a.tocsr().astype(dtype)


def block_diag_adjacency(blocks: list[sp.spmatrix]) -> sp.csr_matrix:
    return sp.block_diag(blocks, format="csr")


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def pca(x, n_comps: int, *, seed: int = 0, n_iter: int = 3, oversample: int = 20,
        device: torch.device | None = None, dense_max: float = 4e7) -> np.ndarray:
    """Centred PCA scores (n x n_comps) by a seeded randomized SVD; ``x`` may be scipy sparse (never centred
    densely: the mean is subtracted implicitly)."""
    device = device or torch.device("cpu")
    n, m = x.shape
    k = min(n_comps, min(n, m) - 1)
    mu = np.asarray(x.mean(axis=0), dtype=np.float32).ravel()
    if sp.issparse(x) and n * m <= dense_max:  # dense BLAS beats sparse products at this size
        x = x.toarray()
    if sp.issparse(x):
        xs = sp.csr_matrix(x, dtype=np.float32)
        xt = xs.T.tocsr()
        mat = lambda b: xs @ b - (mu @ b)[None, :]  # noqa: E731
        rmat = lambda b: xt @ b - np.outer(mu, b.sum(0))  # noqa: E731
    else:
        xd = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device) - torch.as_tensor(mu, device=device)
        mat = lambda b: (xd @ torch.as_tensor(b, device=device)).cpu().numpy()  # noqa: E731
        rmat = lambda b: (xd.T @ torch.as_tensor(b, device=device)).cpu().numpy()  # noqa: E731
    return _randomized_scores(mat, rmat, m, k, seed, n_iter, oversample)


def pca_centered_blocks(blocks: list, n_comps: int, *, seed: int = 0, n_iter: int = 3,
                        oversample: int = 20) -> np.ndarray:
    """PCA scores of the row-stacked ``blocks`` after removing each block's own column means (sparse blocks
    stay sparse: the centring is implicit)."""
    xs = [sp.csr_matrix(b, dtype=np.float32) for b in blocks]
    mus = [np.asarray(b.mean(axis=0), dtype=np.float32).ravel() for b in xs]
    sizes = [b.shape[0] for b in xs]
    x = sp.vstack(xs).tocsr()
    xt = x.T.tocsr()
    n, m = x.shape
    k = min(n_comps, min(n, m) - 1)
    mu_stack = np.stack(mus)  # (blocks, genes)
    owner = np.repeat(np.arange(len(xs)), sizes)
    mat = lambda b: x @ b - (mu_stack @ b)[owner]  # noqa: E731
    # X_c^T b = X^T b - sum_blocks mu_s (sum of b over the block's rows)
    rmat = lambda b: xt @ b - mu_stack.T @ np.add.reduceat(b, np.cumsum([0] + sizes[:-1]), axis=0)  # noqa: E731
    return _randomized_scores(mat, rmat, m, k, seed, n_iter, oversample)


def _randomized_scores(mat, rmat, m: int, k: int, seed: int, n_iter: int, oversample: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = mat(rng.standard_normal((m, k + oversample), dtype=np.float32))
    q, _ = np.linalg.qr(q)
    for _ in range(n_iter):
        z, _ = np.linalg.qr(rmat(q))
        q, _ = np.linalg.qr(mat(z))
    ub, s, _ = np.linalg.svd(rmat(q).T, full_matrices=False)
    u = q @ ub[:, :k]
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(k)])
    signs[signs == 0] = 1
    return (u * s[:k] * signs).astype(np.float32)


# --------------------------------------------------------------------------------------------
# initial clustering
# --------------------------------------------------------------------------------------------
def to_igraph(conn: sp.spmatrix):
    import igraph as ig

    up = sp.triu(conn, k=1).tocoo()
    g = ig.Graph(n=conn.shape[0], edges=np.column_stack([up.row, up.col]), directed=False)
    g.es["weight"] = up.data.astype(np.float64)
    return g


def cluster_graph(g, resolution: float, method: str = "louvain", seed: int = 0) -> np.ndarray:
    """Louvain (igraph multilevel, on the unweighted graph as scanpy's ``louvain`` that SpaGCN calls) or Leiden
    (igraph, weighted as scanpy's ``leiden``) communities maximising modularity with a resolution, seeded.
    ``g``: an igraph Graph with edge attribute "weight" (see :func:`to_igraph`) or a sparse matrix."""
    import igraph as ig

    if sp.issparse(g):
        g = to_igraph(g)
    if method not in ("louvain", "leiden"):
        raise InputError(f"unknown clustering method {method!r}: 'louvain' or 'leiden'")
    ig.set_random_number_generator(random.Random(int(seed)))  # igraph draws from this: seeded, local
    try:
        if method == "leiden":
            part = g.community_leiden(objective_function="modularity", weights="weight", resolution=resolution,
                                      n_iterations=-1)
        else:
            # unweighted, as scanpy's louvain (use_weights=False by default), which SpaGCN calls
            part = g.community_multilevel(weights=None, resolution=resolution)
    finally:
        ig.set_random_number_generator(random)
    labels = np.asarray(part.membership)
    return _relabel_by_size(labels)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv]


def search_resolution(conn: sp.csr_matrix, n_clusters: int, *, start: float = 0.7, step: float = 0.1,
                      method: str = "louvain", seed: int = 0, max_run: int = 20,
                      count=None) -> tuple[float, np.ndarray]:
    """SpaGCN's resolution walk: step towards the target number of domains, halving the step on overshoot.

    ``count(labels) -> int`` gives the number of domains a clustering leads to (default: its number of
    communities; SpaGCN counts after a short training, see ``_fit``). Returns (resolution, labels); when
    the target is not reached after ``max_run`` tries, the tried resolution with the closest count.
    """
    g = to_igraph(conn)
    tried: dict[float, tuple[int, np.ndarray]] = {}

    def run(r):
        r = round(r, 10)
        if r not in tried:
            lab = cluster_graph(g, r, method, seed)
            tried[r] = (int(count(lab)) if count is not None else int(lab.max()) + 1, lab)
        return tried[r]

    res = start
    old, labels = run(res)
    n_run = 0
    while old != n_clusters and n_run < max_run:
        sign = 1 if old < n_clusters else -1
        cand = res + step * sign
        if cand <= 0:
            step /= 2
            n_run += 1
            continue
        new, new_labels = run(cand)
        if new == n_clusters:
            return cand, new_labels
        if (1 if new < n_clusters else -1) == sign:
            res, old, labels = cand, new, new_labels
        else:
            step /= 2
        n_run += 1
    if old != n_clusters:
        best = min(tried, key=lambda r: (abs(tried[r][0] - n_clusters), -tried[r][0], abs(r - start)))
        logger.warning("resolution search: %d domains not reached after %d tries; res = %.4g gives %d",
                       n_clusters, n_run, best, tried[best][0])
        res, labels = best, tried[best][1]
    return res, labels


# --------------------------------------------------------------------------------------------
# the GCN + DEC model
# --------------------------------------------------------------------------------------------
def _soft_assign(z: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    d2 = ((z * z).sum(1, keepdim=True) - 2.0 * (z @ mu.T) + (mu * mu).sum(1)).clamp_min(0.0)
    q = (1.0 + d2 / alpha + 1e-8).pow(-(alpha + 1.0)) / 2.0
    return q / q.sum(1, keepdim=True)


def _target(q: torch.Tensor) -> torch.Tensor:
    p = q.pow(2) / q.sum(0)
    return p / p.sum(1, keepdim=True)


def init_gcn(n_in: int, n_out: int, *, generator: torch.Generator, device, dtype=torch.float32):
    """Weight and bias ~ U(-1/sqrt(n_out), 1/sqrt(n_out)) (Kipf and Welling's initialisation)."""
    bound = 1.0 / math.sqrt(n_out)
    w = (torch.rand(n_in, n_out, generator=generator, dtype=dtype) * 2 - 1) * bound
    b = (torch.rand(n_out, generator=generator, dtype=dtype) * 2 - 1) * bound
    return w.to(device).requires_grad_(True), b.to(device).requires_grad_(True)


def embed(ax: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ax @ w + b


def train_dec(ax: torch.Tensor, w: torch.Tensor, b: torch.Tensor, init_labels: np.ndarray, *,
              lr: float = 0.05, max_epochs: int = 200, update_interval: int = 5, tol: float = 5e-3,
              alpha: float = 0.2, train_centers: bool = False, quiet: bool = False) -> dict:
    """DEC fine-tuning of the graph convolution ``Z = (A X) W + b`` (Adam, no weight decay).

    Centres start at the mean embedding of each initial cluster. The target ``p`` is refreshed every
    ``update_interval`` epochs; training stops when, at a refresh, the fraction of labels that changed over
    the last epoch is below ``tol``. SpaGCN keeps the centres fixed (they are created after its optimiser);
    ``train_centers=True`` optimises them too.
    """
    device = ax.device
    y = torch.as_tensor(init_labels, device=device, dtype=torch.int64)
    k = int(y.max()) + 1
    with torch.no_grad():
        z0 = embed(ax, w, b)
        onehot = torch.nn.functional.one_hot(y, k).to(z0.dtype)  # a matmul, deterministic on CUDA too
        mu = (onehot.T @ z0) / onehot.sum(0).clamp_min(1)[:, None]
    params = [w, b] + ([mu.requires_grad_(True)] if train_centers else [])
    opt = _Adam(params, lr=lr)
    last = y
    n = ax.shape[0]
    epoch, stopped, delta = 0, False, float("nan")
    p = None
    for epoch in range(max_epochs):
        if epoch % update_interval == 0:
            with torch.no_grad():
                p = _target(_soft_assign(embed(ax, w, b), mu, alpha))
        opt.zero_grad()
        q = _soft_assign(embed(ax, w, b), mu, alpha)
        loss = (p * torch.log(p / (q + 1e-6))).sum(1).mean()
        loss.backward()
        opt.step()
        pred = q.detach().argmax(1)
        delta = float((pred != last).sum()) / n
        last = pred
        if epoch > 0 and (epoch - 1) % update_interval == 0 and delta < tol:
            stopped = True
            break
    if quiet:
        pass
    elif stopped:
        logger.info("delta_label %.4g < tol %g, stopping at epoch %d", delta, tol, epoch)
    else:
        logger.info("reached max_epochs = %d (delta_label %.4g)", max_epochs, delta)
    with torch.no_grad():
        z = embed(ax, w, b)
        q = _soft_assign(z, mu.detach(), alpha)
    return {"labels": q.argmax(1).cpu().numpy(), "q": q.cpu().numpy(), "z": z.cpu().numpy(),
            "epochs": epoch + 1, "delta": delta}


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..k-1 in the order of their first index (empty clusters dropped)."""
    _, inv = np.unique(labels, return_inverse=True)
    return inv.astype(np.int64)


# --------------------------------------------------------------------------------------------
# refinement
# --------------------------------------------------------------------------------------------
def grid_neighbours(array_coords: np.ndarray, shape: str) -> np.ndarray:
    """Indices (n x (k+1), self first) of each spot's grid neighbours: ``hexagon`` the 6 of the Visium
    array (row, col) (rows 1 apart, columns 2 apart), ``square`` the 4 of an ST grid."""
    rc = np.asarray(array_coords, dtype=np.float64)
    if shape == "hexagon":
        pts, k = rc * np.array([math.sqrt(3.0), 1.0]), 6
    elif shape == "square":
        pts, k = rc, 4
    else:
        raise InputError(f"refine_shape must be 'hexagon', 'square' or None, not {shape!r}")
    k = min(k, len(pts) - 1)
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    # put self first (ties at distance 0 only with duplicate positions)
    self_first = np.argmax(idx == np.arange(len(pts))[:, None], axis=1)
    has_self = (idx == np.arange(len(pts))[:, None]).any(1)
    swap = has_self & (self_first > 0)
    rows = np.nonzero(swap)[0]
    idx[rows, self_first[rows]] = idx[rows, 0]
    idx[:, 0] = np.arange(len(pts))
    return idx


def refine_labels(labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """SpaGCN's majority relabelling: a spot whose own label holds fewer than half of its k neighbours'
    votes (self included among the k+1) takes the label of more than half of them, if there is one."""
    labels = np.asarray(labels)
    n, k1 = neighbours.shape
    k = k1 - 1
    K = int(labels.max()) + 1
    cnt = np.zeros((n, K), dtype=np.int32)
    np.add.at(cnt, (np.repeat(np.arange(n), k1), labels[neighbours].ravel()), 1)
    own = cnt[np.arange(n), labels]
    top = cnt.max(1)
    return np.where((own < k / 2) & (top > k / 2), cnt.argmax(1), labels)
