"""Multinomial logistic regression on standardised expression, trained by mini-batch SGD (CellTypist's model).

Arrays in, arrays out; no AnnData. The data are a sparse cells x genes matrix ``x`` of log1p(CP10k) values.
CellTypist standardises every gene (``(x - mean) / std``, population std, zero std taken as 1) and clips the
standardised values at 10. Because the values are non-negative, the clip only ever bites from above, so
``clip((x - m) / s, max=10) = (min(x, m + 10 s) - m) / s``: the clipped matrix keeps ``x``'s sparsity and
the logits of a linear model are ``z = x_c (W / s) + (b - (m / s) W)``, a sparse-dense product (no n x g
dense matrix is ever needed for prediction).

Training minimises the mean multinomial log-loss plus ``l2 / 2 * ||W||^2`` (the intercept unpenalised; with
``l2 = 1 / (C n)`` this is scikit-learn's ``LogisticRegression(C)`` objective, CellTypist's default) by
mini-batch SGD with Nesterov momentum: the cells are shuffled once (seeded) and cut into equal contiguous
batches of at most ``batch_size`` standardised rows (dense, or on the CPU for sparse data the clipped sparse
rows with the centring applied to the products, see ``_Blocks``), visited in a fresh seeded order every
epoch; each step takes the exact batch gradient ``X_b^T (P - Y) / m + l2 W`` and a step
``lr = lr_scale / L`` with ``L`` the Lipschitz bound ``lambda_max(X^T X / n) / 2 + l2`` estimated by power
iteration, decayed by a cosine schedule to 0 over the run so that the iterates settle at the optimum.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from .device import single_thread

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for a dense standardised copy of the training matrix


def standardise(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and population standard deviation (ddof 0; a zero std is returned as 1)."""
    x = sp.csr_matrix(x)
    n = x.shape[0]
    data = np.asarray(x.data, dtype=np.float64)
    mean = np.bincount(x.indices, weights=data, minlength=x.shape[1]) / max(n, 1)
    sq = np.bincount(x.indices, weights=data * data, minlength=x.shape[1]) / max(n, 1)
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, std


def clip_values(x: sp.csr_matrix, mean: np.ndarray, std: np.ndarray, max_value: float = 10.0) -> sp.csr_matrix:
    """``x`` with every stored value capped at ``mean + max_value * std`` of its gene (the standardised clip)."""
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    cap = mean + max_value * std
    np.minimum(x.data, cap[x.indices], out=x.data)
    return x


def _dense_rows(x: sp.csr_matrix, rows: np.ndarray, mean_t, inv_std_t, device, dtype) -> torch.Tensor:
    block = torch.as_tensor(x[rows].toarray(), dtype=dtype, device=device)
    return (block - mean_t) * inv_std_t


SPARSE_DENSITY = 0.25  # below this share of non-zeros the CPU works on the sparse rows


