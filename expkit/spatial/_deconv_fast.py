"""The fast deconvolution (in the spirit of FlashDeconv): informative genes, a platform-effect rescaling,
variance-stabilising gene weights, then non-negative least squares of every spot at once with a spatial
graph Laplacian penalty (:func:`expkit.kernels.nnls.nnls_graph`). Linear in spots: only the ``K x K``
Gram matrix of the profiles and the ``N x K`` products with the spots are ever formed."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .._logging import logger
from ..errors import InputError
from ..kernels import nnls as kn
from ..kernels import rctd as kr


def informative_genes(profiles: np.ndarray, bulk: np.ndarray, gene_names, n_genes: int | None):
    """RCTD's bulk gene list (log fold change > 0.5 over the other types, expression > 1.25e-4, seen >= 3
    times); capped at ``n_genes`` by the largest fold change; at least the 10 most type-variable genes."""
    keep = np.char.find(np.asarray(gene_names, dtype=str), "mt-") < 0
    genes = kr.de_genes(profiles, bulk, 0.5, 0.000125, 3, keep)
    if len(genes) < 10:
        lp = np.log(profiles + 1e-9)
        order = np.argsort(-(lp.var(0) * (bulk >= 3) * keep), kind="stable")
        genes = np.sort(order[: min(50, len(order))])
    if n_genes is not None and len(genes) > n_genes:
        eps = 1e-9
        other = (profiles.sum(0, keepdims=True) - profiles) / max(profiles.shape[0] - 1, 1)
        fc = (np.log(profiles + eps) - np.log(other + eps)).max(0)[genes]
        genes = np.sort(genes[np.argsort(-fc, kind="stable")[:n_genes]])
    return genes


def _platform(prof: np.ndarray, bulk_frac: np.ndarray, device) -> np.ndarray:
    """Per-gene factors making the bulk-weighted profile match the pseudo-bulk (RCTD's renormalisation,
    with the bulk weights from a least-squares fit on relative errors)."""
    scale = 1.0 / np.maximum(bulk_frac, 1e-12)
    a = prof * scale[None, :]
    gram = torch.as_tensor(a @ a.T, dtype=torch.float64, device=device)[None]
    rhs = torch.as_tensor(a @ (bulk_frac * scale), dtype=torch.float64, device=device)[None]
    w = kn.qp_nonneg(gram + 1e-10 * torch.eye(prof.shape[0], dtype=torch.float64, device=device), rhs)[0]
    w = w.cpu().numpy()
    avg = w @ prof
    return np.clip(bulk_frac / np.maximum(avg, 1e-300), 0.05, 20.0)


def fast_weights(profiles, sp_counts: sp.csr_matrix, numi, gene_names, adj, *, n_genes, spatial_weight,
                 n_sweeps, device):
    """Proportions (N, K) and a report. ``adj``: scipy sparse spatial adjacency or None."""
    ok = numi > 0
    bulk = np.asarray(sp_counts[ok].sum(0)).ravel()
    genes = informative_genes(profiles, bulk, gene_names, n_genes)
    prof = profiles[:, genes]
    bulk_frac = bulk[genes] / max(float(numi[ok].sum()), 1.0)
    factor = _platform(prof, bulk_frac, device)
    prof = prof * factor[None, :]
    gw = 1.0 / np.maximum(bulk_frac, 1e-9)          # Poisson: variance of a fraction ~ its mean
    dtype = torch.float32 if sp_counts.shape[0] > 200_000 else torch.float64
    a = prof * gw[None, :]
    cross = np.asarray(sp_counts[:, genes] @ a.T) / np.maximum(numi, 1.0)[:, None]
    gram = torch.as_tensor(prof @ a.T, dtype=dtype, device=device)
    cross_t = torch.as_tensor(cross, dtype=dtype, device=device)
    lam = 0.0
    adj_t = None
    if adj is not None and spatial_weight > 0:
        deg = np.asarray(adj.sum(1)).ravel()
        # the data term of a spot has noise ~ 1/N (Poisson, in fractions): the prior weighs more on
        # spots with fewer counts; spatial_weight is the penalty at a median of 1000 counts
        med = float(np.median(numi[ok])) if ok.any() else 1000.0
        lam = (float(spatial_weight) * float(torch.diagonal(gram).mean()) / max(float(deg.mean()), 1.0)
               * 1000.0 / max(med, 1.0))
        adj_t = _csr_tensor(adj, dtype, device)
    w, sweeps = kn.nnls_graph(gram, cross_t, adj_t, lam, n_sweeps=n_sweeps)
    w = w.to(torch.float64).cpu().numpy()
    tot = w.sum(1, keepdims=True)
    prop = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), np.nan)
    prop[~ok] = np.nan
    logger.debug(f"fast deconvolution: {len(genes)} genes, lambda {lam:.3g}, {sweeps} sweeps")
    return prop, {"genes": genes, "lambda": lam, "sweeps": int(sweeps), "weight_sum": tot[:, 0]}


def _csr_tensor(adj, dtype, device):
    a = sp.csr_matrix(adj, dtype=np.float64)
    a = ((a + a.T) > 0).astype(np.float64).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return torch.sparse_csr_tensor(torch.as_tensor(a.indptr, dtype=torch.int64),
                                   torch.as_tensor(a.indices, dtype=torch.int64),
                                   torch.as_tensor(a.data, dtype=dtype), size=a.shape).to(device)


def spatial_graph(adata, graph_key: str | None, n_neighbors: int, device):
    """``obsp[f"{graph_key}.connectivities"]`` when present, else a k-NN graph of ``obsm['spatial']``,
    else None (no spatial penalty)."""
    if graph_key is None:
        return None
    key = f"{graph_key}.connectivities"
    if key in adata.obsp:
        return sp.csr_matrix(adata.obsp[key])
    if "spatial" not in adata.obsm:
        logger.warning("fast deconvolution: no spatial graph and no obsm['spatial']: no spatial penalty")
        return None
    from ..kernels import spatial_graph as sg

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(xy).all():
        raise InputError("obsm['spatial'] has non-finite coordinates")
    k = int(min(n_neighbors, adata.n_obs - 1))
    if k < 1:
        return None
    rows, cols = sg.knn_edges(xy, k, device)[:2]
    rows, cols = np.asarray(rows), np.asarray(cols)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(adata.n_obs, adata.n_obs))
