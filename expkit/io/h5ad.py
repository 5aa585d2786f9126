"""An existing ``.h5ad`` file, read read-only and checked."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._checks import check_finite, check_unique, fail, open_h5_file, require_file

__all__ = ["read_h5ad"]


def read_h5ad(path, *, sample: str | None = None):
    """Read an AnnData ``.h5ad`` file and check it against the reader conventions.

    Parameters
    ----------
    path
        The ``.h5ad`` file (opened read-only; never modified).
    sample
        Sample name used in messages.

    Returns
    -------
    AnnData
        The file's content, with ``X`` as CSR (dtype kept unless integer, which becomes float32),
        ``obs['barcode']`` filled from ``obs_names`` when absent, and ``obsm['spatial']`` as float64.

    Raises
    ------
    ReaderError
        Missing, corrupt or truncated file, no ``X``, duplicated observation names, an
        ``obsm['spatial']`` that is not (n, 2+) or holds NaN/inf.
    """
    import anndata as ad

    path = require_file(path, sample, "h5ad file")
    open_h5_file(path, sample).close()  # a corrupt/truncated/unreadable HDF5 file: ReaderError here
    try:
        adata = ad.read_h5ad(path)  # mode "r": h5py opens the file read-only
    except Exception as exc:  # anndata's read errors, KeyError on a file that is not an AnnData
        raise fail(sample, path, f"is not a readable h5ad file (corrupt, truncated or not an "
                                 f"AnnData?): {exc}") from exc
    if not isinstance(adata, ad.AnnData):
        raise fail(sample, path, f"holds a {type(adata).__name__}, not an AnnData")
    if adata.X is None:
        raise fail(sample, path, "has no X matrix")
    check_unique(adata.obs_names, "observation names", sample, path)
    X = adata.X
    if not sp.issparse(X):
        X = sp.csr_matrix(np.asarray(X))
    elif not sp.isspmatrix_csr(X):
        X = sp.csr_matrix(X)
    if np.issubdtype(X.dtype, np.integer) or X.dtype == np.bool_:
        X = X.astype(np.float32)
    adata.X = X
    if "barcode" not in adata.obs.columns:
        adata.obs.insert(0, "barcode", adata.obs_names.astype(str).to_numpy())
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"])
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise fail(sample, path, f"obsm['spatial'] has shape {xy.shape}, expected (n_obs, 2)")
        xy = xy.astype(np.float64)
        check_finite(xy, adata.obs_names, "observations", sample, path)
        adata.obsm["spatial"] = xy
    return adata
