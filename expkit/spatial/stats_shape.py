"""The shape of each label in one sample: Moran's I of its indicator, convex hull area and density, and the
connected pieces it forms in the spatial graph."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..kernels import autocorr as KA
from ..kernels import spatial_stats as K
from ..kernels.device import resolve_device
from .stats_common import read_coords, read_graph, read_labels, uns_result

__all__ = ["label_moran", "label_hull", "label_connectivity"]


def label_moran(adata, *, cluster_key: str, connectivity_key: str = "spatial.connectivities",
                transformation: bool = True, min_obs: int = 2, use_gpu: bool = False,
                key_added: str | None = None) -> pd.DataFrame:
    """Moran's I of each label's indicator (1 for its cells, 0 otherwise) over the spatial graph: near 1 when
    a label forms compact patches, near ``-1 / (n - 1)`` when it is scattered at random.

    The same kernel as :func:`expkit.spatial.spatial_autocorr` (row-normalised weights with
    ``transformation``), with the analytic p-value under normality (Cliff & Ord) and its BH adjustment.
    Writes ``uns[key_added]`` (default ``f"{cluster_key}.moran"``); returns a DataFrame (labels x
    ``I, pval_norm, pval_norm_fdr_bh``).
    """
    func = "label_moran"
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    w = read_graph(adata, connectivity_key, func=func)
    idx = np.flatnonzero(lab.keep)
    w = sp.csr_matrix(w[idx][:, idx], dtype=np.float64)
    w = KA.row_normalize(w) if transformation else w
    x = K.onehot(lab.codes, lab.k).astype(np.float64)
    score = KA.autocorr_scores(x, w, resolve_device(use_gpu), mode="moran")["score"]
    s0, s1, s2 = KA.weight_moments(w)
    e, v_norm, _ = KA.analytic_moments("moran", idx.size, s0, s1, s2, np.zeros(lab.k))
    p = KA.normal_pvalue(score, e, v_norm)
    df = pd.DataFrame({"I": score, "pval_norm": p, "pval_norm_fdr_bh": KA.fdr_bh(p)},
                      index=pd.Index(lab.categories, name=cluster_key))
    params = {"connectivity_key": connectivity_key, "transformation": bool(transformation), "min_obs": int(min_obs)}
    adata.uns[key_added or f"{cluster_key}.moran"] = uns_result(lab, params, I=score, pval_norm=p, expected=e)
    return df


def label_hull(adata, *, cluster_key: str, spatial_key: str = "spatial", min_obs: int = 2,
               key_added: str | None = None) -> pd.DataFrame:
    """Convex hull of each label's cells: ``area`` (volume for 3-D coordinates), ``density`` (cells per unit
    area), ``hull_fraction`` (its area over the hull of all cells) and ``n_obs``. NaN for labels whose points
    do not span a hull (fewer than 3 points in 2-D, or collinear).
    Writes ``uns[key_added]`` (default ``f"{cluster_key}.hull"``); returns a DataFrame (labels x columns)."""
    func = "label_hull"
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    xy = read_coords(adata, spatial_key, func=func)[lab.keep]
    total = K.hull_measure(xy)
    area = np.array([K.hull_measure(xy[lab.codes == c]) for c in range(lab.k)])  # over labels
    n = np.bincount(lab.codes, minlength=lab.k)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = pd.DataFrame({"n_obs": n, "area": area, "density": n / area, "hull_fraction": area / total},
                          index=pd.Index(lab.categories, name=cluster_key))
    params = {"spatial_key": spatial_key, "min_obs": int(min_obs)}
    adata.uns[key_added or f"{cluster_key}.hull"] = uns_result(lab, params, total_area=total,
                                                               **{c: df[c].to_numpy() for c in df.columns})
    return df


def label_connectivity(adata, *, cluster_key: str, connectivity_key: str = "spatial.connectivities",
                       min_obs: int = 2, key_added: str | None = None) -> pd.DataFrame:
    """How many connected pieces each label forms: the components of the spatial graph kept to the edges
    between two cells of the same label. Columns ``n_obs``, ``n_components``, ``largest`` (cells in the
    largest piece), ``largest_fraction``, ``singletons`` (cells with no neighbour of their label).
    Writes ``uns[key_added]`` (default ``f"{cluster_key}.connectivity"``); returns a DataFrame."""
    func = "label_connectivity"
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    w = read_graph(adata, connectivity_key, func=func)
    idx = np.flatnonzero(lab.keep)
    comp = K.label_components(K.undirected(w[idx][:, idx]), lab.codes, lab.k)
    n = np.bincount(lab.codes, minlength=lab.k)
    df = pd.DataFrame({"n_obs": n, **comp}, index=pd.Index(lab.categories, name=cluster_key))
    df.insert(4, "largest_fraction", df["largest"] / df["n_obs"])
    adata.uns[key_added or f"{cluster_key}.connectivity"] = uns_result(
        lab, {"connectivity_key": connectivity_key, "min_obs": int(min_obs)},
        **{c: df[c].to_numpy() for c in df.columns})
    return df
