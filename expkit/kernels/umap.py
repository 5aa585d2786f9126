"""UMAP layout of a fuzzy simplicial set (McInnes, Healy & Melville 2018), in torch.

* ``find_ab_params``: fit ``1 / (1 + a x^(2b))`` to the target membership curve of ``min_dist``/``spread``.
* ``spectral_init``: eigenvectors of the symmetric normalised Laplacian ``I - D^-1/2 W D^-1/2`` (the
  2nd..(dim+1)-th smallest, per connected component), rescaled to [0, 10].
* ``optimize_layout``: stochastic gradient descent on the fuzzy cross entropy. Edge ``e`` of weight
  ``w_e`` is sampled every ``max(w) / w_e`` epochs, each sample pulls both ends together and pushes the
  head away from ``negative_sample_rate`` random points. All edges due in an epoch are processed as one
  vectorised batch (gradients from the positions at the start of the step, accumulated with
  ``index_add_``), so there is no per-edge Python loop. Deterministic given the seed on the CPU.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError


def find_ab_params(spread: float = 1.0, min_dist: float = 0.5) -> tuple[float, float]:
    """Least-squares fit of ``a, b`` in ``1 / (1 + a x^(2b))`` to the curve that is 1 below ``min_dist`` and
    ``exp(-(x - min_dist) / spread)`` above, on 300 points of [0, 3 spread]."""
    from scipy.optimize import curve_fit

    if spread <= 0 or min_dist < 0 or min_dist > spread:
        raise InputError(f"need 0 <= min_dist <= spread and spread > 0 (got min_dist={min_dist}, spread={spread})")

    def curve(x, a, b):
        return 1.0 / (1.0 + a * x ** (2 * b))

    xv = np.linspace(0, spread * 3, 300)
    yv = np.where(xv < min_dist, 1.0, np.exp(-(xv - min_dist) / spread))
    (a, b), _ = curve_fit(curve, xv, yv)
    return float(a), float(b)


def _component_spectral(W: sp.csr_matrix, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Spectral coordinates of one connected graph (n x dim), max-abs scaled to 1."""
    from scipy.sparse.linalg import eigsh

    n = W.shape[0]
    if n <= dim + 1:
        return rng.uniform(-1, 1, size=(n, dim))
    deg = np.asarray(W.sum(1)).ravel()
    dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-300))
    M = sp.diags(dinv) @ W @ sp.diags(dinv)  # normalised adjacency: L = I - M
    k = dim + 1
    try:
        if n < 2000:
            vals, vecs = np.linalg.eigh(M.toarray())
        else:
            v0 = np.sqrt(deg)  # the top eigenvector of M; a deterministic start
            ncv = max(2 * k + 1, int(math.sqrt(n)))
            vals, vecs = eigsh(M, k=k, which="LA", ncv=min(ncv, n - 1), tol=1e-4, v0=v0, maxiter=n * 5)
        order = np.argsort(vals)[::-1][1:k]  # largest eigenvalues of M = smallest of L, skip the trivial one
        coords = vecs[:, order]
    except Exception:  # pragma: no cover - ARPACK failure: random start, as the reference does
        coords = rng.uniform(-1, 1, size=(n, dim))
    scale = np.abs(coords).max()
    return coords / (scale if scale > 0 else 1.0)


