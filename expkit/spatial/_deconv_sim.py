"""Pseudo-spots of known composition from labelled single cells (for tests and benchmarks)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError, KeyNotFoundError


def _fields(xy: np.ndarray, n_types: int, rng, n_blobs: int, width: float) -> np.ndarray:
    """(n_spots, K) smooth type preferences: a few Gaussian blobs per type over the unit square."""
    centers = rng.random((n_types, n_blobs, 2))
    d2 = ((xy[:, None, None, :] - centers[None]) ** 2).sum(-1)
    f = np.exp(-d2 / (2 * width ** 2)).sum(2) + 0.02
    return f / f.sum(1, keepdims=True)


def simulate_spots(cells, *, label_key: str = "cell_type", layer: str | None = "counts", n_side: int = 30,
                   cells_per_spot: float = 8.0, n_blobs: int = 2, width: float = 0.18, sharpness: float = 2.0,
                   spacing: float = 100.0, capture: float = 1.0, seed: int = 0):
    """Aggregate labelled single cells into an ``n_side x n_side`` grid of pseudo-spots.

    Each spot gets ``1 + Poisson(cells_per_spot - 1)`` cells whose types follow smooth spatial fields
    (``n_blobs`` Gaussian blobs of ``width`` per type, raised to ``sharpness`` so that neighbouring
    spots share a few dominant types); each cell is drawn (with replacement) from the cells of its type
    and its counts are added; ``capture < 1`` keeps each count with that probability (binomial thinning,
    a lower capture rate than the reference's). Returns an AnnData (X and ``layers['counts']``: the summed counts,
    ``obsm['spatial']``: grid coordinates, ``obsm['truth']``: each type's share of the spot's counts
    (what RCTD's weights estimate), ``obsm['truth_cells']``: each type's share of the spot's cells).
    """
    import anndata as ad

    if label_key not in cells.obs:
        raise KeyNotFoundError(f"cells: obs[{label_key!r}] not found; obs columns: {list(cells.obs.columns)}")
    x = cells.X if layer is None else cells.layers[layer] if layer in cells.layers else None
    if x is None:
        raise KeyNotFoundError(f"cells: layer {layer!r} not found; available: {list(cells.layers)}")
    x = sp.csr_matrix(x, dtype=np.float64)
    lab = pd.Categorical(cells.obs[label_key].astype(str))
    types, codes = list(lab.categories), lab.codes.astype(np.int64)
    if len(types) < 2 or n_side < 1 or cells_per_spot < 1:
        raise InputError("simulate_spots needs two or more cell types, n_side >= 1 and cells_per_spot >= 1")
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    unit = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64) / max(n_side - 1, 1)
    pref = _fields(unit, len(types), rng, n_blobs, width) ** sharpness
    pref /= pref.sum(1, keepdims=True)
    n_spots = len(unit)
    n_cells = 1 + rng.poisson(cells_per_spot - 1, n_spots)
    spot = np.repeat(np.arange(n_spots), n_cells)
    cum = np.cumsum(pref, 1)
    ctype = np.minimum((rng.random(len(spot))[:, None] > cum[spot]).sum(1), len(types) - 1)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(types)))
    sizes = np.bincount(codes, minlength=len(types))
    pick = order[starts[ctype] + (rng.random(len(spot)) * sizes[ctype]).astype(np.int64)]
    member = sp.csr_matrix((np.ones(len(spot)), (spot, pick)), shape=(n_spots, x.shape[0]))
    counts = (member @ x).tocsr()
    cell_tot = np.asarray(x.sum(1)).ravel()
    if capture < 1.0:
        counts.data = rng.binomial(counts.data.astype(np.int64), float(capture)).astype(np.float64)
        counts.eliminate_zeros()
        cell_tot = cell_tot * float(capture)
    tot = cell_tot[pick]
    umi = np.zeros((n_spots, len(types)))
    np.add.at(umi, (spot, ctype), tot)
    ncell = np.zeros((n_spots, len(types)))
    np.add.at(ncell, (spot, ctype), 1.0)
    names = [f"spot{i}" for i in range(n_spots)]
    out = ad.AnnData(X=counts.copy(), obs=pd.DataFrame({"n_cells": n_cells}, index=names),
                     var=pd.DataFrame(index=cells.var_names.copy()))
    out.layers["counts"] = counts
    out.obsm["spatial"] = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64) * spacing
    out.obsm["truth"] = pd.DataFrame(umi / np.maximum(umi.sum(1, keepdims=True), 1e-300), index=names, columns=types)
    out.obsm["truth_cells"] = pd.DataFrame(ncell / n_cells[:, None], index=names, columns=types)
    return out


def split_cells(cells, *, label_key: str = "cell_type", n_first: int = 15, seed: int = 0):
    """Split labelled cells into two disjoint AnnDatas: ``n_first`` random cells of each type (all of a
    smaller type) and the rest; e.g. a reference and the cells that pseudo-spots are built from."""
    lab = pd.Categorical(cells.obs[label_key].astype(str))
    codes = lab.codes.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(codes))
    order = order[np.argsort(codes[order], kind="stable")]
    starts = np.searchsorted(codes[order], np.arange(len(lab.categories)))
    rank = np.empty(len(codes), np.int64)
    rank[order] = np.arange(len(codes)) - starts[codes[order]]
    first = rank < int(n_first)
    return cells[first].copy(), cells[~first].copy()
