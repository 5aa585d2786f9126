"""The fixed PCA inputs of the neighbour tests, shared by tests/test_neighbors.py and the scanpy reference
script (plain numpy/h5py/scipy so that both environments compute the same numbers).

Procedure: Cell Ranger HDF5 counts -> cells with >0 counts -> counts scaled to 10,000 per cell -> log1p ->
(DLPFC) the 2,000 genes of highest variance of the log values (ties by gene order) -> centred -> the top 50
principal components by ``numpy.linalg.eigh`` of the gene covariance, signs fixed so that each component's
largest-magnitude loading is positive -> float32.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

DATASETS = {
    "dlpfc": ("dlpfc/151673/filtered_feature_bc_matrix_top5000genes.h5", 2000),
    "xenium": ("xenium_mouse_brain/cell_feature_matrix.h5", None),
}


def read_counts(path: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Cells x genes CSR counts and barcodes from a Cell Ranger HDF5 file."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)  # genes x cells
        barcodes = m["barcodes"][()].astype(str)
        if "features/feature_type" in m:
            ft = m["features/feature_type"][()].astype(str)
            X = X[np.flatnonzero(ft == "Gene Expression")] if (ft == "Gene Expression").any() else X
    return sp.csr_matrix(X.T, dtype=np.float64), barcodes


def pca_input(shared: Path, name: str, n_comps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(pca float32 cells x 50, barcodes of the kept cells) for dataset ``name``."""
    rel, n_top = DATASETS[name]
    X, barcodes = read_counts(Path(shared) / rel)
    totals = np.asarray(X.sum(1)).ravel()
    keep = totals > 0
    X, barcodes, totals = X[keep], barcodes[keep], totals[keep]
    X = sp.diags(1e4 / totals) @ X
    X.data = np.log1p(X.data)
    X = X.toarray()
    if n_top is not None and n_top < X.shape[1]:
        var = X.var(axis=0)
        genes = np.sort(np.argsort(-var, kind="stable")[:n_top])
        X = X[:, genes]
    X = X - X.mean(axis=0)
    cov = X.T @ X / (X.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(-vals, kind="stable")[:n_comps]]
    signs = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])])
    vecs = vecs * signs
    return (X @ vecs).astype(np.float32), barcodes


def subset_rows(n: int, step: int) -> np.ndarray:
    """Every ``step``-th row: the rows whose full reference values are stored."""
    return np.arange(0, n, step)


def knn_preservation(X: np.ndarray, Y: np.ndarray, rows: np.ndarray | None = None, k: int = 15) -> float:
    """Mean fraction of each row's k nearest neighbours in ``X`` (self excluded) that are among its k nearest
    neighbours in the embedding ``Y`` (exact, sklearn brute/kd-tree)."""
    from sklearn.neighbors import NearestNeighbors

    rows = np.arange(X.shape[0]) if rows is None else rows
    a = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X).kneighbors(X[rows], return_distance=False)
    b = NearestNeighbors(n_neighbors=k + 1).fit(Y).kneighbors(Y[rows], return_distance=False)
    hits = [len(set(a[i, 1:]) & set(b[i, 1:])) for i in range(len(rows))]  # small summary, not a kernel
    return float(np.mean(hits) / k)


def trust(X: np.ndarray, Y: np.ndarray, rows: np.ndarray | None = None, k: int = 15) -> float:
    from sklearn.manifold import trustworthiness

    rows = np.arange(X.shape[0]) if rows is None else rows
    return float(trustworthiness(X[rows], Y[rows], n_neighbors=k))
