"""Exact k-nearest-neighbour graph and UMAP's fuzzy connectivities (scanpy-compatible keys)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputError, KeyNotFoundError
from ..kernels import knn as _knn
from ..kernels.device import resolve_device


def _representation(adata, use_rep: str | None, n_pcs: int | None) -> tuple[np.ndarray, str]:
    if use_rep is None:
        use_rep = "pca" if "pca" in adata.obsm else ("X_pca" if "X_pca" in adata.obsm else "X")
    if use_rep == "X":
        X = adata.X
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
    else:
        if use_rep not in adata.obsm:
            raise KeyNotFoundError(f"obsm[{use_rep!r}] not found (available: {list(adata.obsm)}); run a PCA "
                                   f"first or pass use_rep=")
        X = np.asarray(adata.obsm[use_rep])
    if n_pcs is not None:
        if n_pcs > X.shape[1]:
            raise InputError(f"n_pcs={n_pcs} but {use_rep!r} has only {X.shape[1]} columns")
        X = X[:, :n_pcs]
    return np.asarray(X, dtype=np.float64), use_rep


def _keys(key_added: str | None) -> dict[str, str]:
    if key_added is None:
        return {"uns": "neighbors", "connectivities": "connectivities", "distances": "distances",
                "knn": "knn", "knn.d": "knn.d"}
    return {"uns": key_added, "connectivities": f"{key_added}.connectivities",
            "distances": f"{key_added}.distances", "knn": f"{key_added}.knn", "knn.d": f"{key_added}.knn.d"}


def knn(adata, *, n_neighbors: int = 30, use_rep: str | None = "pca", n_pcs: int | None = None,
        metric: str = "euclidean", use_gpu: bool = False, key_added: str | None = None,
        memory_budget: int = _knn.DEFAULT_MEMORY_BUDGET) -> dict:
    """Exact kNN graph and UMAP fuzzy simplicial set of ``obsm[use_rep]``.

    Brute force on the CPU or GPU, chunked over query rows within ``memory_budget`` bytes (never an n x n
    matrix). The point itself is the first neighbour (as in scanpy), then neighbours by (distance, index),
    so ties are resolved by index deterministically.

    Writes (``key_added=None``; otherwise every key is prefixed ``<key_added>.`` and uns is ``key_added``):

    * ``obsm['knn']`` int32 (n, n_neighbors), ``obsm['knn.d']`` float64 distances;
    * ``obsp['distances']`` csr float64 (the kNN distances without self) and ``obsp['connectivities']``
      csr float32 (UMAP's fuzzy union ``A + A' - A o A'`` of the smooth-kNN memberships);
    * ``uns['neighbors'] = {connectivities_key, distances_key, params, version}`` in scanpy's layout, so
      scanpy functions (umap, leiden, paga) run on it.

    Returns ``{"n_neighbors", "n_edges", "n_components"}``.
    """
    import expkit
    from scipy.sparse.csgraph import connected_components

    X, use_rep = _representation(adata, use_rep, n_pcs)
    n = X.shape[0]
    if n_neighbors < 2 or n_neighbors > n:
        raise InputError(f"n_neighbors must be in [2, n_obs={n}], got {n_neighbors}")
    device = resolve_device(use_gpu)
    idx, dist = _knn.knn_exact(X, n_neighbors, metric=metric, device=device, memory_budget=memory_budget)
    conn, _, _ = _knn.fuzzy_simplicial_set(idx, _knn.graph_distances32(dist, metric), n_neighbors, device=device)
    dmat = _knn.knn_distance_matrix(idx, dist, n)
    keys = _keys(key_added)
    adata.obsm[keys["knn"]] = idx.astype(np.int32)
    adata.obsm[keys["knn.d"]] = dist
    adata.obsp[keys["connectivities"]] = conn
    adata.obsp[keys["distances"]] = dmat
    params = {"n_neighbors": int(n_neighbors), "method": "umap", "metric": metric, "use_rep": use_rep,
              "random_state": 0, "knn": True, "exact": True}
    if n_pcs is not None:
        params["n_pcs"] = int(n_pcs)
    adata.uns[keys["uns"]] = {"connectivities_key": keys["connectivities"], "distances_key": keys["distances"],
                              "knn_key": keys["knn"], "params": params, "version": expkit.__version__}
    n_comp = connected_components(conn, directed=False)[0]
    return {"n_neighbors": int(n_neighbors), "n_edges": int(conn.nnz), "n_components": int(n_comp)}


def get_connectivities(adata, neighbors_key: str = "neighbors") -> sp.csr_matrix:
    """The connectivities matrix named by ``uns[neighbors_key]`` (KeyNotFoundError if absent)."""
    if neighbors_key not in adata.uns:
        raise KeyNotFoundError(f"uns[{neighbors_key!r}] not found: run expkit.tl.knn first")
    key = adata.uns[neighbors_key].get("connectivities_key", "connectivities")
    if key not in adata.obsp:
        raise KeyNotFoundError(f"obsp[{key!r}] (from uns[{neighbors_key!r}]) not found")
    return sp.csr_matrix(adata.obsp[key])
