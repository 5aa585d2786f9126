"""Spatial domains (niches) from neighbourhood-augmented features: arrays in, arrays out.

The method follows BANKSY (Singhal et al., Nat Genet 56:431, 2024) with CellCharter's multi-scale
aggregation (Varrone et al., Nat Genet 56:74, 2024) and a Novae-like hierarchy of domains:

1. per sample, a spatial graph (k nearest neighbours in ``obsm['spatial']``; never across samples) with
   Gaussian weights ``exp(-d^2 / (2 sigma^2))``, ``sigma`` the median distance to the k-th neighbour,
   rows normalised to sum to one (:func:`neighbour_weights`);
2. per scale s, the neighbour mean ``M_s = W_s X`` of the cell features ``X`` and, optionally, BANKSY's
   azimuthal Gabor filter magnitude ``G_s,i = | sum_j w_ij (x_j - m_i) exp(i phi_ij) |`` (first azimuthal
   harmonic: the gradient of the features across the neighbourhood) (:func:`neighbour_features`);
3. the augmented matrix ``[sqrt(1 - lambda) X, sqrt(lambda / S) M_1 .. M_S, ...]`` (:func:`augment`),
   reduced by PCA and clustered by k-means (:func:`kmeans`, k-means++ starts, Lloyd iterations, best of
   ``n_init`` by inertia) at the finest number of domains;
4. the fine clusters' centroids merged by Ward's criterion with their sizes as weights (:func:`ward_merges`:
   the merge of clusters a and b costs ``n_a n_b / (n_a + n_b) |c_a - c_b|^2``, the rise in the total
   within-cluster sum of squares), the tree cut at each coarser number (:func:`cut_levels`), so that a coarse
   domain is an exact union of finer ones.

Islands (:func:`island_relabel`): connected components of each label on the graph restricted to
same-label edges; components smaller than ``min_size`` are given the majority label across their boundary.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError
from . import spatial_graph as _sg
from .device import sparse_as_tensor

__all__ = ["neighbour_weights", "neighbour_features", "augment", "kmeans", "gmm_tied", "ward_merges", "cut_levels",
           "island_relabel"]


def neighbour_weights(coords: np.ndarray, k: int, device: torch.device,
                      kernel: str = "gaussian") -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-normalised k-nearest-neighbour weights (n x n sparse, k entries a row, self excluded) and the
    angle ``phi_ij`` of each stored edge (same sparsity pattern order, radians)."""
    if kernel not in ("gaussian", "uniform"):
        raise InputError(f"kernel must be 'gaussian' or 'uniform', not {kernel!r}")
    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    n = coords.shape[0]
    idx, dist = _sg.knn(coords, k, device)
    kk = idx.shape[1]
    if kk == 0:
        return sp.csr_matrix((n, n)), np.zeros(0)
    if kernel == "gaussian":
        sigma = float(np.median(dist[:, -1])) or 1.0
        w = np.exp(-(dist ** 2) / (2.0 * sigma ** 2))
    else:
        w = np.ones_like(dist)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    d = coords[idx] - coords[:, None, :]
    phi = np.arctan2(d[..., 1], d[..., 0])
    indptr = np.arange(0, n * kk + 1, kk, dtype=np.int64)
    mat = sp.csr_matrix((w.ravel(), idx.ravel(), indptr), shape=(n, n))
    return mat, phi.ravel()


