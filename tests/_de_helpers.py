"""Readers for the DE / integration tests and their reference script (numpy, scipy, h5py, anndata only).

Used both by tests/test_markers.py, tests/test_integrate.py (expkit venv) and by
tests/reference/make_scanpy_de_refs.py (peers venv with scanpy), so that both sides see the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def read_10x_h5(path: Path) -> ad.AnnData:
    """Cell Ranger v3 HDF5 -> AnnData (float32 CSR counts; var_names Ensembl ids, var['gene'] symbols)."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        mat = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
        barcodes = m["barcodes"][()].astype(str)
        ids = m["features/id"][()].astype(str)
        names = m["features/name"][()].astype(str)
    X = sp.csr_matrix(mat.T.astype(np.float32))
    var = pd.DataFrame({"gene": names}, index=pd.Index(ids))
    obs = pd.DataFrame(index=pd.Index(barcodes))
    return ad.AnnData(X=X, obs=obs, var=var)


def lognorm(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(counts / total * median(total)), float32 CSR (computed in float64, rounded once)."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    total = np.asarray(counts.sum(1)).ravel()
    target = np.median(total)
    scale = np.divide(target, total, out=np.zeros_like(total), where=total > 0)
    out = sp.diags(scale) @ counts
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out, dtype=np.float32)


def dlpfc(root: Path, sample: str = "151673", labelled_only: bool = True) -> ad.AnnData:
    """One DLPFC section with layers counts / lognorm and obs['layer'] (manual labels)."""
    folder = Path(root) / "dlpfc" / sample
    adata = read_10x_h5(folder / "filtered_feature_bc_matrix_top5000genes.h5")
    truth = pd.read_csv(folder / f"{sample}_truth.txt", sep="\t", header=None, index_col=0).iloc[:, 0]
    adata.obs["layer"] = pd.Categorical(truth.reindex(adata.obs_names),
                                        categories=sorted(truth.unique()))
    if labelled_only:
        adata = adata[adata.obs["layer"].notna().to_numpy()].copy()
    adata.obs_names = [f"{sample}:{b}" for b in adata.obs_names]
    adata.obs["batch"] = sample
    adata.var_names_make_unique()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["lognorm"] = lognorm(adata.X)
    return adata


def pca(x: np.ndarray, n_comps: int) -> np.ndarray:
    """PCA scores of a dense matrix (centred; eigenvectors of the covariance; signs fixed so that the
    largest |loading| of each component is positive)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    w, v = np.linalg.eigh(x.T @ x)
    v = v[:, np.argsort(-w, kind="stable")[:n_comps]].T
    sign = np.sign(v[np.arange(n_comps), np.abs(v).argmax(1)])
    return x @ (v * sign[:, None]).T


def dlpfc_pair_pca(root: Path, n_hvg: int = 2000, n_comps: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """151673 + 151674 on their shared genes: PCA of scaled lognorm (top-variance genes).

    Returns (pca (n x n_comps) float64, batch labels, layer labels).
    """
    a = dlpfc(root, "151673", labelled_only=False)
    b = dlpfc(root, "151674", labelled_only=False)
    genes = a.var_names.intersection(b.var_names, sort=False)
    genes = pd.Index(sorted(genes))
    x = sp.vstack([a[:, genes].layers["lognorm"], b[:, genes].layers["lognorm"]]).toarray().astype(np.float64)
    var = x.var(0)
    top = np.sort(np.argsort(-var, kind="stable")[:n_hvg])
    x = x[:, top]
    sd = x.std(0)
    sd[sd == 0] = 1.0
    x = np.clip((x - x.mean(0)) / sd, -10, 10)
    emb = pca(x, n_comps)
    batch = np.array(["151673"] * a.n_obs + ["151674"] * b.n_obs)
    layer = np.concatenate([a.obs["layer"].astype(str).to_numpy(), b.obs["layer"].astype(str).to_numpy()])
    return emb, batch, layer


def knn(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest neighbours (Euclidean, self excluded), via sklearn."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    return idx[:, 1:]


def batch_entropy(x: np.ndarray, batch: np.ndarray, k: int = 30) -> float:
    """Mean over cells of the entropy (bits) of batch labels among the k nearest neighbours."""
    idx = knn(x, k)
    codes = pd.factorize(batch)[0]
    nb = codes[idx]
    props = np.stack([(nb == c).mean(1) for c in range(codes.max() + 1)], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(props > 0, props * np.log2(props), 0.0), 1)
    return float(ent.mean())


def knn_overlap(x: np.ndarray, y: np.ndarray, k: int = 30) -> float:
    """Mean fraction of shared k nearest neighbours between two embeddings of the same cells."""
    a, b = knn(x, k), knn(y, k)
    return float(np.mean([len(np.intersect1d(r, s, assume_unique=True)) / k for r, s in zip(a, b)]))