def spectral_init(graph, dim: int = 2, *, seed: int = 0) -> np.ndarray:
    """Spectral start of the layout (float32, n x dim, each axis in [0, 10]).

    Components are embedded separately and laid out on a square grid ordered by size (largest first),
    each in a cell scaled to its share of the points.
    """
    from scipy.sparse.csgraph import connected_components

    W = sp.csr_matrix(graph, dtype=np.float64)
    n = W.shape[0]
    rng = np.random.default_rng(seed)
    n_comp, labels = connected_components(W, directed=False)
    out = np.zeros((n, dim))
    if n_comp == 1:
        out = _component_spectral(W, dim, rng)
    else:
        sizes = np.bincount(labels, minlength=n_comp)
        order = np.argsort(-sizes, kind="stable")
        side = int(math.ceil(math.sqrt(n_comp)))
        for rank, c in enumerate(order):
            members = np.flatnonzero(labels == c)
            coords = _component_spectral(W[members][:, members], dim, rng)
            cell = np.zeros(dim)
            cell[0], cell[1 % dim] = (rank % side) * 3.0, (rank // side) * 3.0
            out[members] = cell + coords * max(math.sqrt(sizes[c] / sizes[order[0]]), 0.05)
    out = out * (10.0 / max(np.abs(out).max(), 1e-12))
    out = out + rng.normal(scale=1e-4, size=out.shape)
    lo, hi = out.min(0), out.max(0)
    out = 10.0 * (out - lo) / np.where(hi > lo, hi - lo, 1.0)
    return out.astype(np.float32)


def random_init(n: int, dim: int = 2, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 10, size=(n, dim)).astype(np.float32)


def default_n_epochs(n: int) -> int:
    return 500 if n <= 10000 else 200


def optimize_layout(init, graph, *, a: float, b: float, n_epochs: int, device: torch.device | None = None,
                    seed: int = 0, gamma: float = 1.0, initial_alpha: float = 1.0,
                    negative_sample_rate: int = 5, clip: float = 4.0) -> np.ndarray:
    """SGD of the UMAP cross entropy from ``init`` (n x dim) on ``graph`` (symmetric sparse weights).

    Edges with weight below ``max / n_epochs`` are never sampled (dropped). Returns float32 (n x dim).
    """
    device = device or torch.device("cpu")
    G = sp.coo_matrix(graph)
    n = G.shape[0]
    w = G.data.astype(np.float64)
    keep = w > 0
    if keep.any():
        keep &= w >= w.max() / float(n_epochs)
    head_np, tail_np, w = G.row[keep].astype(np.int64), G.col[keep].astype(np.int64), w[keep]
    Y0 = np.asarray(init, dtype=np.float32)
    dim = Y0.shape[1]
    if w.size == 0 or n_epochs <= 0:
        return Y0.copy()
    # one contiguous 1-D tensor per axis: 1-D gathers and index_add_ are the fast paths
    Y = [torch.as_tensor(np.ascontiguousarray(Y0[:, c]), device=device) for c in range(dim)]
    head = torch.as_tensor(head_np, device=device)
    tail = torch.as_tensor(tail_np, device=device)
    eps = torch.as_tensor(w.max() / w, dtype=torch.float64, device=device)  # epochs per sample
    eps_neg = eps / negative_sample_rate
    next_sample = eps.clone()
    next_neg = eps_neg.clone()
    if device.type == "cpu":  # numpy's PCG64 draws integers much faster than torch's CPU generator
        rng = np.random.default_rng(int(seed))

        def draw(m: int) -> torch.Tensor:
            return torch.from_numpy(rng.integers(0, n, size=m, dtype=np.int64))
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))

        def draw(m: int) -> torch.Tensor:
            return torch.randint(0, n, (m,), generator=gen, device=device)
    alpha = initial_alpha
    two_ab = 2.0 * a * b
    tiny = torch.finfo(torch.float32).tiny
    for epoch in range(n_epochs):
        active = torch.nonzero(next_sample <= epoch).flatten()
        if active.numel():
            h, t = head.index_select(0, active), tail.index_select(0, active)
            # attraction along the edge, both ends move (diff = 0 gives no move whatever the coefficient)
            diff = [Yc.index_select(0, h) - Yc.index_select(0, t) for Yc in Y]
            d2 = diff[0] * diff[0]
            for c in range(1, dim):
                d2 += diff[c] * diff[c]
            d2.clamp_(min=tiny)
            pb = d2.pow(b)
            coef = (pb / d2).mul_(-two_ab).div_(pb.mul_(a).add_(1.0))
            for c in range(dim):
                g = (coef * diff[c]).clamp_(-clip, clip).mul_(alpha)
                Y[c].index_add_(0, h, g)
                Y[c].index_add_(0, t, g.neg_())
            next_sample[active] += eps[active]
            # repulsion from random points, head moves
            en = eps_neg.index_select(0, active)
            n_neg = torch.floor((epoch - next_neg.index_select(0, active)) / en).clamp_(min=0)
            next_neg[active] += n_neg * en
            n_neg = n_neg.to(torch.int64)
            total = int(n_neg.sum())
            if total:
                hn = torch.repeat_interleave(h, n_neg)
                k = draw(total)
                diff = [Yc.index_select(0, hn) - Yc.index_select(0, k) for Yc in Y]
                d2 = diff[0] * diff[0]
                for c in range(1, dim):
                    d2 += diff[c] * diff[c]
                coef = (2.0 * gamma * b) / ((d2 + 0.001) * (d2.pow(b).mul_(a).add_(1.0)))
                zero = torch.nonzero(d2 == 0).flatten()  # coincident points: a fixed push, none from itself
                for c in range(dim):
                    g = (coef * diff[c]).clamp_(-clip, clip)
                    if zero.numel():
                        g[zero] = torch.where(hn[zero] == k[zero], 0.0, clip).to(g.dtype)
                    Y[c].index_add_(0, hn, g.mul_(alpha))
        alpha = initial_alpha * (1.0 - float(epoch) / float(n_epochs))
    return torch.stack(Y, 1).cpu().numpy()
