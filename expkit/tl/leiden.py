"""Leiden communities (Traag, Waltman & van Eck 2019) on the neighbour graph, with leidenalg."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .._settings import settings
from .neighbors import get_connectivities


def leiden(adata, *, resolution: float = 1.0, seed: int | None = None, n_iterations: int = -1,
           neighbors_key: str = "neighbors", key_added: str = "leiden", use_weights: bool = True,
           directed: bool = True) -> dict:
    """Leiden clustering of ``obsp[uns[neighbors_key]['connectivities_key']]``.

    Quality: ``RBConfigurationVertexPartition`` (modularity with a resolution parameter). ``directed=True``
    builds the graph from every stored entry (both directions of the symmetric matrix), as scanpy's
    leidenalg flavour does, so the same seed gives the same partition on the same graph.
    ``n_iterations=-1`` iterates until no improvement. Labels are ordered by cluster size ("0" largest).

    Writes ``obs[key_added]`` (categorical) and ``uns[key_added] = {"params", "version", "quality"}``;
    returns ``{"n_clusters", "quality"}``.
    """
    import igraph as ig
    import leidenalg as la

    import expkit

    seed = settings.seed if seed is None else int(seed)
    W = get_connectivities(adata, neighbors_key)
    if not directed:
        from scipy.sparse import triu

        W = triu(W, k=0).tocsr()
    W.eliminate_zeros()
    W.sort_indices()
    coo = W.tocoo()  # row-major order of the stored entries
    src, dst, weights = coo.row, coo.col, coo.data.astype(np.float64)
    g = ig.Graph(n=W.shape[0], edges=np.column_stack([src, dst]).astype(np.int64).tolist(), directed=directed)
    kw = {"resolution_parameter": float(resolution), "n_iterations": int(n_iterations), "seed": seed}
    if use_weights:
        kw["weights"] = weights
    part = la.find_partition(g, la.RBConfigurationVertexPartition, **kw)
    labels = np.asarray(part.membership)  # leidenalg numbers communities by decreasing size
    cats = [str(c) for c in range(labels.max() + 1)] if labels.size else []
    adata.obs[key_added] = pd.Categorical.from_codes(labels, categories=cats)
    quality = float(part.quality())
    adata.uns[key_added] = {"params": {"resolution": float(resolution), "seed": seed,
                                       "n_iterations": int(n_iterations), "neighbors_key": neighbors_key,
                                       "use_weights": bool(use_weights), "directed": bool(directed),
                                       "partition_type": "RBConfigurationVertexPartition"},
                            "version": expkit.__version__, "quality": quality}
    return {"n_clusters": len(cats), "quality": quality}
