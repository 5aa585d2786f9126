"""Two-sample tests of every gene at once: Wilcoxon rank-sum (tie-corrected) and Welch's t-test.

Arrays in, arrays out. The expression matrix (cells x genes, dense or scipy sparse) is processed in chunks
of genes: each chunk is made dense (n_obs x chunk, float64) on the device, ranked per column with one
``torch.sort`` (average ranks for ties) and reduced with one matrix product against the group indicators,
so that no Python loop runs over genes. The chunk size follows a memory budget.

Definitions (two-sided, normal approximation without continuity correction):

* rank sum ``R1`` of the group among the ``n = n1 + n2`` ranked cells,
  ``U = R1 - n1 (n + 1) / 2``, ``var = n1 n2 (n + 1) / 12 * (1 - sum(t^3 - t) / (n^3 - n))``
  (``t``: sizes of the tie runs), ``z = U / sqrt(var)``, ``p = 2 Phi(-|z|)``; ``log p`` from
  ``log_ndtr`` so that p-values below 1e-308 keep a finite log.
* Welch: ``t = (m1 - m2) / sqrt(v1/n1 + v2/n2)`` with unbiased variances, Welch-Satterthwaite degrees of
  freedom, ``p = 2 T_df(-|t|)``.
* Benjamini-Hochberg q-values computed in log space (``log q`` stays exact where ``q`` underflows).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import ResourceError

# bytes per element of a dense chunk while ranking: values, sorted values, sort indices (int64),
# positions, first/last run index, ranks, masks and temporaries
_RANK_BYTES_PER_ELEMENT = 96
_STATS_BYTES_PER_ELEMENT = 32
DEFAULT_MEMORY_BUDGET = 256 << 20  # 256 MiB


def chunk_size(n_obs: int, n_genes: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
               bytes_per_element: int = _RANK_BYTES_PER_ELEMENT) -> int:
    """Genes per chunk so that one dense chunk and its temporaries fit ``memory_budget`` bytes."""
    per_gene = max(1, n_obs) * bytes_per_element
    if per_gene > memory_budget:
        raise ResourceError(
            f"one gene of {n_obs} cells needs {per_gene / 2**20:.1f} MiB to rank, more than the memory "
            f"budget of {memory_budget / 2**20:.1f} MiB: raise memory_budget")
    return int(max(1, min(n_genes, memory_budget // per_gene)))


def _dense_chunk(X, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Genes ``start:stop`` of ``X`` (cells x genes) as a dense (genes x cells) float64 tensor."""
    if isinstance(X, torch.Tensor):
        return X[:, start:stop].T.to(device=device, dtype=torch.float64).contiguous()
    if sp.issparse(X):
        block = X[:, start:stop].T.toarray()
    else:
        block = np.asarray(X[:, start:stop]).T
    return torch.as_tensor(np.ascontiguousarray(block, dtype=np.float64)).to(device)


