"""How labels (cell types, domains) sit next to each other in one sample: neighbourhood enrichment,
co-occurrence over distances, the interaction matrix and centrality scores per label.

Plain functions on one AnnData; the maths (squidpy 1.8's definitions, numbers equal to squidpy's) is in
:mod:`expkit.kernels.spatial_stats`. Results go to ``uns[f"{cluster_key}.<statistic>"]`` by default.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .._settings import settings
from ..errors import InputError
from ..kernels import spatial_stats as K
from ..kernels.device import resolve_device
from .stats_common import extent, read_coords, read_graph, read_labels, sample_of, uns_result

__all__ = ["nhood_enrichment", "co_occurrence", "interaction_matrix", "centrality", "CENTRALITY_SCORES"]

CENTRALITY_SCORES = ("degree_centrality", "average_clustering", "closeness_centrality")


def _library_codes(adata, library_key, keep, func):
    if library_key is None:
        return None
    if library_key not in adata.obs:
        raise InputError(f"{func}: library_key {library_key!r} is not an obs column (columns: "
                         f"{list(adata.obs.columns)})")
    codes, _ = pd.factorize(adata.obs[library_key])
    if np.any(codes[keep] < 0):
        raise InputError(f"{func}: obs[{library_key!r}] has missing values")
    return codes[keep]


def nhood_enrichment(adata, *, cluster_key: str, connectivity_key: str = "spatial.connectivities",
                     library_key: str | None = None, n_perms: int = 1000, seed: int | None = None,
                     min_obs: int = 2, use_gpu: bool = False, key_added: str | None = None) -> dict:
    """Neighbourhood enrichment: how much more often labels a and b are neighbours than by chance.

    ``count[a, b]`` is the number of graph edges (stored entries of ``obsp[connectivity_key]``, row a cell of
    label a, column a cell of label b); the null shuffles the labels over the cells ``n_perms`` times (within
    ``obs[library_key]`` when given) and ``zscore = (count - mean) / sd`` of the shuffled counts (squidpy's
    ``nhood_enrichment``). All permutations are batched (seeded by ``seed``; identical on CPU and CUDA).
    Labels with fewer than ``min_obs`` cells, and unlabelled cells, are left out (with a warning).

    Writes ``uns[key_added]`` (default ``f"{cluster_key}.nhood"``): ``zscore``, ``count`` (k x k), ``labels``,
    ``params``. Returns the same dict.
    """
    func = "nhood_enrichment"
    if int(n_perms) < 2:
        raise InputError(f"{func}: n_perms must be >= 2, not {n_perms!r}")
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    w = read_graph(adata, connectivity_key, func=func)
    groups = _library_codes(adata, library_key, lab.keep, func)
    seed = settings.seed if seed is None else int(seed)
    src, dst, _ = K.graph_edges(w, lab.keep)
    count = K.interaction_counts(src, dst, lab.codes, lab.k)
    perms = K.permutation_counts(src, dst, lab.codes, lab.k, int(n_perms), seed, resolve_device(use_gpu), groups)
    z = K.enrichment_zscore(count, perms)
    params = {"connectivity_key": connectivity_key, "library_key": library_key, "n_perms": int(n_perms),
              "seed": seed, "min_obs": int(min_obs)}
    res = uns_result(lab, params, zscore=z, count=count.astype(np.int64))
    adata.uns[key_added or f"{cluster_key}.nhood"] = res
    return res


def _interval(xy32: np.ndarray, interval, sample, func) -> np.ndarray:
    if np.isscalar(interval):
        if int(interval) < 2 or int(interval) != interval:
            raise InputError(f"{func}: interval must be an integer >= 2 or an array of >= 2 distances, not "
                             f"{interval!r}")
        return K.squidpy_interval(xy32, int(interval))
    iv = np.sort(np.asarray(interval, dtype=np.float32))
    if iv.size < 2 or not np.isfinite(iv).all() or iv[0] < 0:
        raise InputError(f"{func}: interval must hold >= 2 finite, non-negative distances, not {interval!r}")
    ext = extent(xy32.astype(np.float64))
    diag = float(np.sqrt((ext ** 2).sum()))
    if iv[-1] > diag:
        raise InputError(f"{func}: the largest distance {float(iv[-1]):g} exceeds the extent of sample "
                         f"{sample!r} ({' x '.join(f'{e:g}' for e in ext)}, diagonal {diag:g})")
    return iv


def co_occurrence(adata, *, cluster_key: str, spatial_key: str = "spatial", interval=50, cumulative: bool = True,
                  min_obs: int = 2, use_gpu: bool = False, key_added: str | None = None) -> dict:
    """Co-occurrence ratios of label pairs over distance: ``occ[a, b, r] = P(a | b) / P(a)`` among the
    ordered pairs of cells closer than the threshold ``interval[r + 1]`` (squidpy 1.8's definition).

    ``interval``: an integer (that many thresholds, evenly spaced as squidpy chooses them: from the distance of
    the two points of smallest x + y to half the distance from there to the point of largest x + y) or an
    array of distances. ``cumulative=True`` counts the pairs at distance <= ``interval[r + 1]`` (squidpy 1.8);
    ``False`` counts the pairs in the ring ``(interval[r], interval[r + 1]]``. Distances in float32 (as squidpy)
    over every pair of cells (blocks, never an n x n array; CPU or CUDA). All coordinate columns are used (2-D
    or 3-D).

    Writes ``uns[key_added]`` (default ``f"{cluster_key}.co_occurrence"``): ``occ`` (k x k x (len(interval) - 1)),
    ``interval``, ``pairs`` (the pair counts), ``labels``, ``params``. Returns the same dict.
    """
    func = "co_occurrence"
    sample = sample_of(adata)
    lab = read_labels(adata, cluster_key, min_obs=min_obs, sample=sample, func=func)
    xy32 = read_coords(adata, spatial_key, sample=sample, func=func)[lab.keep].astype(np.float32)
    iv = _interval(xy32, interval, sample, func)
    cum = K.cooccurrence_counts(xy32, lab.codes, lab.k, iv, resolve_device(use_gpu))  # at every threshold
    pairs = cum[:, :, 1:] if cumulative else cum[:, :, 1:] - cum[:, :, :-1]
    occ = K.cooccurrence_ratio(pairs)
    params = {"spatial_key": spatial_key, "cumulative": bool(cumulative), "min_obs": int(min_obs),
              "interval": int(interval) if np.isscalar(interval) else "array"}
    res = uns_result(lab, params, occ=occ, interval=iv, pairs=pairs.astype(np.int64))
    adata.uns[key_added or f"{cluster_key}.co_occurrence"] = res
    return res


def interaction_matrix(adata, *, cluster_key: str, connectivity_key: str = "spatial.connectivities",
                       normalized: bool = False, weights: bool = False, min_obs: int = 1,
                       key_added: str | None = None) -> np.ndarray:
    """Edges between labels: ``M[a, b]`` = number of graph edges from a cell of label a to one of label b (the
    sum of their weights with ``weights=True``); ``normalized`` divides each row by its sum (squidpy's
    ``interaction_matrix``). Unlabelled cells and labels with fewer than ``min_obs`` cells are left out.

    Writes ``uns[key_added]`` (default ``f"{cluster_key}.interactions"``): ``matrix``, ``labels``, ``params``.
    Returns the matrix (k x k float).
    """
    func = "interaction_matrix"
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    w = read_graph(adata, connectivity_key, func=func)
    src, dst, val = K.graph_edges(w, lab.keep)
    m = K.interaction_counts(src, dst, lab.codes, lab.k, weights=val if weights else None).astype(np.float64)
    if normalized:
        with np.errstate(invalid="ignore", divide="ignore"):
            m = m / m.sum(axis=1, keepdims=True)
    params = {"connectivity_key": connectivity_key, "normalized": bool(normalized), "weights": bool(weights),
              "min_obs": int(min_obs)}
    adata.uns[key_added or f"{cluster_key}.interactions"] = uns_result(lab, params, matrix=m)
    return m


def centrality(adata, *, cluster_key: str, connectivity_key: str = "spatial.connectivities", score=None,
               min_obs: int = 2, key_added: str | None = None) -> pd.DataFrame:
    """Centrality of each label as a group of nodes of the (undirected) spatial graph, squidpy's
    ``centrality_scores`` (networkx definitions):

    - ``degree_centrality``: the fraction of the cells outside the label that touch a cell of the label;
    - ``average_clustering``: the mean local clustering coefficient of the label's cells;
    - ``closeness_centrality``: ``(n - n_label) / sum of hop distances`` from the label to the other cells
      (unreachable cells add 0), by one breadth-first search of all labels at once.

    ``score``: one name, a list, or None (all three). Writes ``uns[key_added]`` (default
    ``f"{cluster_key}.centrality"``: one array per score, ``labels``, ``params``). Returns a DataFrame
    (labels x scores).
    """
    func = "centrality"
    names = list(CENTRALITY_SCORES) if score is None else ([score] if isinstance(score, str) else list(score))
    bad = [s for s in names if s not in CENTRALITY_SCORES]
    if bad or not names:
        raise InputError(f"{func}: unknown score(s) {bad or names}; choose from {list(CENTRALITY_SCORES)}")
    lab = read_labels(adata, cluster_key, min_obs=min_obs, func=func)
    w = read_graph(adata, connectivity_key, func=func)
    idx = np.flatnonzero(lab.keep)
    a = K.undirected(w[idx][:, idx] if idx.size < w.shape[0] else w)
    out = {}
    for s in names:  # over the (at most three) scores
        if s == "degree_centrality":
            out[s] = K.group_degree(a, lab.codes, lab.k)
        elif s == "average_clustering":
            out[s] = K.label_mean(K.local_clustering(a), lab.codes, lab.k)
        else:
            out[s] = K.group_closeness(a, lab.codes, lab.k)
    df = pd.DataFrame(out, index=pd.Index(lab.categories, name=cluster_key))
    params = {"connectivity_key": connectivity_key, "scores": names, "min_obs": int(min_obs)}
    adata.uns[key_added or f"{cluster_key}.centrality"] = uns_result(lab, params, **out)
    return df
