"""Small helpers shared by the preprocessing functions."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import KeyNotFoundError


def get_matrix(adata, layer: str | None):
    """``adata.layers[layer]``, or ``adata.X`` when ``layer`` is None or ``"X"``."""
    if layer is None or layer == "X":
        if adata.X is None:
            raise KeyNotFoundError("adata.X is empty: pass layer= naming a layer")
        return adata.X
    if layer not in adata.layers:
        raise KeyNotFoundError(f"layer {layer!r} not found in the AnnData (layers: {list(adata.layers)})")
    return adata.layers[layer]


def as_csr(x) -> sp.csr_matrix:
    if sp.issparse(x):
        return x.tocsr() if x.format != "csr" else x
    return sp.csr_matrix(np.asarray(x))


def uns_entry(params: dict, **extra) -> dict:
    from .. import __version__

    # None cannot be written to h5ad: a parameter left at None is simply not recorded
    return {"params": {k: v for k, v in params.items() if v is not None}, "version": __version__,
            **{k: v for k, v in extra.items() if v is not None}}


def looks_like_counts(x, n: int = 10000) -> bool:
    """True when the first stored values are non-negative integers."""
    vals = x.data[:n] if sp.issparse(x) else np.asarray(x).ravel()[:n]
    vals = np.asarray(vals)
    return bool(np.all(vals >= 0) and np.all(vals == np.round(vals)))
