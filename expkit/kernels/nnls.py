"""Batched non-negative quadratic programs and the spatially regularised NNLS of the fast deconvolution.

``qp_nonneg``: many small problems ``min 0.5 x'Dx - b'x, x >= 0`` (``D`` positive definite) solved at once by
block principal pivoting (Judice & Pires 1994): the free set is solved exactly by batched linear solves,
every infeasible index flips between the free and the bound set, and after a few rounds the single
infeasible index of largest number flips (Murty's rule, finite termination). Exact up to round-off.

``nnls_graph``: ``min_W ||X - W B||^2 + lam * tr(W' L W)`` over ``W >= 0`` for ``n`` spots at once, ``L`` the
Laplacian of a sparse spatial graph: block coordinate descent over the types, all spots at once, the
graph term a sparse product per sweep.
"""
from __future__ import annotations

import torch


def _solve_free(d: torch.Tensor, b: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """x with ``x[~free] = 0`` and ``D[free, free] x[free] = b[free]``, batched."""
    f = free.to(d.dtype)
    m = d * f[:, :, None] * f[:, None, :] + torch.diag_embed(1.0 - f)
    chol, _ = torch.linalg.cholesky_ex(m)
    return torch.cholesky_solve((b * f).unsqueeze(-1), chol).squeeze(-1)


def qp_nonneg(d: torch.Tensor, b: torch.Tensor, max_iter: int = 100, full_rounds: int = 8,
              tol: float = 1e-12, free0: torch.Tensor | None = None) -> torch.Tensor:
    """Solve ``min 0.5 x'D x - b'x`` subject to ``x >= 0`` for a batch: ``d`` (B, K, K), ``b`` (B, K).
    ``free0`` (B, K) bool: a guess of the solution's support (e.g. the previous solution's ``x > 0`` in a
    sequence of similar problems) to start the pivoting from; the solution is the same, found in fewer rounds."""
    n, k = b.shape
    if free0 is None:
        free = torch.ones((n, k), dtype=torch.bool, device=b.device)
    else:
        free = free0.to(device=b.device, dtype=torch.bool).clone()
    x = _solve_free(d, b, free)
    scale = b.abs().amax(1, keepdim=True).clamp_min(1e-300)
    todo = torch.arange(n, device=b.device)
    out = x.clone()
    for it in range(max_iter):
        xs, fr = x[todo], free[todo]
        mu = torch.einsum("bkl,bl->bk", d[todo], xs) - b[todo]
        bad = (fr & (xs < -tol * scale[todo])) | (~fr & (mu < -tol * scale[todo]))
        done = ~bad.any(1)
        out[todo[done]] = xs[done].clamp_min(0.0)
        if bool(done.all()):
            return out
        keep = ~done
        todo, fr, bad = todo[keep], fr[keep], bad[keep]
        if it >= full_rounds:                     # Murty: flip only the last infeasible index
            last = k - 1 - torch.argmax(bad.flip(1).to(torch.int8), dim=1)
            bad = torch.zeros_like(bad).scatter_(1, last[:, None], True)
        fr = fr ^ bad
        free[todo] = fr
        x[todo] = _solve_free(d[todo], b[todo], fr)
    out[todo] = x[todo].clamp_min(0.0)
    return out


def nnls_graph(gram: torch.Tensor, cross: torch.Tensor, adj=None, lam: float = 0.0, n_sweeps: int = 100,
               tol: float = 1e-4, w0: torch.Tensor | None = None):
    """``min_W sum_i (0.5 w_i' G w_i - c_i' w_i) + lam/2 sum_(i,j in E) ||w_i - w_j||^2`` over ``W >= 0``.

    ``gram`` (K, K) is ``A A'`` of the (gene-reduced) profiles, ``cross`` (N, K) the products ``b_i A'``
    of the spots, ``adj`` a sparse symmetric (N, N) torch adjacency (CSR) or None. Block coordinate
    descent over the K types (FlashDeconv's scheme): type ``k``'s column for all spots at once,
    ``w_k <- max(0, (c_k - W g_k + G_kk w_k + lam * A w_k) / (G_kk + lam * deg))`` (one Jacobi step of the
    graph part, convergent since the diagonal dominates). Stops when the largest change of a sweep is
    below ``tol`` times the largest weight. Returns ``(W, sweeps run)``.
    """
    n, k = cross.shape
    c_t = cross.T.contiguous()                                  # (K, N): one contiguous row per type
    w_t = torch.zeros_like(c_t) if w0 is None else w0.T.contiguous().clone()
    deg = None
    if adj is not None and lam > 0:
        ones = torch.ones((n, 1), dtype=cross.dtype, device=cross.device)
        deg = (adj @ ones)[:, 0]
    diag = torch.diagonal(gram)
    sweeps = 0
    for sweeps in range(1, n_sweeps + 1):
        change = torch.zeros((), dtype=cross.dtype, device=cross.device)
        for j in range(k):
            r = c_t[j] - gram[j] @ w_t + diag[j] * w_t[j]
            if deg is None:
                new = (r / diag[j]).clamp_min(0.0)
            else:
                nb = (adj @ w_t[j][:, None])[:, 0]
                new = ((r + lam * nb) / (diag[j] + lam * deg)).clamp_min(0.0)
            change = torch.maximum(change, (new - w_t[j]).abs().max())
            w_t[j] = new
        if float(change) <= tol * float(w_t.max().clamp_min(1e-30)):
            break
    return w_t.T.contiguous(), sweeps
