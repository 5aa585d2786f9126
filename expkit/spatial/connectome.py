"""Spatial transcriptome + connectome (SpaCon): connectivity matrices, the joint embedding and its clustering.

``add_connectivity`` stores a spot x spot connectivity matrix (e.g. functional connectivity from wide-field
calcium imaging co-registered to the section) in ``obsp``; ``spatial_connectome_embed`` trains SpaCon's
two-graph attention autoencoder (:mod:`expkit.kernels.spacon`) and writes the spatial and connection features;
``spatial_connectome_cluster`` clusters their ``alpha``-weighted fusion with Leiden.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels import spacon as K
from ..kernels import spatial_graph as _sg
from ..kernels.device import resolve_device
from ..kernels.linalg import pca, scale_sparse

__all__ = ["add_connectivity", "spatial_connectome_embed", "spatial_connectome_cluster"]


def _sample(adata) -> str | None:
    return str(adata.obs["sample"].iloc[0]) if "sample" in adata.obs and adata.n_obs else None


def _where(adata) -> str:
    s = _sample(adata)
    return f"sample {s!r}" if s else "the AnnData"


# --------------------------------------------------------------------------------------------
# add_connectivity
# --------------------------------------------------------------------------------------------
def _as_matrix(adata, matrix):
    """A square matrix over the obs (a DataFrame is aligned to ``obs_names`` by its index and columns)."""
    n = adata.n_obs
    if isinstance(matrix, pd.DataFrame):
        missing = adata.obs_names.difference(matrix.index).union(adata.obs_names.difference(matrix.columns))
        if len(missing):
            raise InputError(f"add_connectivity, {_where(adata)}: the connectivity table lacks "
                             f"{len(missing)} obs, e.g. {list(missing[:3])}")
        matrix = matrix.loc[adata.obs_names, adata.obs_names].to_numpy()
    m = sp.csr_matrix(matrix, dtype=np.float64) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape != (n, n):
        raise InputError(f"add_connectivity, {_where(adata)}: the matrix must be n_obs x n_obs = {n} x {n}, "
                         f"not {'x'.join(map(str, m.shape))}")
    values = m.data if sp.issparse(m) else m
    if not np.isfinite(values).all():
        raise InputError(f"add_connectivity, {_where(adata)}: the matrix has NaN or infinite values")
    return m


def _threshold(m, threshold: float | None) -> sp.csr_matrix:
    """Entries above ``threshold`` (None: every non-zero), diagonal dropped, as float32 CSR."""
    if sp.issparse(m):
        m = m.tocoo()
        r, c, v = m.row, m.col, m.data
    else:
        keep = m > threshold if threshold is not None else m != 0
        r, c = np.nonzero(keep)
        v = m[r, c]
    keep = (r != c) & (v > threshold if threshold is not None else v != 0)
    n = m.shape[0]
    out = sp.csr_matrix((v[keep].astype(np.float32), (r[keep], c[keep])), shape=(n, n))
    out.sum_duplicates()
    out.sort_indices()
    return out


def add_connectivity(adata, *, matrix, key: str = "fc", threshold: float | None = None) -> dict:
    """Store a spot x spot connectivity ``matrix`` (dense, scipy sparse, or a DataFrame indexed and
    columned by ``obs_names``) as ``obsp[key]``: float32 CSR of the entries above ``threshold`` (None: all
    non-zero entries), without the diagonal. Records ``uns[key] = {"params", "version", "n_edges",
    "symmetric"}``; returns ``{"n_edges", "symmetric", "mean_degree"}``.
    """
    if not isinstance(key, str) or not key:
        raise InputError(f"add_connectivity: key must be a non-empty string, not {key!r}")
    if threshold is not None and not np.isfinite(float(threshold)):
        raise InputError(f"add_connectivity, {_where(adata)}: threshold must be a finite number or None")
    m = _as_matrix(adata, matrix)
    out = _threshold(m, None if threshold is None else float(threshold))
    symmetric = bool(abs(out - out.T).sum() <= 1e-6 * max(1.0, abs(out).sum()))
    adata.obsp[key] = out
    adata.uns[key] = {"params": {"key": key, "threshold": "none" if threshold is None else float(threshold)},
                      "version": __version__, "n_edges": int(out.nnz), "symmetric": symmetric}
    deg = out.nnz / max(1, adata.n_obs)
    logger.info("add_connectivity %s: %d connections (mean degree %.1f)", key, out.nnz, deg)
    return {"n_edges": int(out.nnz), "symmetric": symmetric, "mean_degree": float(deg)}


# --------------------------------------------------------------------------------------------
# spatial_connectome_embed
# --------------------------------------------------------------------------------------------
def _features(adata, use_rep, layer, n_pcs, n_top_genes, seed, device) -> np.ndarray:
    """``obsm[use_rep]``, or a PCA of the ``n_top_genes`` most variable genes of the log-normalised
    ``layers[layer]`` (counts scaled to the median total, log1p, standardised, clipped at 10); z-scored."""
    if use_rep is not None:
        if use_rep not in adata.obsm:
            raise KeyNotFoundError(f"{_where(adata)}: obsm[{use_rep!r}] not found; available: {list(adata.obsm)}")
        x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    else:
        from .domains import median_log1p

        if layer is not None and layer not in adata.layers:
            raise KeyNotFoundError(f"{_where(adata)}: layer {layer!r} not found; available: {list(adata.layers)}")
        x = median_log1p(adata.layers[layer] if layer is not None else adata.X)
        var = np.asarray(x.power(2).mean(0)).ravel() - np.asarray(x.mean(0)).ravel() ** 2
        keep = np.sort(np.argsort(-var, kind="stable")[: min(int(n_top_genes), int((var > 0).sum()))])
        d, _, _, _ = scale_sparse(x[:, keep], max_value=10.0)
        k = int(min(n_pcs, d.shape[0] - 1, d.shape[1]))
        if k < 1:
            raise InputError(f"{_where(adata)}: too few spots or variable genes for a PCA")
        x = pca(d, k, solver="randomized", seed=seed, device=device)["scores"]
    if x.ndim != 2 or x.shape[0] != adata.n_obs or not np.isfinite(x).all():
        raise InputError(f"{_where(adata)}: the input features must be finite, n_obs rows")
    sd = x.std(0)
    return ((x - x.mean(0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _spatial_graph(adata, k_cutoff, radius, device) -> sp.csr_matrix:
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"{_where(adata)}: obsm['spatial'] (coordinates) not found")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] not in (2, 3) or not np.isfinite(xy).all():
        raise InputError(f"{_where(adata)}: obsm['spatial'] must hold finite 2-D or 3-D coordinates")
    if radius is not None:
        r, c, _ = _sg.radius_edges(xy, float(radius), device)
    else:
        r, c, _ = _sg.knn_edges(xy, int(k_cutoff), device)
    n = adata.n_obs
    a = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float32).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def _connection_graph(adata, key, threshold) -> sp.csr_matrix:
    if key not in adata.obsp:
        raise KeyNotFoundError(f"{_where(adata)}: obsp[{key!r}] not found (run add_connectivity with "
                               f"key={key!r}); obsp keys: {list(adata.obsp)}")
    a = _threshold(sp.csr_matrix(adata.obsp[key], dtype=np.float64), threshold)
    a = ((a + a.T) > 0).astype(np.float32).tocsr()
    if a.nnz == 0:
        raise InputError(f"{_where(adata)}: no connection in obsp[{key!r}] exceeds threshold {threshold}")
    return a


def _check_args(fanouts, hidden, batch_size, epochs, k_cutoff):
    fan = [int(f) for f in fanouts]
    if not fan or any(f == 0 or f < -1 for f in fan):
        raise InputError(f"fanouts must be positive integers (or -1 for all neighbours), not {fanouts!r}")
    hid = [int(h) for h in hidden]
    if len(hid) != 3 or min(hid) < 1:
        raise InputError(f"hidden must be three positive layer widths, not {hidden!r}")
    if int(batch_size) < 1 or int(epochs) < 1 or int(k_cutoff) < 1:
        raise InputError("batch_size, epochs and k_cutoff must be positive integers")
    return fan, hid


def spatial_connectome_embed(adata, *, connectivity_key: str = "fc", threshold: float | None = 0.3,
                             k_cutoff: int = 15, radius: float | None = None, use_rep: str | None = None,
                             layer: str | None = "counts", n_pcs: int = 50,
                             n_top_genes: int = 2000, hidden=(128, 64, 32),
                             fanouts=(20, 10, 10), batch_size: int = 64, epochs: int = 10, lr: float = 1e-3,
                             weight_decay: float = 1e-4, seed: int | None = None, use_gpu: bool = False,
                             max_memory: int | None = None, key_added: str = "spacon") -> dict:
    """SpaCon's joint embedding of expression, spatial graph and connection graph (one sample).

    Inputs: ``obsm[use_rep]`` or (None) a PCA with ``n_pcs`` components of the ``n_top_genes`` most
    variable genes of the log-normalised ``layers[layer]`` (None: X), z-scored; the spatial graph: ``k_cutoff`` nearest neighbours of
    ``obsm['spatial']`` (2-D or 3-D; or all within ``radius``), symmetrised; the connection graph: the
    entries of ``obsp[connectivity_key]`` above ``threshold``, symmetrised. Model and training:
    :mod:`expkit.kernels.spacon` (attention layers of widths ``hidden``, neighbour sampling with
    ``fanouts`` per hop over the connection graph, ``batch_size`` seed spots, ``epochs`` epochs of Adam).
    A run whose memory estimate exceeds the free memory of the device (or ``max_memory`` bytes) is refused
    with :class:`~expkit.errors.ResourceError` before it starts.

    Writes ``obsm[f"{key_added}.spa"]``, ``obsm[f"{key_added}.con"]`` (float32, n x hidden[-1]) and
    ``uns[key_added] = {"params", "version", "losses", "n_spatial_edges", "n_connection_edges"}``.
    Returns ``{"losses", "seconds", "n_spatial_edges", "n_connection_edges", "memory_estimate"}``.
    """
    t0 = time.perf_counter()
    seed = settings.seed if seed is None else int(seed)
    fan, hid = _check_args(fanouts, hidden, batch_size, epochs, k_cutoff)
    device = resolve_device(use_gpu)
    con = _connection_graph(adata, connectivity_key, None if threshold is None else float(threshold))
    spa = _spatial_graph(adata, k_cutoff, radius, device)
    n = adata.n_obs
    n_in = adata.obsm[use_rep].shape[1] if use_rep is not None and use_rep in adata.obsm else int(n_pcs)
    b_nodes = min(n, int(batch_size) * int(np.prod([max(f, 1) for f in fan]) if -1 not in fan else n))
    b_edges = min(con.nnz + n, b_nodes * max(fan)) if -1 not in fan else con.nnz + n
    need = K.estimate_memory(n, n_in, hid, spa.nnz, con.nnz, b_nodes, b_edges)
    K.check_memory(need, device, max_memory, f"spatial_connectome_embed on {_where(adata)}")
    x = _features(adata, use_rep, layer, n_pcs, n_top_genes, seed, device)
    net, losses = K.train_spacon(x, spa, con, hidden=hid, fanouts=fan, batch_size=int(batch_size),
                                 epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay), seed=seed,
                                 device=device, label=f"spacon {_sample(adata) or ''}".strip())
    f_spa, f_con, _ = K.infer(net, x, spa, con, device)
    adata.obsm[f"{key_added}.spa"] = f_spa.astype(np.float32)
    adata.obsm[f"{key_added}.con"] = f_con.astype(np.float32)
    params = dict(connectivity_key=connectivity_key, threshold="none" if threshold is None else float(threshold),
                  k_cutoff=int(k_cutoff), radius="none" if radius is None else float(radius),
                  use_rep=use_rep or "pca", layer=layer or "X", n_pcs=int(x.shape[1]), n_top_genes=int(n_top_genes), hidden=hid, fanouts=fan,
                  batch_size=int(batch_size), epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay),
                  seed=seed, use_gpu=bool(use_gpu))
    adata.uns[key_added] = {"params": params, "version": __version__, "losses": [float(v) for v in losses],
                            "n_spatial_edges": int(spa.nnz), "n_connection_edges": int(con.nnz)}
    secs = time.perf_counter() - t0
    logger.info("spatial_connectome_embed %s: %d spots, %d spatial / %d connection edges, %.1f s",
                _where(adata), n, spa.nnz, con.nnz, secs)
    return {"losses": list(losses), "seconds": secs, "n_spatial_edges": int(spa.nnz),
            "n_connection_edges": int(con.nnz), "memory_estimate": int(need)}


# --------------------------------------------------------------------------------------------
# spatial_connectome_cluster
# --------------------------------------------------------------------------------------------
def spatial_connectome_cluster(adata, *, alpha: float = 1.0, resolution: float = 0.6, n_neighbors: int = 40,
                               embedding_key: str = "spacon", seed: int | None = None, use_gpu: bool = False,
                               key_added: str = "spacon") -> dict:
    """Leiden clusters of SpaCon's fused features ``w z(con) + (1 - w) z(spa)``.

    ``w = (exp(-4 alpha) - 1) / (exp(-4) - 1)``: ``alpha=0`` uses the spatial features only (local
    expression domains), ``alpha=1`` the connection features only (spots sharing connections, however far
    apart); z: per-column z-scores of ``obsm[f"{embedding_key}.spa"]`` and ``.con``. The kNN graph
    (``n_neighbors``, :func:`expkit.tl.knn`) and Leiden (``resolution``, :func:`expkit.tl.leiden`) run on the
    fused features. Writes ``obs[key_added]`` (categorical), ``obsm[f"{key_added}.fused"]`` and the clustering
    parameters (under ``uns[key_added]["cluster"]`` when ``key_added == embedding_key``, else
    ``uns[key_added]``). Returns ``{"n_clusters", "weight"}``.
    """
    import anndata as ad

    from ..tl import knn, leiden

    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], not {alpha}")
    keys = [f"{embedding_key}.spa", f"{embedding_key}.con"]
    missing = [k for k in keys if k not in adata.obsm]
    if missing:
        raise KeyNotFoundError(f"{_where(adata)}: obsm {missing} not found: run spatial_connectome_embed "
                               f"with key_added={embedding_key!r} first")
    seed = settings.seed if seed is None else int(seed)
    fused = K.fuse(adata.obsm[keys[0]], adata.obsm[keys[1]], float(alpha))
    tmp = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    tmp.obsm["fused"] = fused
    knn(tmp, n_neighbors=int(min(n_neighbors, adata.n_obs)), use_rep="fused", use_gpu=use_gpu)
    res = leiden(tmp, resolution=float(resolution), seed=seed)
    adata.obs[key_added] = tmp.obs["leiden"].to_numpy()
    adata.obs[key_added] = adata.obs[key_added].astype(tmp.obs["leiden"].dtype)
    adata.obsm[f"{key_added}.fused"] = fused.astype(np.float32)
    w = K.fuse_weight(float(alpha))
    entry = {"params": {"alpha": float(alpha), "weight": w, "resolution": float(resolution),
                        "n_neighbors": int(n_neighbors), "embedding_key": embedding_key, "seed": seed},
             "version": __version__, "n_clusters": int(res["n_clusters"])}
    if key_added == embedding_key and isinstance(adata.uns.get(key_added), dict):
        adata.uns[key_added] = {**adata.uns[key_added], "cluster": entry}
    else:
        adata.uns[key_added] = entry
    return {"n_clusters": int(res["n_clusters"]), "weight": w}



