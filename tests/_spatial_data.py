"""Readers of the shared real data for the spatial graph / autocorrelation tests and benchmarks.

Plain h5py + scipy + pandas (the io package is written separately), producing AnnData objects in the
layout of docs/architecture.md: X raw counts (float32 CSR), var["gene"] symbols, obsm["spatial"] (x, y)
full-resolution pixels, obsm["spatial.array"] (row, col) for Visium.
"""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def read_cellranger_h5(path: Path):
    """(counts obs x genes float32 CSR, barcodes, feature ids, symbols) from a Cell Ranger HDF5."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        x = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
        barcodes = [b.decode() for b in m["barcodes"][()]]
        ids = [b.decode() for b in m["features/id"][()]]
        names = [b.decode() for b in m["features/name"][()]]
        ftype = np.array([b.decode() for b in m["features/feature_type"][()]])
    keep = np.nonzero(ftype == "Gene Expression")[0]  # drop Xenium control probes / blank codewords
    x = sp.csr_matrix(x[keep].T, dtype=np.float32)
    return x, barcodes, [ids[i] for i in keep], [names[i] for i in keep]


def read_dlpfc(shared: Path, sample: str = "151673"):
    root = Path(shared) / "dlpfc" / sample
    x, barcodes, ids, names = read_cellranger_h5(root / "filtered_feature_bc_matrix_top5000genes.h5")
    pos = pd.read_csv(root / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    pos = pos.set_index("barcode").loc[barcodes]
    obs = pd.DataFrame({"sample": sample, "barcode": barcodes},
                       index=[f"{sample}:{b}" for b in barcodes])
    var = pd.DataFrame({"gene": names}, index=ids)
    a = ad.AnnData(X=x, obs=obs, var=var)
    a.layers["counts"] = x.copy()
    a.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(np.float64)
    a.obsm["spatial.array"] = pos[["array_row", "array_col"]].to_numpy(np.int64)
    return a


def read_xenium(shared: Path):
    root = Path(shared) / "xenium_mouse_brain"
    x, barcodes, ids, names = read_cellranger_h5(root / "cell_feature_matrix.h5")
    cells = pd.read_csv(root / "cells.csv.gz")
    cells["cell_id"] = cells["cell_id"].astype(str)
    cells = cells.set_index("cell_id").loc[barcodes]
    obs = pd.DataFrame({"sample": "xenium", "barcode": barcodes},
                       index=[f"xenium:{b}" for b in barcodes])
    var = pd.DataFrame({"gene": names}, index=ids)
    a = ad.AnnData(X=x, obs=obs, var=var)
    a.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    return a


def normalize_log1p(x: sp.csr_matrix) -> sp.csr_matrix:
    """normalize_total to the median total count (of spots with counts > 0), then log1p (float32)."""
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    totals = np.asarray(x.sum(axis=1)).ravel()
    target = np.median(totals[totals > 0])
    scale = np.where(totals > 0, target / np.where(totals > 0, totals, 1), 1.0)
    x = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ x, dtype=np.float32)
    x.data = np.log1p(x.data)
    return x
