"""Harmony (Korsunsky et al. 2019, Nat Methods 16:1289) in torch: arrays in, arrays out.

Notation: ``Z`` (N x d) the embedding, ``Zc`` its rows scaled to unit length, ``Y`` (K x d) unit-length
cluster centroids, ``R`` (K x N) soft cluster memberships, ``Phi`` the one-hot batch of each cell,
``O`` (K x B) observed and ``E`` (K x B) expected (``E_kb = Pr_b sum_i R_ki``) batch counts per cluster.

1. Clustering with a diversity penalty minimises
   ``sum_ki R_ki ||Zc_i - Y_k||^2 + sigma sum_ki R_ki log R_ki
   + sigma sum_kb theta_b O_kb log((O_kb + 1) / (E_kb + 1))``;
   its fixed point is ``R_ki ∝ exp(-||Zc_i - Y_k||^2 / sigma) ((E_kb + 1) / (O_kb + 1))^theta_b`` (b the
   batch of cell i), updated for random blocks of cells with O and E refreshed after each block, and
   ``Y_k ∝ sum_i R_ki Zc_i``. On the unit sphere ``||Zc_i - Y_k||^2 = 2 (1 - Y_k . Zc_i)``.
2. Correction by a mixture of experts: per cluster k a ridge regression of ``Z`` on ``[1, Phi]`` weighted
   by ``R_k`` (penalty ``lambda`` on the batch terms, none on the intercept),
   ``W_k = (Phi~ diag(R_k) Phi~^T + Lambda)^-1 Phi~ diag(R_k) Z``, and
   ``Z_corr = Z - sum_k diag(R_k) Phi^T W_k[batch rows]`` (the intercept is kept). All K systems are
   solved in one batched call.
Steps 1-2 alternate until the objective changes by less than ``eps_harmony`` (relative) or ``max_iter``.

Randomness (k-means++ initialisation, block order) comes from one CPU ``torch.Generator`` so that a
seed gives the same result on the CPU and on CUDA (up to floating-point rounding).
"""
from __future__ import annotations

import math

