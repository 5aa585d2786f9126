"""An existing ``.h5ad`` file, read read-only and checked."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._checks import check_finite, check_unique, fail, open_h5, require_file

__all__ = ["read_h5ad"]


def _check_sparse_groups(fh, sample, path) -> None:
    """Every CSR/CSC group of the file: a 2-entry non-negative ``shape`` and 1-D ``data``/``indices``/
    ``indptr`` whose lengths agree with it (checked before anndata allocates from ``shape``)."""
    import h5py

    bad: list[str] = []

    def visit(name, obj):
        enc = obj.attrs.get("encoding-type", b"")
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if bad or not isinstance(obj, h5py.Group) or enc not in ("csr_matrix", "csc_matrix"):
            return
        shape = np.asarray(obj.attrs.get("shape", []))
        parts = {k: obj.get(k) for k in ("data", "indices", "indptr")}
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 0:
            bad.append(f"'/{name}' has shape {shape.tolist()!r}, expected two non-negative integers")
        elif any(not isinstance(d, h5py.Dataset) or d.ndim != 1 for d in parts.values()):
            bad.append(f"'/{name}' lacks 1-D data, indices and indptr datasets")
        elif parts["indptr"].shape[0] != int(shape[0 if enc == "csr_matrix" else 1]) + 1 or \
                parts["data"].shape != parts["indices"].shape:
            bad.append(f"'/{name}' ({enc}, shape {tuple(int(v) for v in shape)}) has "
                       f"{parts['indptr'].shape[0]} indptr, {parts['data'].shape[0]} data and "
                       f"{parts['indices'].shape[0]} indices entries")

    fh.visititems(visit)
    if bad:
        raise fail(sample, path, f"corrupt sparse matrix: {bad[0]}")


def _sparse_problem(M) -> str | None:
    """What breaks the CSR/CSC structure of ``M`` (checked without modifying it, unlike scipy's
    ``check_format``), or None."""
    if M.format not in ("csr", "csc"):
        return None
    major, minor = M.shape if M.format == "csr" else M.shape[::-1]
    ip, ix = M.indptr, M.indices
    if ip.ndim != 1 or ix.ndim != 1 or M.data.shape != ix.shape:
        return "data, indices and indptr are not 1-D arrays of matching lengths"
    if len(ip) != major + 1 or (len(ip) and (ip[0] != 0 or ip[-1] > len(ix))):
        return f"indptr has {len(ip)} entries for {major} rows (or does not run from 0 to nnz)"
    if len(ix) and (ix.min() < 0 or ix.max() >= minor):
        return f"indices out of range [0, {minor})"
    if len(ip) > 1 and np.diff(ip).min() < 0:
        return "indptr is not non-decreasing"
    return None


def _check_sparse_matrices(adata, sample, path) -> None:
    """The structure of every sparse matrix in X, layers, obsm/obsp/varm/varp (a corrupt one would
    make later conversions read out of bounds)."""
    items = [("X", adata.X)] + [(f"{k}['{n}']", v) for k in ("layers", "obsm", "obsp", "varm", "varp")
                                for n, v in getattr(adata, k).items()]
    for name, M in items:
        problem = _sparse_problem(M) if sp.issparse(M) else None
        if problem is not None:
            raise fail(sample, path, f"{name} is a corrupt sparse matrix: {problem}")


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
    with open_h5(path, sample) as fh:  # corrupt / truncated / impossible sizes: a ReaderError here
        _check_sparse_groups(fh, sample, path)
    try:
        adata = ad.read_h5ad(path)  # mode "r": h5py opens the file read-only
    except Exception as exc:  # anndata's read errors, KeyError on a file that is not an AnnData
        raise fail(sample, path, f"is not a readable h5ad file (corrupt, truncated or not an "
                                 f"AnnData?): {exc}") from exc
    if not isinstance(adata, ad.AnnData):
        raise fail(sample, path, f"holds a {type(adata).__name__}, not an AnnData")
    _check_sparse_matrices(adata, sample, path)
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
        try:
            xy = xy.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise fail(sample, path, f"obsm['spatial'] is not numeric ({xy.dtype}): {exc}") from exc
        check_finite(xy, adata.obs_names, "observations", sample, path)
        adata.obsm["spatial"] = xy
    return adata