def neighbour_features(x: torch.Tensor, w: sp.csr_matrix, phi: np.ndarray | None,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The neighbour mean ``W x`` and (``phi`` given) the azimuthal Gabor magnitude of ``x`` (n x d)."""
    wt = sparse_as_tensor(w, device, dtype=x.dtype)
    m = wt @ x
    if phi is None:
        return m, None
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    parts = []
    for f in (np.cos, np.sin):  # real and imaginary parts of sum_j w_ij (x_j - m_i) e^{i phi_ij}
        wf = sp.csr_matrix((w.data * f(phi), w.indices, w.indptr), shape=w.shape)
        s = torch.as_tensor(np.bincount(rows, weights=wf.data, minlength=w.shape[0]), dtype=x.dtype,
                            device=device)
        parts.append(sparse_as_tensor(wf, device, dtype=x.dtype) @ x - s[:, None] * m)
    return m, torch.sqrt(parts[0] ** 2 + parts[1] ** 2)


def augment(own: torch.Tensor, means: list, agfs: list, lambda_: float, agf_weight: float = 0.0) -> torch.Tensor:
    """``[sqrt(1 - lambda) own, sqrt(lambda (1 - a) / S) M_s ..., sqrt(lambda a / S) G_s ...]``, each block
    first divided by the root mean square of ``own`` so that blocks are on one scale (``a`` =
    ``agf_weight``, BANKSY's split of lambda between the mean and the Gabor terms)."""
    if not 0.0 <= lambda_ < 1.0:
        raise InputError(f"lambda_ must lie in [0, 1), not {lambda_}")
    s = max(len(means), 1)
    blocks = [np.sqrt(1.0 - lambda_) * own]
    blocks += [np.sqrt(lambda_ * (1.0 - agf_weight) / s) * m for m in means]
    if agf_weight > 0:
        blocks += [np.sqrt(lambda_ * agf_weight / s) * g for g in agfs if g is not None]
    return torch.cat(blocks, dim=1)


def _sq_dist(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    return (xx[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _kmeanspp(x: torch.Tensor, xx: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = _sq_dist(x, x[first:first + 1], xx)[:, 0]
    n_trials = 2 + int(np.log(k))
    for _ in range(1, k):  # over centres (k), vectorised over cells; greedy k-means++ (best of n_trials)
        p = (d2 / d2.sum().clamp_min(1e-300)).cpu()
        cand = torch.multinomial(p, n_trials, replacement=True, generator=gen).to(x.device)
        dc = torch.minimum(_sq_dist(x, x[cand], xx), d2[:, None])
        best = int(torch.argmin(dc.sum(0)))
        centres.append(x[cand[best]])
        d2 = dc[:, best]
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 100,
           tol: float = 1e-6) -> tuple[np.ndarray, torch.Tensor]:
    """k-means of the rows of ``x``: greedy k-means++ starts drawn from one CPU generator (so the CPU and
    CUDA start alike), Lloyd iterations until the centres move by less than ``tol`` (relative to the data
    variance), the best of ``n_init`` runs by inertia. Returns ``(labels, centres)``; memory O(n k)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise InputError(f"k={k} domains must lie in [1, n_cells = {n}]")
    gen = torch.Generator().manual_seed(int(seed))
    xx = (x * x).sum(1)
    scale = float(x.var(0).sum()) * tol
    best = (np.inf, None, None)
    for _ in range(int(n_init)):  # independent restarts
        c = _kmeanspp(x, xx, k, gen)
        for _ in range(int(max_iter)):
            lab = torch.argmin(_sq_dist(x, c, xx), dim=1)
            cnt = torch.bincount(lab, minlength=k).to(x.dtype)
            s = torch.zeros_like(c).index_add_(0, lab, x)
            new = torch.where(cnt[:, None] > 0, s / cnt.clamp_min(1)[:, None], c)
            shift = float(((new - c) ** 2).sum())
            c = new
            if shift <= scale:
                break
        d = _sq_dist(x, c, xx)
        inertia = float(d.min(1).values.sum())
        if inertia < best[0]:
            best = (inertia, torch.argmin(d, dim=1), c)
    return best[1].cpu().numpy().astype(np.int64), best[2]


def gmm_tied(x: torch.Tensor, init_labels: np.ndarray, k: int, *, max_iter: int = 100, tol: float = 1e-3,
             reg: float = 1e-6) -> dict:
    """Gaussian mixture with one covariance shared by all components (mclust's "EEE"), EM from a hard start.

    E step: ``log r_ik = log pi_k - (x_i - mu_k)^T S^-1 (x_i - mu_k) / 2 - log|S| / 2`` normalised over k
    (the distances computed in the whitened space ``x L^-T``, ``S = L L^T``); M step: ``pi_k = N_k / n``,
    ``mu_k = sum_i r_ik x_i / N_k``, ``S = sum_ik r_ik (x_i - mu_k)(x_i - mu_k)^T / n + reg I``. Stops when the
    mean log-likelihood changes by less than ``tol``. Returns ``labels`` (argmax r), ``means``, ``weights``,
    ``cov``, ``whiten`` (``L^-1``: Euclidean distances after ``x @ whiten.T`` are Mahalanobis ones),
    ``n_iter``, ``loglik``. Memory O(n k + d^2)."""
    n, d = x.shape
    r = torch.zeros((n, k), dtype=x.dtype, device=x.device)
    r[torch.arange(n, device=x.device), torch.as_tensor(init_labels, device=x.device)] = 1.0
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    xtx = x.T @ x
    prev = -np.inf
    for it in range(int(max_iter)):  # EM iterations
        nk = r.sum(0) + 10 * torch.finfo(x.dtype).eps
        mu = (r.T @ x) / nk[:, None]
        cov = (xtx - (mu.T * nk) @ mu) / n + reg * eye
        chol = torch.linalg.cholesky(cov)
        winv = torch.linalg.solve_triangular(chol, eye, upper=False)
        xw, mw = x @ winv.T, mu @ winv.T
        logp = torch.log(nk / n)[None, :] - 0.5 * _sq_dist(xw, mw, (xw * xw).sum(1)) \
            - torch.log(torch.diagonal(chol)).sum() - 0.5 * d * np.log(2 * np.pi)
        norm = torch.logsumexp(logp, dim=1, keepdim=True)
        r = torch.exp(logp - norm)
        ll = float(norm.mean())
        if abs(ll - prev) < tol:
            break
        prev = ll
    return {"labels": torch.argmax(r, 1).cpu().numpy().astype(np.int64), "means": mu, "weights": nk / n,
            "cov": cov, "whiten": winv, "n_iter": it + 1, "loglik": ll}


def ward_merges(centres: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Agglomerate clusters (centroids + sizes) by Ward's criterion. Returns the ``(k - 1, 2)`` merges in
    order; merged clusters get ids ``k, k + 1, ...`` (scipy's linkage convention). O(k^2) memory, k merges."""
    c = np.asarray(centres, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64).copy()
    k = c.shape[0]
    ids = list(range(k))
    cost = np.full((k, k), np.inf)
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    iu = np.triu_indices(k, 1)
    cost[iu] = (n[:, None] * n[None, :] / np.maximum(n[:, None] + n[None, :], 1e-300) * d2)[iu]
    merges = np.zeros((max(k - 1, 0), 2), np.int64)
    for step in range(k - 1):  # over merges (k - 1), not over cells
        a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
        merges[step] = (ids[a], ids[b])
        tot = n[a] + n[b]
        c[a] = (n[a] * c[a] + n[b] * c[b]) / max(tot, 1e-300)
        n[a], n[b] = tot, 0.0
        ids[a] = k + step
        cost[b, :] = cost[:, b] = np.inf
        dd = ((c - c[a]) ** 2).sum(1)
        row = np.where(n > 0, n * n[a] / np.maximum(n + n[a], 1e-300) * dd, np.inf)
        row[a] = np.inf
        cost[a, :] = np.where(np.arange(k) > a, row, np.inf)
        cost[:, a] = np.where(np.arange(k) < a, row, np.inf)
    return merges


def cut_levels(merges: np.ndarray, k_fine: int, levels) -> dict[int, np.ndarray]:
    """For each number of domains ``m`` in ``levels`` (<= ``k_fine``), the parent (0..m-1) of every fine
    cluster when the first ``k_fine - m`` merges are applied. Parents are numbered by their smallest fine
    member, so the numbering is stable."""
    out = {}
    for m in levels:
        parent = np.arange(2 * k_fine - 1)
        for step in range(k_fine - int(m)):  # union of the merged pair (k merges at most)
            a, b = merges[step]
            parent[a] = parent[b] = k_fine + step
        root = np.arange(k_fine)
        for _ in range(k_fine):  # follow the pointers to the roots (tree depth <= k)
            nxt = parent[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        _, first = np.unique(root, return_index=True)
        order = np.argsort(np.argsort(first))
        _, inv = np.unique(root, return_inverse=True)
        out[int(m)] = order[inv].astype(np.int64)
    return out


def _components(adj: sp.csr_matrix, labels: np.ndarray) -> tuple[int, np.ndarray]:
    from scipy.sparse.csgraph import connected_components

    coo = adj.tocoo()
    same = labels[coo.row] == labels[coo.col]
    g = sp.csr_matrix((np.ones(int(same.sum())), (coo.row[same], coo.col[same])), shape=adj.shape)
    return connected_components(g, directed=False)


def island_relabel(labels: np.ndarray, adj: sp.csr_matrix, min_size: int, n_labels: int,
                   max_rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Relabel components (same-label, connected on ``adj``) smaller than ``min_size`` to the majority label
    across their boundary, votes from cells of large components first. ``labels`` are 0..n_labels-1
    (-1 = unlabelled, left alone and never voting). Repeats while a round changes something. Returns
    ``(new_labels, small)``, ``small`` marking the cells of the small components of the first round."""
    lab = np.asarray(labels, dtype=np.int64).copy()
    adj = sp.csr_matrix(adj)
    adj = ((adj + adj.T) > 0).astype(np.float64).tocsr()
    n = lab.shape[0]
    first_small = None
    for _ in range(int(max_rounds)):  # rounds (a few), each vectorised over all components
        ok = lab >= 0
        ncomp, comp = _components(adj, np.where(ok, lab, -1))
        size = np.bincount(comp, minlength=ncomp)
        small = (size[comp] < min_size) & ok
        if first_small is None:
            first_small = small.copy()
        if not small.any():
            break
        cmat = sp.csr_matrix((np.ones(n), (comp, np.arange(n))), shape=(ncomp, n))
        onehot = sp.csr_matrix((np.ones(int(ok.sum())), (np.nonzero(ok)[0], lab[ok])), shape=(n, n_labels))
        votes_big = (cmat @ adj @ sp.diags((~small).astype(np.float64)) @ onehot).toarray()
        votes_all = (cmat @ adj @ onehot).toarray()
        own = np.full(ncomp, -1, np.int64)
        own[comp[ok]] = lab[ok]
        has = own >= 0
        votes_big[np.nonzero(has)[0], own[has]] = 0.0
        votes_all[np.nonzero(has)[0], own[has]] = 0.0
        votes = np.where(votes_big.sum(1, keepdims=True) > 0, votes_big, votes_all)
        target = np.where(votes.sum(1) > 0, votes.argmax(1), own)
        new = np.where(small, target[comp], lab)
        if np.array_equal(new, lab):
            break
        lab = new
    return lab, first_small