import torch


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kmeans_cosine(zc: torch.Tensor, k: int, generator: torch.Generator, n_iter: int = 25) -> torch.Tensor:
    """Spherical-ish k-means (Lloyd, Euclidean on unit rows) with k-means++ seeding. Returns k x d."""
    n = zc.shape[0]
    dev = zc.device
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [zc[first]]
    d2 = ((zc - zc[first]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++ (loop over clusters, each step vectorised over cells)
        probs = (d2 / d2.sum().clamp_min(1e-300)).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(zc[nxt])
        d2 = torch.minimum(d2, ((zc - zc[nxt]) ** 2).sum(1))
    y = torch.stack(centers)
    for _ in range(n_iter):
        dist = (zc * zc).sum(1, keepdim=True) - 2.0 * zc @ y.T + (y * y).sum(1)[None]
        lab = dist.argmin(1)
        sums = torch.zeros_like(y).index_add_(0, lab, zc)
        cnt = torch.bincount(lab, minlength=k).to(zc.dtype)
        empty = cnt == 0
        new = sums / cnt.clamp_min(1.0)[:, None]
        y = torch.where(empty[:, None], y, new)
    return y.to(dev)


def harmony(z: torch.Tensor, batch: torch.Tensor, n_batches: int, *, theta: torch.Tensor | float = 2.0,
            sigma: float = 0.1, lamb: float = 1.0, n_clusters: int | None = None, max_iter: int = 10,
            max_iter_kmeans: int = 20, eps_cluster: float = 1e-5, eps_harmony: float = 1e-4,
            block_size: float = 0.05, generator: torch.Generator | None = None) -> dict:
    """Run Harmony on ``z`` (N x d tensor on its device) with integer batch codes ``batch`` (N,).

    Returns ``{"z": corrected N x d, "R": N x K soft memberships, "objective": list (per iteration),
    "n_iter": int, "converged": bool, "kmeans_rounds": list}``.
    """
    dev, dtype = z.device, z.dtype
    n, _ = z.shape
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    k = int(n_clusters) if n_clusters else int(min(round(n / 30.0), 100))
    k = max(1, min(k, n))
    batch = batch.to(dev).long()
    phi = torch.nn.functional.one_hot(batch, n_batches).to(dtype)  # N x B
    n_b = phi.sum(0)
    pr_b = n_b / n
    theta = torch.as_tensor(theta, dtype=dtype, device=dev).expand(n_batches).clone()
    sigma_k = torch.full((k,), float(sigma), dtype=dtype, device=dev)

    zc = _normalize(z)
    y = _normalize(kmeans_cosine(zc, k, generator))
    inv_sigma = 1.0 / sigma_k[None, :]

    # cell-major layout: r, dist are N x K so that blocks of cells are contiguous rows
    def dist_to(y_, zc_):
        two = torch.full((), 2.0, dtype=dtype, device=dev)
        return torch.addmm(two, zc_, y_.T, beta=1.0, alpha=-2.0)  # 2 (1 - zc . y), N x K

    dist = dist_to(y, zc)
    r = torch.softmax(-dist * inv_sigma, dim=1)
    e = r.sum(0)[:, None] * pr_b[None]  # K x B
    o = r.T @ phi  # K x B

    def objective() -> float:
        kmeans_err = (r * dist).sum()
        ent = torch.xlogy(r, r).sum(0) @ sigma_k
        cross = (sigma_k[:, None] * theta[None] * o * torch.log((o + 1.0) / (e + 1.0))).sum()
        return float(kmeans_err + ent + cross)

    objective_h = [objective()]
    kmeans_rounds: list[int] = []
    n_blocks = int(math.ceil(1.0 / block_size))
    z_corr = z.clone()
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        # 1. clustering with diversity penalty
        obj_k = []
        rounds = 0
        for i in range(max_iter_kmeans):
            y = _normalize(r.T @ zc)
            dist = dist_to(y, zc)
            order = torch.randperm(n, generator=generator)
            for block in torch.tensor_split(order, n_blocks):
                block = torch.sort(block).values.to(dev)
                rb, pb = r[block], phi[block]
                o -= rb.T @ pb
                e -= rb.sum(0)[:, None] * pr_b[None]
                penalty = (theta[None] * torch.log((e + 1.0) / (o + 1.0)))  # K x B
                logits = -dist[block] * inv_sigma + pb @ penalty.T
                rb = torch.softmax(logits, dim=1)
                r[block] = rb
                o += rb.T @ pb
                e += rb.sum(0)[:, None] * pr_b[None]
            obj_k.append(objective())
            rounds += 1
            if i > 3:  # sums over a window of 3 iterations, shifted by one
                old, new = sum(obj_k[-4:-1]), sum(obj_k[-3:])
                if abs(old - new) / max(abs(old), 1e-300) < eps_cluster:
                    break
        objective_h.append(obj_k[-1])
        kmeans_rounds.append(rounds)
        # 2. mixture-of-experts ridge correction, all clusters at once
        b1 = n_batches + 1
        a = torch.zeros((k, b1, b1), dtype=dtype, device=dev)
        a[:, 0, 0] = r.sum(0)
        a[:, 0, 1:] = o
        a[:, 1:, 0] = o
        a[:, 1:, 1:] = torch.diag_embed(o + lamb)
        rhs = torch.empty((k, b1, z.shape[1]), dtype=dtype, device=dev)
        rhs[:, 0] = r.T @ z
        for b in range(n_batches):  # loop over batches (few): cells of batch b
            rhs[:, 1 + b] = (r * phi[:, b:b + 1]).T @ z
        w = torch.linalg.solve(a, rhs)
        w[:, 0] = 0.0
        # z_corr_i = z_i - sum_k r_ik w_k[1 + b_i]
        z_corr = z.clone()
        for b in range(n_batches):
            z_corr -= (r * phi[:, b:b + 1]) @ w[:, 1 + b]
        zc = _normalize(z_corr)
        if len(objective_h) > 1:
            prev, cur = objective_h[-2], objective_h[-1]
            if abs(prev - cur) / max(abs(prev), 1e-300) < eps_harmony:
                converged = True
                break
    return {"z": z_corr, "R": r, "objective": objective_h, "n_iter": it, "converged": converged,
            "kmeans_rounds": kmeans_rounds}