class _Blocks:
    """The standardised matrix ``S = (x_c - mean) / std`` cut into row blocks of the shuffled ``order``, with the
    two products a step needs: ``mv(k, W) = S_k W`` and ``rmv(k, R) = S_k^T R``.

    Dense mode: one dense copy of ``S`` (rows in ``order``) when it fits ``memory_budget``, else each block
    densified when used. Sparse mode (CPU, density below ``SPARSE_DENSITY``): ``S_k W = x_k (W / std) - (mean /
    std) W`` and ``S_k^T R = (x_k^T R) / std - (mean / std) 1^T R`` on the clipped sparse rows (scipy, float32),
    exact to rounding and cheaper by the density."""

    def __init__(self, x, mean, std, device, dtype, memory_budget, order, m):
        n = x.shape[0]
        self.device, self.dtype, self.x, self.order = device, dtype, x, order
        self.bounds = [(s, min(s + m, n)) for s in range(0, n, m)]
        self.mean_t = torch.as_tensor(mean, dtype=dtype, device=device)
        self.inv_std_t = torch.as_tensor(1.0 / std, dtype=dtype, device=device)
        self.ms_t = self.mean_t * self.inv_std_t
        density = x.nnz / max(n * x.shape[1], 1)
        self.sparse = device.type == "cpu" and density < SPARSE_DENSITY
        self.full = None
        if self.sparse:
            xo = sp.csr_matrix(x[order], dtype=np.float32)
            self.rows = [xo[a:b] for a, b in self.bounds]
            self.cols = [r.T.tocsr() for r in self.rows]
        elif n * x.shape[1] * torch.empty((), dtype=dtype).element_size() <= memory_budget:
            self.full = _dense_rows(x, order, self.mean_t, self.inv_std_t, device, dtype)

    def size(self, k: int) -> int:
        a, b = self.bounds[k]
        return b - a

    def _dense(self, k):
        a, b = self.bounds[k]
        if self.full is not None:
            return self.full[a:b]
        return _dense_rows(self.x, self.order[a:b], self.mean_t, self.inv_std_t, self.device, self.dtype)

    def mv(self, k: int, W: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return self._dense(k) @ W
        z = self.rows[k] @ (W * self.inv_std_t[:, None]).numpy()
        return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(W.dtype) - self.ms_t @ W

    def rmv(self, k: int, R: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return (R.T @ self._dense(k)).T  # (K x m)(m x g): the fast layout for a thin R
        g = torch.from_numpy(np.ascontiguousarray(self.cols[k] @ R.numpy(), dtype=np.float32)).to(R.dtype)
        return g * self.inv_std_t[:, None] - self.ms_t[:, None] * R.sum(0)[None, :]


def _lipschitz(blocks: _Blocks, n: int, g: int, gen: torch.Generator, n_iter: int = 15) -> float:
    """``lambda_max(S^T S / n)`` of the standardised matrix by power iteration over the row blocks."""
    v = torch.randn(g, 1, generator=gen, dtype=torch.float64).to(blocks.device, blocks.dtype)
    v /= v.norm()
    lam = 1.0
    for _ in range(n_iter):
        w = torch.zeros_like(v)
        for k in range(len(blocks.bounds)):  # a handful of row blocks
            w += blocks.rmv(k, blocks.mv(k, v))
        w /= n
        lam = float(w.norm())
        v = w / max(lam, 1e-30)
    return lam


def fit_softmax(x: sp.csr_matrix, y: np.ndarray, n_classes: int, *, mean: np.ndarray, std: np.ndarray,
                l2: float, epochs: int = 30, batch_size: int = 1000, min_steps: int = 300, momentum: float = 0.9,
                lr_scale: float = 2.0, class_weight: np.ndarray | None = None, seed: int = 0,
                device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """Fit ``W`` (genes x classes) and ``b`` (classes) of a multinomial logistic regression.

    ``x``: clipped log1p(CP10k) CSR (see :func:`clip_values`), ``y``: class codes 0..n_classes-1.
    The epochs are raised until the run has at least ``min_steps`` mini-batch steps. ``class_weight``:
    a weight per class multiplying each cell's loss (None: 1). Same seed -> same result on a device.
    Returns ``{"coef", "intercept", "loss", "lr", "n_steps"}`` (numpy float64, loss per epoch).
    """
    device = device or torch.device("cpu")
    with single_thread(device):  # hundreds of small steps: extra CPU threads only spin
        return _fit(x, y, n_classes, mean, std, float(l2), int(epochs), int(batch_size), int(min_steps),
                    float(momentum), float(lr_scale), class_weight, int(seed), device, dtype, memory_budget)


def _fit(x, y, n_classes, mean, std, l2, epochs, batch_size, min_steps, momentum, lr_scale, class_weight,
         seed, device, dtype, memory_budget):
    n, g = x.shape
    gen = torch.Generator().manual_seed(int(seed))
    # cells shuffled once (seeded); batches are contiguous blocks of that order, visited in a fresh random
    # order every epoch: no per-step gather of rows
    order = torch.randperm(n, generator=gen).numpy()
    n_batches = math.ceil(n / min(batch_size, n))
    m = math.ceil(n / n_batches)  # equal batch sizes
    blocks = _Blocks(x, mean, std, device, dtype, memory_budget, order, m)
    n_batches = len(blocks.bounds)
    epochs = max(int(epochs), math.ceil(min_steps / n_batches))
    lr = float(lr_scale) / (0.5 * _lipschitz(blocks, n, g, gen) + float(l2))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64)[order], device=device)
    cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=dtype, device=device)
    W = torch.zeros((g, n_classes), dtype=dtype, device=device)
    b = torch.zeros(n_classes, dtype=dtype, device=device)
    vW, vb = torch.zeros_like(W), torch.zeros_like(b)
    total, step, losses = epochs * n_batches, 0, []
    for _ in range(epochs):  # epochs x batches: a few hundred steps, each one vectorised over its cells
        epoch_loss = 0.0
        for k in torch.randperm(n_batches, generator=gen).tolist():
            a, e = blocks.bounds[k]
            rate = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            Wl, bl = W + momentum * vW, b + momentum * vb  # Nesterov look-ahead
            gW, gb, loss = _gradient(blocks, k, yt[a:e], Wl, bl, cw, float(l2))
            vW.mul_(momentum).add_(gW, alpha=-rate)
            vb.mul_(momentum).add_(gb, alpha=-rate)
            W += vW
            b += vb
            epoch_loss += loss * (e - a)
            step += 1
        losses.append(epoch_loss / n)
    return {"coef": W.double().cpu().numpy(), "intercept": b.double().cpu().numpy(),
            "loss": np.asarray(losses), "lr": lr, "n_steps": step}


