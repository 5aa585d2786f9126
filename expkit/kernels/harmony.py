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

Implementation of step 1 (the hot loop: ~115 rounds x 20 blocks on 7,312 cells):
- each round draws a permutation and writes R in that block order, so a block is a contiguous slice of a
  preallocated buffer; what each block removes from O (its cells' R of the previous round) is summed for
  all blocks by one ``index_add`` at the start of the round. Per block: one matmul and one ``exp`` give
  ``exp(logit)`` (logit = ``2 (Zc_i . Y_k - 1) / sigma`` in ``[-4 / sigma, 0]``; shifted by the row maximum
  only when ``exp`` times the penalty factor could leave the dtype's normal range), then R from the
  gathered penalty rows, and O, ``sum_i R_ki`` updated by one small matmul. ``E_kb = Pr_b sum_b' O_kb'``
  is never stored.
- the objective needs no pass over R: with ``log R_ki = logit_ki - shift_i + pen_ki - log s_i`` (``s_i``
  the row normaliser, ``pen`` the log penalty the block saw) the k-means error cancels against the logit
  part of the entropy, leaving ``sigma sum_i (sum_k R_ki pen_ki - shift_i - log s_i)`` plus the cross term;
  it is accumulated in float64.
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
    diff = torch.empty_like(zc)
    for _ in range(1, k):  # k-means++ (loop over clusters, each step vectorised over cells)
        probs = (d2 / d2.sum().clamp_min(1e-300)).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(zc[nxt])
        torch.minimum(d2, torch.sub(zc, zc[nxt], out=diff).square_().sum(1), out=d2)
    y = torch.stack(centers)
    # argmin_k ||zc_i - y_k||^2 = argmax_k (zc_i . y_k - ||y_k||^2 / 2): one matmul
    # [y, -||y||^2 / 2] [zc, 1]^T (k x n: the faster layout of this product)
    zc1t = torch.cat([zc, torch.ones_like(zc[:, :1])], dim=1).T
    prod = torch.empty((k, n), dtype=zc.dtype, device=dev)
    best = torch.empty(n, dtype=zc.dtype, device=dev)
    lab = torch.empty(n, dtype=torch.long, device=dev)
    for _ in range(n_iter):
        y1 = torch.cat([y, -0.5 * (y * y).sum(1, keepdim=True)], dim=1)
        torch.max(torch.mm(y1, zc1t, out=prod), 0, out=(best, lab))
        sums = torch.zeros_like(y).index_add_(0, lab, zc)
        cnt = torch.bincount(lab, minlength=k).to(zc.dtype)
        empty = cnt == 0
        new = sums / cnt.clamp_min(1.0)[:, None]
        y = torch.where(empty[:, None], y, new)
    return y


def harmony(z: torch.Tensor, batch: torch.Tensor, n_batches: int, *, theta: torch.Tensor | float = 2.0,
            sigma: float = 0.1, lamb: float = 1.0, n_clusters: int | None = None, max_iter: int = 10,
            max_iter_kmeans: int = 20, eps_cluster: float = 1e-5, eps_harmony: float = 1e-4,
            block_size: float = 0.05, generator: torch.Generator | None = None) -> dict:
    """Run Harmony on ``z`` (N x d tensor on its device) with integer batch codes ``batch`` (N,).

    Computes in ``z.dtype``; the objective is accumulated in float64 whatever the dtype.
    Returns ``{"z": corrected N x d, "R": N x K soft memberships, "objective": list (per iteration),
    "n_iter": int, "converged": bool, "kmeans_rounds": list}``.
    """
    dev, dtype = z.device, z.dtype
    f64 = torch.float64
    n, _ = z.shape
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    k = int(n_clusters) if n_clusters else int(min(round(n / 30.0), 100))
    k = max(1, min(k, n))
    sigma = float(sigma)
    batch = batch.to(dev).long()
    phi = torch.nn.functional.one_hot(batch, n_batches).to(dtype)  # N x B
    pr_b = phi.sum(0) / n
    theta = torch.as_tensor(theta, dtype=dtype, device=dev).expand(n_batches).clone()
    theta_col = theta[:, None]  # B x 1

    zc = _normalize(z)
    y = _normalize(kmeans_cosine(zc, k, generator))

    # Memberships are kept cell-major (N x K) and O transposed (B x K); E_bk = Pr_b sum_b' O_b'k because
    # the rows of O^T sum to sum_i R_ki, so E is never stored.
    r = torch.softmax((zc @ y.T - 1.0) * (2.0 / sigma), dim=1)
    ot = phi.T @ r

    def cross_term(ot_: torch.Tensor) -> torch.Tensor:  # sigma sum_kb theta_b O_kb log((O_kb + 1) / (E_kb + 1))
        ot_ = ot_.to(f64)
        e_ = ot_.sum(0, keepdim=True) * pr_b.to(f64)[:, None]
        return sigma * (theta_col.to(f64) * ot_ * torch.log((ot_ + 1.0) / (e_ + 1.0))).sum()

    dist0 = 2.0 - 2.0 * (zc @ y.T)
    objective_h = [float((r * dist0).sum(dtype=f64) + sigma * torch.xlogy(r, r).sum(dtype=f64) + cross_term(ot))]
    del dist0
    kmeans_rounds: list[int] = []

    # Blocks of a round: a random permutation cut into n_blocks consecutive pieces. R is written in that
    # block order, so a block is a contiguous slice of a preallocated buffer (views made once); ``pos`` is the
    # row order of the R of the previous round (row j holds cell pos[j]). What a block removes from O (its
    # cells' previous R) is summed for all blocks at once at the start of the round (one index_add over R),
    # so R is never gathered within a round and nothing of N rows is allocated per block.
    n_blocks = int(math.ceil(1.0 / block_size))
    sizes = [len(c) for c in torch.tensor_split(torch.arange(n), n_blocks)]
    bounds = [0]
    for sz in sizes:
        bounds.append(bounds[-1] + sz)
    spans = [(bounds[j], bounds[j + 1]) for j in range(n_blocks)]
    block_id = torch.repeat_interleave(torch.arange(n_blocks), torch.tensor(sizes)).to(dev)
    arange_n = torch.arange(n)
    rank_of = torch.empty(n, dtype=torch.long)  # rank_of[cell] = its row in order pos
    key_of = torch.empty(n, dtype=torch.long, device=dev)  # key_of[cell] = its (block, batch) in this round
    pos = arange_n
    r_bufs = [r, torch.empty_like(r)]  # R of the previous round / of this round
    r_views = [[buf[a:b] for a, b in spans] for buf in r_bufs]
    ri = 0
    # logit_ki = -||Zc_i - Y_k||^2 / sigma lies in [-4 / sigma, 0] and the penalty factor
    # ((E + 1) / (O + 1))^theta in [(N + 1)^-theta, (N + 1)^theta]: when their product cannot leave the normal
    # range of the dtype, exp(logit) is used as it is, else exp(logit - max_k logit) (one more pass per round)
    log_tiny = -math.log(torch.finfo(dtype).tiny)
    span = 4.0 / sigma + float(theta.abs().max()) * math.log(n + 1.0)
    row_shift = span > log_tiny - 8.0
    ex_blk = torch.empty((max(sizes), k), dtype=dtype, device=dev)  # exp(logits) of one block
    ex_views = [ex_blk[:b - a] for a, b in spans]
    xmax = torch.zeros((n, 1), dtype=dtype, device=dev)  # the row shift (0 unless row_shift)
    xmax_views = [xmax[a:b] for a, b in spans]
    s_all = torch.empty((n, 1), dtype=dtype, device=dev)  # the row normalisers of the round
    s_views = [s_all[a:b] for a, b in spans]
    d = zc.shape[1]
    # [Zc, 1] so that one matmul with [2 Y^T / sigma; -2 / sigma] gives the logits
    zc_aug = torch.ones((n, d + 1), dtype=dtype, device=dev)
    zc_aug[:, :d] = zc
    zc_bufs = [torch.empty((n, d + 1), dtype=dtype, device=dev) for _ in range(2)]
    zc_views = [[buf[a:b] for a, b in spans] for buf in zc_bufs]
    zi = 0
    zc_old = zc_aug  # Zc in order pos
    y_aug = torch.full((d + 1, k), -2.0 / sigma, dtype=dtype, device=dev)
    # [Phi^T; 1] in block order: one matmul gives a block's part of O^T and of its column sums (sum_i R_ki)
    phit_cells = torch.cat([phi.T, torch.ones((1, n), dtype=dtype, device=dev)])
    phit_aug = torch.empty_like(phit_cells)
    phit_views = [phit_aug[:, a:b] for a, b in spans]
    batch_p = torch.empty_like(batch)  # batch codes in block order
    bv = [batch_p[a:b] for a, b in spans]
    # [O^T + 1; sum_i R_ki]: the +1 of (E + 1) / (O + 1) is stored, E = Pr_b sum_i R_ki
    o_aug = torch.cat([ot + 1.0, ot.sum(0, keepdim=True)])
    o1, csum = o_aug[:n_batches], o_aug[n_batches:]
    ratio_buf = torch.empty((n_blocks, n_batches, k), dtype=dtype, device=dev)  # (E + 1) / (O + 1) per block
    ratio_views = list(ratio_buf)
    ob_buf = torch.empty((n_blocks, n_batches + 1, k), dtype=dtype, device=dev)  # a block's new part of O
    ob_views = list(ob_buf)
    old_buf = torch.empty((n_blocks, n_batches + 1, k), dtype=dtype, device=dev)  # its previous part
    old_views = list(old_buf)
    one = torch.ones((), dtype=dtype, device=dev)
    pr_col = pr_b[:, None]
    same_theta = bool((theta == theta[0]).all())
    theta_exp = float(theta[0]) if same_theta else theta_col
    z_corr = z.clone()
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        # 1. clustering with diversity penalty
        obj_k: list[float] = []
        rounds = 0
        for i in range(max_iter_kmeans):
            r_old = r_bufs[ri]
            # Y_k ∝ sum_i R_ki Zc_i (held as d x K) from the previous R
            yt = zc_old[:, :d].T @ r_old
            torch.div(yt, yt.norm(dim=0, keepdim=True).clamp_min(1e-12), out=y_aug[:d]).mul_(2.0 / sigma)
            order = torch.randperm(n, generator=generator)
            order_d = order.to(dev)
            # each block's previous part of O: sum of the previous R of its cells, per batch
            key_of[order_d] = block_id * (n_batches + 1) + batch[order_d]
            old_buf.zero_()
            old_buf.view(-1, k).index_add_(0, key_of[pos.to(dev)], r_old)
            torch.sum(old_buf[:, :n_batches], 1, out=old_buf[:, n_batches])
            ri = 1 - ri
            rv = r_views[ri]
            zi = 1 - zi
            zc_old = torch.index_select(zc_aug, 0, order_d, out=zc_bufs[zi])
            zv = zc_views[zi]
            torch.index_select(phit_cells, 1, order_d, out=phit_aug)
            torch.index_select(batch, 0, order_d, out=batch_p)
            pos = order
            for bi in range(n_blocks):
                rb, pbt, ob, exb = rv[bi], phit_views[bi], ob_views[bi], ex_views[bi]
                # ex = exp(logit - shift), logit = 2 (Zc_i . Y_k - 1) / sigma; shift = 0 where no row can
                # underflow (see above), else the row maximum
                torch.mm(zv[bi], y_aug, out=exb)
                if row_shift:
                    xb = xmax_views[bi]
                    torch.amax(exb, 1, keepdim=True, out=xb)
                    exb.sub_(xb)
                exb.exp_()
                o_aug.sub_(old_views[bi])  # O, sum_i R_ki without this block
                ratio = torch.addmm(one, pr_col, csum, out=ratio_views[bi]).div_(o1)  # (E + 1) / (O + 1)
                f = ratio.pow(theta_exp)  # B x K penalty factors
                # R_ki = ex_ki f_(b_i)k / s_i with s_i = sum_k ex_ki f_(b_i)k, written in place
                sb = s_views[bi]
                torch.index_select(f, 0, bv[bi], out=rb).mul_(exb)
                torch.sum(rb, 1, keepdim=True, out=sb)
                rb.mul_(torch.reciprocal(sb))
                torch.mm(pbt, rb, out=ob)
                o_aug.add_(ob)
            # The objective without another pass over R: log R_ki = logit_ki - shift_i + pen_ki - log s_i
            # (pen_ki = theta_b log((E_kb + 1) / (O_kb + 1)) with the O, E its block saw, logit_ki =
            # -||Zc_i - Y_k||^2 / sigma), so the k-means error cancels against the logit part of the entropy:
            # sum_ki R_ki ||Zc_i - Y_k||^2 + sigma sum_ki R_ki log R_ki
            #   = sigma sum_i (sum_k R_ki pen_ki - shift_i - log s_i).
            pen_part = (theta_col.to(f64) * torch.log(ratio_buf.to(f64)) * ob_buf[:, :n_batches].to(f64)).sum()
            max_part = xmax.sum(dtype=f64) if row_shift else 0.0
            ot = o1 - 1.0
            obj = sigma * (pen_part - max_part - torch.log(s_all).sum(dtype=f64)) + cross_term(ot)
            obj_k.append(float(obj))
            rounds += 1
            if i > 3:  # sums over a window of 3 iterations, shifted by one
                old, new = sum(obj_k[-4:-1]), sum(obj_k[-3:])
                if abs(old - new) / max(abs(old), 1e-300) < eps_cluster:
                    break
        objective_h.append(obj_k[-1])
        kmeans_rounds.append(rounds)
        rank_of[pos] = arange_n
        torch.index_select(r_bufs[ri], 0, rank_of.to(dev), out=r_bufs[1 - ri])  # back to cell order
        ri = 1 - ri
        r = r_bufs[ri]
        pos = arange_n
        zc_old = zc_aug
        # 2. mixture-of-experts ridge correction, all clusters at once
        o = ot.T
        b1 = n_batches + 1
        lhs = torch.zeros((k, b1, b1), dtype=dtype, device=dev)
        lhs[:, 0, 0] = r.sum(0)
        lhs[:, 0, 1:] = o
        lhs[:, 1:, 0] = o
        lhs[:, 1:, 1:] = torch.diag_embed(o + lamb)
        rhs = torch.empty((k, b1, z.shape[1]), dtype=dtype, device=dev)
        rhs[:, 0] = r.T @ z
        for bb in range(n_batches):  # loop over batches (few), N x d temporaries: R^T (Z on the cells of bb)
            rhs[:, 1 + bb] = r.T @ (z * phi[:, bb:bb + 1])
        w = torch.linalg.solve(lhs, rhs)
        # z_corr_i = z_i - sum_k r_ik w_k[1 + b_i] (the intercept row is kept)
        z_corr = z.clone()
        for bb in range(n_batches):
            z_corr -= (r @ w[:, 1 + bb]).mul_(phi[:, bb:bb + 1])
        zc = _normalize(z_corr)
        zc_aug[:, :d] = zc
        if len(objective_h) > 1:
            prev, cur = objective_h[-2], objective_h[-1]
            if abs(prev - cur) / max(abs(prev), 1e-300) < eps_harmony:
                converged = True
                break
    return {"z": z_corr, "R": r, "objective": objective_h, "n_iter": it, "converged": converged,
            "kmeans_rounds": kmeans_rounds}
