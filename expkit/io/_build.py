"""Assemble the AnnData every reader returns (the conventions of docs/architecture.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import logger
from ._checks import check_unique, fail


def to_csr_float32(X) -> sp.csr_matrix:
    """Counts as a canonical float32 CSR matrix (no dense copy for sparse input)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        X = sp.csr_matrix(np.asarray(X))
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    if not X.has_canonical_format:
        X.sum_duplicates()
    return X


def build_var(ids, symbols=None, feature_types=None, genome=None) -> pd.DataFrame:
    """The var table: index = feature id (Ensembl id where the file has one, else the symbol)."""
    ids = np.asarray(ids, dtype=object).astype(str)
    var = pd.DataFrame(index=pd.Index(ids, name=None))
    var["gene_ids"] = ids
    if symbols is not None:
        var["gene_symbols"] = np.asarray(symbols, dtype=object).astype(str)
    var["feature_types"] = (np.asarray(feature_types, dtype=object).astype(str)
                            if feature_types is not None else "Gene Expression")
    if genome is not None:
        var["genome"] = np.asarray(genome, dtype=object).astype(str)
    return var


def make_anndata(X, barcodes, var: pd.DataFrame, *, sample: str | None, file: Path | str,
                 obs: pd.DataFrame | None = None):
    """An AnnData with X float32 CSR, obs_names = barcode, obs['barcode'], unique var names.

    Duplicated barcodes are an error; duplicated feature names are made unique (``name-1``, ...)
    with a warning, the original name staying in ``var['gene_ids']``.
    """
    import anndata as ad

    barcodes = np.asarray(barcodes, dtype=object).astype(str)
    check_unique(barcodes, "barcodes", sample, file)
    X = to_csr_float32(X)
    if X.shape != (len(barcodes), var.shape[0]):
        raise fail(sample, file, f"matrix shape {X.shape} does not match {len(barcodes)} barcodes x "
                                 f"{var.shape[0]} features")
    var = var.copy()
    if not var.index.is_unique:
        n = int(var.index.duplicated().sum())
        logger.warning("%s: %d duplicated feature names made unique by appending '-1', '-2', ...",
                       f"sample {sample!r}" if sample else str(file), n)
        var.index = _make_unique(var.index)
    var.index = var.index.astype(str)
    if obs is None:
        obs = pd.DataFrame(index=pd.Index(barcodes))
    else:
        obs = obs.copy()
        obs.index = pd.Index(barcodes)
    obs.index.name = None
    obs.insert(0, "barcode", barcodes)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    return adata


def _make_unique(index: pd.Index) -> pd.Index:
    values = index.astype(str).to_numpy(dtype=object).copy()
    seen: dict[str, int] = {}
    taken = set(values)
    for i, v in enumerate(values):
        if v in seen:
            k = seen[v]
            while True:
                k += 1
                cand = f"{v}-{k}"
                if cand not in taken:
                    break
            seen[v] = k
            values[i] = cand
            taken.add(cand)
        else:
            seen[v] = 0
    return pd.Index(values)