def _gradient(blocks, k, yb, W, b, cw, l2):
    z = blocks.mv(k, W) + b
    logp = torch.log_softmax(z, dim=1)
    r = logp.exp()
    r[torch.arange(len(yb), device=yb.device), yb] -= 1.0
    nll = -logp.gather(1, yb[:, None])[:, 0]
    if cw is not None:
        w = cw[yb]
        r *= w[:, None]
        nll = nll * w
    m = len(yb)
    gW = blocks.rmv(k, r) / m + l2 * W
    gb = r.sum(0) / m
    return gW, gb, float(nll.mean()) + 0.5 * l2 * float((W * W).sum())


def decision(x: sp.csr_matrix, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, std: np.ndarray, *,
             device: torch.device | None = None, max_value: float = 10.0) -> np.ndarray:
    """Logits (cells x classes) of log1p(CP10k) rows ``x`` (already on the model's genes, in its order):
    ``clip((x - mean) / std, 10) @ coef + intercept`` as a sparse-dense product, in float64."""
    device = device or torch.device("cpu")
    xc = clip_values(x, mean, std, max_value)
    w_eff = coef / std[:, None]
    offset = intercept - (mean / std) @ coef
    if device.type == "cpu":
        return np.asarray(xc @ w_eff) + offset
    xt = torch.sparse_csr_tensor(torch.as_tensor(xc.indptr, dtype=torch.int64),
                                 torch.as_tensor(xc.indices, dtype=torch.int64),
                                 torch.as_tensor(xc.data, dtype=torch.float64), size=xc.shape).to(device)
    z = torch.sparse.mm(xt, torch.as_tensor(w_eff, dtype=torch.float64, device=device))
    return z.cpu().numpy() + offset


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_features(coef: np.ndarray, top_genes: int) -> np.ndarray:
    """Sorted indices of the union over classes of each class's ``top_genes`` largest ``|coef|`` genes
    (CellTypist's feature selection)."""
    g = coef.shape[0]
    k = int(min(top_genes, g))
    order = np.argsort(-np.abs(coef), axis=0, kind="stable")[:k]  # k x classes
    return np.unique(order.ravel())


def majority_vote(pred: np.ndarray, clusters: np.ndarray, n_classes: int, n_clusters: int,
                  min_prop: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster, the most frequent predicted class (ties: the lowest code) and its share; every cell takes
    its cluster's class, or -1 where the share is below ``min_prop``. Returns ``(labels, share per cell)``."""
    tab = np.bincount(clusters * n_classes + pred, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)
    best = tab.argmax(axis=1)
    share = tab[np.arange(n_clusters), best] / np.maximum(tab.sum(1), 1)
    lab = np.where(share >= min_prop, best, -1)
    return lab[clusters], share[clusters]