def average_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ranks along the last dimension (1-based; tied values share their mean rank).

    ``x``: (g, n) tensor, one row per gene. Returns ``ranks`` (g, n) float64 and ``tie_sum`` (g,) float64,
    the sum of ``t^3 - t`` over the tie runs of each row.
    """
    g, n = x.shape
    if n == 0:
        return x.to(torch.float64), torch.zeros(g, dtype=torch.float64, device=x.device)
    values, order = torch.sort(x, dim=1)
    new_run = torch.ones_like(values, dtype=torch.bool)
    new_run[:, 1:] = values[:, 1:] != values[:, :-1]
    del values
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    pos = torch.arange(n, device=x.device, dtype=torch.float64).expand(g, n)
    first = torch.cummax(torch.where(new_run, pos, zero), dim=1).values
    last = torch.where(run_end, pos, torch.full((), float(n - 1), dtype=torch.float64, device=x.device))
    last = torch.flip(torch.cummin(torch.flip(last, (1,)), dim=1).values, (1,))
    t = last - first + 1.0
    tie_sum = torch.where(run_end, t * t * t - t, zero).sum(1)
    avg = (first + last) * 0.5 + 1.0
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks, tie_sum


def _indicator(masks: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(masks, dtype=np.float64)).to(device)


def group_stats(X, masks: np.ndarray, device: torch.device, *,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict[str, np.ndarray]:
    """Per group (rows of the boolean ``masks``, k x n_obs) and gene: n, sum, sum of squares, count > 0.

    Returns a dict of numpy arrays: ``n`` (k,), ``sum``, ``sumsq``, ``npos`` (k, n_genes) float64.
    """
    n_obs, n_genes = X.shape
    ind = _indicator(masks, device)
    out = {key: np.zeros((ind.shape[0], n_genes)) for key in ("sum", "sumsq", "npos")}
    out["n"] = np.asarray(masks, dtype=np.float64).sum(1)
    if sp.issparse(X):  # sparse (genes x cells) @ dense indicators: no densification
        xt = sp.csr_matrix(X.T)
        crow = torch.as_tensor(xt.indptr.astype(np.int64)).to(device)
        col = torch.as_tensor(xt.indices.astype(np.int64)).to(device)
        data = torch.as_tensor(xt.data.astype(np.float64)).to(device)
        for key, values in (("sum", data), ("sumsq", data * data), ("npos", (data > 0).to(torch.float64))):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                mat = torch.sparse_csr_tensor(crow, col, values, size=xt.shape, check_invariants=False)
                out[key][:] = (mat @ ind.T).T.cpu().numpy()
        return out
    step = chunk_size(n_obs, n_genes, memory_budget=memory_budget, bytes_per_element=_STATS_BYTES_PER_ELEMENT)
    for start in range(0, n_genes, step):
        stop = min(n_genes, start + step)
        x = _dense_chunk(X, start, stop, device)
        out["sum"][:, start:stop] = (x @ ind.T).T.cpu().numpy()
        out["sumsq"][:, start:stop] = ((x * x) @ ind.T).T.cpu().numpy()
        out["npos"][:, start:stop] = ((x > 0).to(torch.float64) @ ind.T).T.cpu().numpy()
    return out


def mean_var(stats: dict[str, np.ndarray], rows=slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, unbiased variance and count of the groups in ``stats`` (rows selects/merges nothing)."""
    n = stats["n"][rows][:, None]
    s, ss = stats["sum"][rows], stats["sumsq"][rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / n
        var = (ss / n - mean * mean) * (n / (n - 1))
    return mean, var, n[:, 0]


def rank_sums(X, in_masks: np.ndarray, out_masks: np.ndarray | None, device: torch.device, *,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank sums of each group for every gene.

    ``in_masks`` (k x n_obs, bool): the groups. ``out_masks``: None ranks every cell together once per
    chunk (one-vs-rest: group ``j`` against all cells outside it); otherwise (k x n_obs) the reference
    cells of each group, ranked together with that group only.
    Returns ``rank_sum`` (k, g), ``tie_sum`` (k, g) (sum of t^3 - t over the ranked cells) and ``n_ranked``
    (k,) the number of ranked cells per group.
    """
    in_masks = np.asarray(in_masks, dtype=bool)
    k = in_masks.shape[0]
    n_obs, n_genes = X.shape
    rank_sum = np.zeros((k, n_genes))
    tie_sum = np.zeros((k, n_genes))
    if out_masks is None:
        n_ranked = np.full(k, float(n_obs))
        ind = _indicator(in_masks, device)
        step = chunk_size(n_obs, n_genes, memory_budget=memory_budget)
        for start in range(0, n_genes, step):
            stop = min(n_genes, start + step)
            ranks, ties = average_ranks(_dense_chunk(X, start, stop, device))
            rank_sum[:, start:stop] = (ranks @ ind.T).T.cpu().numpy()
            tie_sum[:, start:stop] = ties.cpu().numpy()[None, :]
        return rank_sum, tie_sum, n_ranked
    out_masks = np.asarray(out_masks, dtype=bool)
    both = in_masks | out_masks
    n_ranked = both.sum(1).astype(np.float64)
    step = chunk_size(int(both.sum(1).max(initial=1)), n_genes, memory_budget=memory_budget)
    rows = [np.flatnonzero(b) for b in both]
    in_rows = [torch.as_tensor(in_masks[j, r], dtype=torch.float64).to(device) for j, r in enumerate(rows)]
    for start in range(0, n_genes, step):
        stop = min(n_genes, start + step)
        x = _dense_chunk(X, start, stop, device)
        for j in range(k):  # loop over groups (few), every gene of the chunk at once
            ranks, ties = average_ranks(x[:, torch.as_tensor(rows[j], device=device)])
            rank_sum[j, start:stop] = (ranks @ in_rows[j]).cpu().numpy()
            tie_sum[j, start:stop] = ties.cpu().numpy()
    return rank_sum, tie_sum, n_ranked


def wilcoxon_z(rank_sum: np.ndarray, tie_sum: np.ndarray, n1: np.ndarray, n: np.ndarray, *,
               tie_correct: bool = True) -> np.ndarray:
    """z-scores of the rank-sum statistic (k, g) from rank sums, tie sums, group sizes n1 and totals n."""
    n1 = np.asarray(n1, dtype=np.float64)[:, None]
    n = np.asarray(n, dtype=np.float64)[:, None]
    n2 = n - n1
    expected = n1 * (n + 1.0) / 2.0
    var = n1 * n2 * (n + 1.0) / 12.0
    if tie_correct:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = var * (1.0 - tie_sum / (n ** 3 - n))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (rank_sum - expected) / np.sqrt(var)
    return z


def normal_two_sided(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided normal p-values and their natural log (exact in the far tail)."""
    from scipy import special

    a = -np.abs(np.asarray(z, dtype=np.float64))
    logp = np.minimum(special.log_ndtr(a) + math.log(2.0), 0.0)
    p = np.minimum(2.0 * special.ndtr(a), 1.0)
    p = np.where(np.isnan(a), 1.0, p)
    logp = np.where(np.isnan(a), 0.0, logp)
    return p, logp


def welch(mean1, var1, n1, mean2, var2, n2) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t statistic and Welch-Satterthwaite degrees of freedom (arrays broadcast; n as columns)."""
    n1 = np.asarray(n1, dtype=np.float64)
    n2 = np.asarray(n2, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = var1 / n1
        b = var2 / n2
        se2 = a + b
        t = (mean1 - mean2) / np.sqrt(se2)
        df = se2 * se2 / (a * a / (n1 - 1.0) + b * b / (n2 - 1.0))
    return t, df


def t_two_sided(t: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Student-t p-values and their natural log.

    Where ``p`` underflows, ``log p`` comes from the leading term of the incomplete beta function:
    ``sf(t) = I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)`` and
    ``log I_x(a, b) ~ a log x + b log(1 - x) - log a - log B(a, b)`` as ``x -> 0``.
    """
    from scipy import special

    t = np.abs(np.asarray(t, dtype=np.float64))
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = 2.0 * special.stdtr(df, -t)
        logp = np.log(p)
        tiny = (p < 1e-300) & np.isfinite(t) & np.isfinite(df)
        if tiny.any():
            a, b = df[tiny] / 2.0, 0.5
            x = df[tiny] / (df[tiny] + t[tiny] ** 2)
            logp[tiny] = a * np.log(x) + b * np.log1p(-x) - np.log(a) - special.betaln(a, b)
    nan = np.isnan(p)
    p = np.where(nan, 1.0, np.minimum(p, 1.0))
    logp = np.where(nan, 0.0, np.minimum(logp, 0.0))
    return p, logp


def bh_log(logp: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values in natural log, along the last axis (rows independent)."""
    logp = np.atleast_2d(np.asarray(logp, dtype=np.float64))
    m = logp.shape[-1]
    if m == 0:
        return logp.copy()
    order = np.argsort(logp, axis=-1, kind="stable")
    ranked = np.take_along_axis(logp, order, axis=-1)
    adj = ranked + math.log(m) - np.log(np.arange(1, m + 1, dtype=np.float64))
    adj = np.minimum.accumulate(adj[..., ::-1], axis=-1)[..., ::-1]
    adj = np.minimum(adj, 0.0)
    out = np.empty_like(adj)
    np.put_along_axis(out, order, adj, axis=-1)
    return out
