"""Readers of the shared real data used by the preprocessing tests, benchmarks and reference script.

Plain h5py / pandas / scipy (no expkit.io, no scanpy), so that the same loaders serve the expkit
tests and the scanpy reference script (``tests/reference/make_scanpy_pp_refs.py``).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

DLPFC = ("151673", "151674")


def read_10x_h5(path, feature_type: str | None = "Gene Expression"):
    """(cells x genes float32 CSR counts, barcodes, gene ids, gene symbols) from a Cell Ranger HDF5."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][:])  # genes x cells, stored CSC
        x = sp.csc_matrix((m["data"][:].astype(np.float32), m["indices"][:], m["indptr"][:]), shape=shape)
        barcodes = m["barcodes"][:].astype(str)
        ids = m["features/id"][:].astype(str)
        names = m["features/name"][:].astype(str)
        ftype = m["features/feature_type"][:].astype(str)
    x = x.T.tocsr()  # cells x genes
    if feature_type is not None:
        keep = np.flatnonzero(ftype == feature_type)
        x, ids, names = x[:, keep], ids[keep], names[keep]
    x.sort_indices()
    return x, barcodes, ids, names


def annotation(shared: Path, taxa: str) -> pd.DataFrame:
    """Ensembl 98 table indexed by gene id with test-side ``mito`` / ``ribo`` flags.

    mito: chromosome MT; ribo: cytosolic ribosomal protein genes (symbol RPL*/RPS* and a 'ribosomal
    protein' description; MRPL/MRPS are not matched by the symbol rule).
    """
    f = shared / "gene_annotation" / ("hciRdata_human98.tsv.gz" if taxa == "human" else "hciRdata_mouse98.tsv.gz")
    tab = pd.read_csv(f, sep="\t", usecols=["id", "gene_name", "chromosome", "description", "biotype"],
                      dtype=str).drop_duplicates("id").set_index("id")
    sym = tab["gene_name"].fillna("").str.upper()
    tab["mito"] = tab["chromosome"] == "MT"
    tab["ribo"] = (sym.str.match(r"^RP[LS]\d+[A-Z]?\d*$|^RPLP\d$|^RPSA$")
                   & tab["description"].fillna("").str.contains("ribosomal protein", case=False))
    return tab


def dlpfc(shared: Path, section: str):
    """(counts CSR, obs_names, gene ids, symbols) of one DLPFC section."""
    x, bc, ids, names = read_10x_h5(shared / "dlpfc" / section / "filtered_feature_bc_matrix_top5000genes.h5")
    return x, np.array([f"{section}:{b}" for b in bc]), ids, names


def dlpfc_merged(shared: Path):
    """Both DLPFC sections on the genes they share (inner join, in 151673's order) + a batch label."""
    a = dlpfc(shared, DLPFC[0])
    b = dlpfc(shared, DLPFC[1])
    pos_b = {g: i for i, g in enumerate(b[2])}
    common = np.array([i for i, g in enumerate(a[2]) if g in pos_b])
    ib = np.array([pos_b[g] for g in a[2][common]])
    x = sp.vstack([a[0][:, common], b[0][:, ib]]).tocsr()
    x.sort_indices()
    batch = np.array([DLPFC[0]] * a[0].shape[0] + [DLPFC[1]] * b[0].shape[0])
    return x, np.concatenate([a[1], b[1]]), a[2][common], a[3][common], batch


def xenium(shared: Path):
    x, bc, ids, names = read_10x_h5(shared / "xenium_mouse_brain" / "cell_feature_matrix.h5")
    return x, np.array([f"xenium:{b}" for b in bc]), ids, names


def mob(shared: Path):
    """Mouse olfactory bulb replicate 11: (counts CSR, spot names, gene symbols)."""
    with gzip.open(shared / "mob_rep11" / "Rep11_MOB_counts_spots_x_genes.tsv.gz", "rt") as fh:
        df = pd.read_csv(fh, sep="\t", index_col=0)
    df = df.drop(columns=["x", "y"])
    x = sp.csr_matrix(df.to_numpy(dtype=np.float32))
    return x, np.array([f"mob:{b}" for b in df.index]), np.asarray(df.columns, dtype=str)


def to_anndata(x, obs_names, ids, names=None, batch=None):
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(obs_names, name=None))
    if batch is not None:
        obs["batch"] = pd.Categorical(batch)
    var = pd.DataFrame(index=pd.Index(ids, name=None))
    if names is not None:
        var["gene"] = names
    a = ad.AnnData(X=x.copy(), obs=obs, var=var)
    a.layers["counts"] = x.copy()
    return a
