"""Inputs of :func:`expkit.spatial.deconvolution.deconvolve`: counts, the reference's labels and the genes
both sides share (matched by name, else through the gene database). Every check runs before anything is
written to the AnnData."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import logger
from ..errors import InputError, KeyNotFoundError

MIN_SHARED_GENES = 20


def sample_name(adata, fallback: str = "the spatial data") -> str:
    if "sample" in adata.obs and adata.n_obs:
        return f"sample {str(adata.obs['sample'].iloc[0])!r}"
    return fallback


def counts_matrix(adata, layer: str | None, what: str, need_integer: bool = True) -> sp.csr_matrix:
    """``layers[layer]`` (None: X) as CSR float64; a missing ``"counts"`` layer falls back to an
    integer X. Negative or (when ``need_integer``) non-integer values raise ``InputError``."""
    if layer is None:
        x, src = adata.X, "X"
    elif layer in adata.layers:
        x, src = adata.layers[layer], f"layers[{layer!r}]"
    elif layer == "counts" and adata.X is not None and _is_integer(adata.X):
        logger.info(f"{what}: no layers['counts']; using X, which holds integer counts")
        x, src = adata.X, "X"
    else:
        raise KeyNotFoundError(f"{what}: layer {layer!r} not found; available layers: {list(adata.layers)}")
    if x is None:
        raise InputError(f"{what}: {src} is empty")
    x = sp.csr_matrix(x, dtype=np.float64)
    if x.nnz and (not np.isfinite(x.data).all() or x.data.min() < 0):
        raise InputError(f"{what}: {src} has negative or non-finite values; deconvolution needs raw counts")
    if need_integer and not _is_integer(x):
        bad = int(np.sum(x.data != np.round(x.data)))
        raise InputError(f"{what}: {src} holds {bad} non-integer values; the Poisson model of "
                         "method='rctd' needs raw integer counts (pass the layer of raw counts, e.g. layer='counts')")
    return x


def _is_integer(x) -> bool:
    data = x.data if sp.issparse(x) else np.asarray(x)
    data = np.asarray(data)
    return bool(np.all(data == np.round(data)))


def reference_labels(reference, label_key: str, min_cells: int):
    """Type names (sorted) and the code of each kept cell; types with fewer than ``min_cells`` cells are
    dropped with a warning that lists them (an error when fewer than two types remain)."""
    if label_key not in reference.obs:
        raise KeyNotFoundError(f"reference: obs[{label_key!r}] (the cell-type labels) not found; obs columns: "
                               f"{list(reference.obs.columns)}")
    lab = reference.obs[label_key]
    if lab.isna().any():
        raise InputError(f"reference: obs[{label_key!r}] has {int(lab.isna().sum())} missing labels")
    lab = lab.astype(str)
    sizes = lab.value_counts()
    small = sizes[sizes < int(min_cells)]
    if len(small):
        listed = ", ".join(f"{k!r} ({v})" for k, v in small.sort_index().items())
        warnings.warn(f"reference: {len(small)} cell types have fewer than min_cells_per_type={min_cells} cells "
                      f"and are excluded: {listed}", UserWarning, stacklevel=3)
    types = sorted(sizes.index[sizes >= int(min_cells)])
    if len(types) < 2:
        raise InputError(f"reference: only {len(types)} cell types have at least min_cells_per_type={min_cells} "
                         f"cells (sizes: {dict(sizes)}); deconvolution needs two or more")
    keep = lab.isin(types).to_numpy()
    codes = pd.Categorical(lab[keep], categories=types).codes.astype(np.int64)
    return types, keep, codes


def _guess_taxa(*adatas) -> list:
    from ..database import TAXA, _adata_taxa

    found = [t for t in (_adata_taxa(a) for a in adatas) if t]
    return found[:1] if found else list(TAXA)


def _by_database(ref_names, sp_names, taxa_list):
    from ..database import lookup

    best = (np.zeros(0, int), np.zeros(0, int), None)
    for taxa in taxa_list:
        ru = pd.Series(lookup(list(ref_names), taxa), dtype=object)
        su = pd.Series(lookup(list(sp_names), taxa), dtype=object)
        su = su[su.notna() & ~su.duplicated()]
        s_map = pd.Series(su.index.to_numpy(), index=pd.Index(su.to_numpy()))
        ok = ru.notna() & ~ru.duplicated() & ru.isin(s_map.index)
        ri = np.flatnonzero(ok.to_numpy())
        si = s_map[ru[ok].to_numpy()].to_numpy() if len(ri) else np.zeros(0, int)
        if len(ri) > len(best[0]):
            best = (np.asarray(ri, int), np.asarray(si, int), taxa)
    return best


def match_genes(reference, adata, what: str, min_genes: int = MIN_SHARED_GENES):
    """Indices ``(ref_idx, spatial_idx)`` of the genes both sides share and a report dict. Names are
    matched exactly; when fewer than half of the reference's genes match, the gene database is tried
    (symbols, aliases, Ensembl ids with or without version) and kept if it matches more."""
    ref_names = pd.Index(reference.var_names.astype(str))
    sp_names = pd.Index(adata.var_names.astype(str))
    sp_pos = pd.Series(np.arange(len(sp_names)), index=sp_names)
    sp_pos = sp_pos[~sp_pos.index.duplicated()]
    common = ref_names[ref_names.isin(sp_pos.index) & ~ref_names.duplicated()]
    ref_idx, sp_idx, how = ref_names.get_indexer(common), sp_pos[common].to_numpy(), "name"
    if len(common) < 0.5 * len(ref_names):
        try:
            r2, s2, taxa = _by_database(ref_names, sp_names, _guess_taxa(adata, reference))
        except Exception as exc:  # the database is optional for matching by name
            logger.info(f"{what}: gene database matching unavailable ({exc})")
            r2, s2, taxa = np.zeros(0, int), np.zeros(0, int), None
        if len(r2) > len(ref_idx):
            ref_idx, sp_idx, how = r2, s2, f"gene database ({taxa})"
    n = len(ref_idx)
    if n < min_genes:
        raise InputError(f"{what}: only {n} genes are shared with the reference (threshold {min_genes}; "
                         f"reference {len(ref_names)} genes, spatial {len(sp_names)}; matched by {how})")
    order = np.argsort(ref_idx, kind="stable")
    report = {"n_shared": int(n), "share_of_reference": float(n / max(len(ref_names), 1)),
              "share_of_spatial": float(n / max(len(sp_names), 1)), "matched_by": how}
    logger.info(f"{what}: {n} genes shared with the reference ({100 * report['share_of_reference']:.1f}% of its "
                f"{len(ref_names)}), matched by {how}")
    return ref_idx[order], sp_idx[order], report
