"""Inputs shared by the spatial label statistics: the label column, the coordinates, the graph, uns entries.

Every check runs before anything is written to the AnnData; errors name the sample and the key.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError, KeyNotFoundError
from ._images import sample_name, version, where

__all__ = ["Labels", "read_labels", "read_coords", "read_graph", "uns_result", "sample_of"]


def sample_of(adata) -> str | None:
    return sample_name(adata, None, None)


def _categorical_columns(adata) -> list[str]:
    return [c for c in adata.obs.columns if isinstance(adata.obs[c].dtype, pd.CategoricalDtype)]


@dataclass
class Labels:
    """Label codes ``0..k-1`` of the kept observations (``keep``), their names, and the labels left out."""

    key: str
    codes: np.ndarray                 # (n_kept,) int64
    keep: np.ndarray                  # (n_obs,) bool: labelled and of a kept label
    categories: list[str]
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.categories)


def read_labels(adata, cluster_key: str, *, min_obs: int = 2, sample: str | None = None,
                func: str = "statistic") -> Labels:
    """The categorical ``obs[cluster_key]``; labels with fewer than ``min_obs`` observations (unused
    categories included) are warned about, listed and treated as missing, like NaN labels."""
    sample = sample if sample is not None else sample_of(adata)
    if cluster_key not in adata.obs:
        raise KeyNotFoundError(f"{func}: {where(sample)} has no obs column {cluster_key!r}; categorical columns: "
                               f"{_categorical_columns(adata)}")
    col = adata.obs[cluster_key]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        raise InputError(f"{func}: obs[{cluster_key!r}] of {where(sample)} is not categorical (dtype {col.dtype}); "
                         f"convert it with .astype('category') or use one of the categorical columns "
                         f"{_categorical_columns(adata)}")
    codes = col.cat.codes.to_numpy().astype(np.int64)
    cats = [str(c) for c in col.cat.categories]
    counts = np.bincount(codes[codes >= 0], minlength=len(cats))
    small = counts < int(min_obs)
    excluded = {cats[i]: int(counts[i]) for i in np.flatnonzero(small)}
    if excluded:
        warnings.warn(f"{func}: {where(sample)}: {len(excluded)} label(s) of obs[{cluster_key!r}] with fewer than "
                      f"{min_obs} observations are left out: {excluded}", UserWarning, stacklevel=3)
    remap = np.full(len(cats) + 1, -1, dtype=np.int64)
    kept = np.flatnonzero(~small)
    remap[kept] = np.arange(kept.size)
    new = remap[np.where(codes >= 0, codes, len(cats))]
    keep = new >= 0
    if kept.size < 2:
        raise InputError(f"{func}: {where(sample)}: obs[{cluster_key!r}] has {kept.size} label(s) with at least "
                         f"{min_obs} observations; at least 2 are needed")
    return Labels(cluster_key, new[keep], keep, [cats[i] for i in kept], excluded)


def read_coords(adata, spatial_key: str = "spatial", *, sample: str | None = None,
                func: str = "statistic") -> np.ndarray:
    sample = sample if sample is not None else sample_of(adata)
    if spatial_key not in adata.obsm:
        raise KeyNotFoundError(f"{func}: {where(sample)} has no obsm[{spatial_key!r}] (coordinates); obsm keys: "
                               f"{list(adata.obsm.keys())}")
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] not in (2, 3) or not np.isfinite(xy).all():
        raise InputError(f"{func}: obsm[{spatial_key!r}] of {where(sample)} must be finite (n, 2) or (n, 3) "
                         f"coordinates, got shape {xy.shape}")
    return xy


def read_graph(adata, connectivity_key: str = "spatial.connectivities", *, sample: str | None = None,
               func: str = "statistic") -> sp.csr_matrix:
    sample = sample if sample is not None else sample_of(adata)
    if connectivity_key not in adata.obsp:
        raise KeyNotFoundError(f"{func}: {where(sample)} has no obsp[{connectivity_key!r}]: run spatial_neighbors "
                               f"first (obsp keys: {list(adata.obsp.keys())})")
    return sp.csr_matrix(adata.obsp[connectivity_key])


def extent(xy: np.ndarray) -> np.ndarray:
    return xy.max(axis=0) - xy.min(axis=0) if len(xy) else np.zeros(xy.shape[1])


def uns_result(labels: Labels, params: dict, **arrays) -> dict:
    """An uns entry: the arrays, the label names, the excluded labels and the parameters (no None)."""
    out = {k: v for k, v in arrays.items() if v is not None}
    out["labels"] = np.asarray(labels.categories, dtype=object)
    out["params"] = {k: v for k, v in params.items() if v is not None}
    out["params"]["cluster_key"] = labels.key
    if labels.excluded:
        out["excluded"] = {str(k): int(v) for k, v in labels.excluded.items()}
    out["version"] = version()
    return out
