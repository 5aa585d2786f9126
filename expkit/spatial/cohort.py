"""Spatial label statistics over many samples: one tidy table, a sample-level embedding, group comparisons.

``spatial_graph_stats`` (a joint method: ``{sample: AnnData}`` in, one DataFrame out) computes, per sample or
per subunit (squares / cubes of a given size), label statistics at each radius of a radius graph;
``sample_embedding`` and ``compare_groups`` take that table (in :mod:`expkit.spatial.stats_cohort`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .._settings import settings
from ..errors import InputError
from ..kernels import spatial_graph as KG
from ..kernels import spatial_stats as K
from ..kernels.device import resolve_device
from .stats_cohort import compare_groups, sample_embedding
from .stats_common import extent, read_coords, read_labels

__all__ = ["spatial_graph_stats", "sample_embedding", "compare_groups", "STATISTICS", "TABLE_COLUMNS"]

STATISTICS = ("proportion", "density", "interaction", "co_occurrence", "nhood_enrichment", "degree_centrality",
              "average_clustering", "moran", "components", "ripley_L")
_RADIUS_FREE = ("proportion", "density")
TABLE_COLUMNS = ("sample", "group", "batch", "subunit", "n_obs", "statistic", "radius", "label_a", "label_b",
                 "value")


def _natural(values):
    import re

    return sorted({str(v) for v in values},
                  key=lambda v: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", v)])


def _meta(adata, key) -> str:
    if key is None or key not in adata.obs or adata.n_obs == 0:
        return ""
    vals = adata.obs[key].dropna().unique()
    return str(vals[0]) if len(vals) else ""


def _units(xy: np.ndarray, subunits, min_obs: int, sample: str):
    """Unit code per cell (-1: in a subunit with fewer than ``min_obs`` cells), unit names."""
    n = len(xy)
    if subunits is None:
        return np.zeros(n, dtype=np.int64), [""]
    size = np.atleast_1d(np.asarray(subunits, dtype=np.float64))
    if size.size not in (2, 3) or size.size > xy.shape[1] or not np.all(size > 0):
        raise InputError(f"sample {sample!r}: subunits must be 2 (squares) or 3 (cubes, 3-D coordinates) positive "
                         f"sizes, not {subunits!r} (coordinates have {xy.shape[1]} columns)")
    cell = np.floor((xy[:, : size.size] - xy[:, : size.size].min(axis=0)) / size).astype(np.int64)
    keys, inv = np.unique(cell, axis=0, return_inverse=True)
    inv = inv.ravel()
    sizes = np.bincount(inv, minlength=len(keys))
    ok = np.flatnonzero(sizes >= int(min_obs))
    if ok.size == 0:
        raise InputError(f"sample {sample!r}: no subunit of size {tuple(size)} holds {min_obs} or more cells "
                         f"(largest: {int(sizes.max())})")
    remap = np.full(len(keys), -1, dtype=np.int64)
    remap[ok] = np.arange(ok.size)
    names = ["_".join(str(int(v)) for v in keys[i]) for i in ok]
    return remap[inv], names


def _check_radii(radii, xy, sample) -> list[float]:
    rs = [float(r) for r in (np.atleast_1d(radii) if radii is not None else [])]
    if any(not r > 0 or not np.isfinite(r) for r in rs):
        raise InputError(f"radii must be positive numbers, not {radii!r}")
    ext = extent(xy)
    for r in rs:
        if r > ext.max():
            raise InputError(f"radius {r:g} is larger than sample {sample!r}, whose extent is "
                             f"{' x '.join(f'{e:g}' for e in ext)}")
    return rs


def _tidy(rows: list, stat: str, radius: float, arr: np.ndarray, cats: list[str]) -> None:
    """Append (statistic, radius, unit, label_a, label_b, value) blocks of a (U,), (U, k) or (U, k, k) array."""
    u = arr.shape[0]
    k = len(cats)
    if arr.ndim == 2:
        ui, ai = np.divmod(np.arange(u * k), k)
        bi = np.full(ui.size, -1)
    else:
        ui, rest = np.divmod(np.arange(u * k * k), k * k)
        ai, bi = np.divmod(rest, k)
    rows.append(pd.DataFrame({"statistic": stat, "radius": radius, "unit": ui, "a": ai, "b": bi,
                              "value": arr.ravel()}))


def _radius_stats(rows, xy, codes, unit, n_units, k, cats, r, stats, n_perms, seed, device, area):
    src, dst, _ = KG.radius_edges(xy, r, device)
    same = unit[src] == unit[dst]
    src, dst = src[same], dst[same]
    counts = K.unit_pair_counts(src, dst, codes, unit, k, n_units)
    with np.errstate(invalid="ignore", divide="ignore"):
        if "interaction" in stats:
            _tidy(rows, "interaction", r, counts / counts.sum(axis=2, keepdims=True), cats)
        if "co_occurrence" in stats:
            col = counts.sum(axis=1)                                   # (U, k): R[b]
            tot = col.sum(axis=1)                                      # (U,)
            occ = counts * tot[:, None, None] / (col[:, :, None] * col[:, None, :])
            _tidy(rows, "co_occurrence", r, occ, cats)
        if "ripley_L" in stats:
            n_u = np.bincount(unit, minlength=n_units).astype(np.float64)
            kk = np.diagonal(counts, axis1=1, axis2=2) * (area / n_u ** 2)[:, None]
            _tidy(rows, "ripley_L", r, np.sqrt(kk / np.pi), cats)
    if "nhood_enrichment" in stats:
        _tidy(rows, "nhood_enrichment", r, K.unit_enrichment(src, dst, codes, unit, k, n_units, n_perms, seed), cats)
    if "moran" in stats:
        _tidy(rows, "moran", r, K.unit_moran(src, dst, codes, unit, k, n_units), cats)
    if {"degree_centrality", "average_clustering", "components"} & set(stats):
        import scipy.sparse as sp

        a = K.undirected(sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(codes.size, codes.size)))
        if "degree_centrality" in stats:
            _tidy(rows, "degree_centrality", r, K.unit_degree(a, codes, unit, k, n_units), cats)
        if "average_clustering" in stats:
            _tidy(rows, "average_clustering", r,
                  K.unit_label_mean(K.local_clustering(a), codes, unit, k, n_units), cats)
        if "components" in stats:
            _tidy(rows, "components", r, K.unit_components(a, codes, unit, k, n_units), cats)


def _one_sample(name, adata, cats, cluster_key, radii, subunits, min_obs, stats, n_perms, seed, spatial_key,
                device) -> pd.DataFrame:
    lab = read_labels(adata, cluster_key, min_obs=2, sample=name, func="spatial_graph_stats")
    xy_all = read_coords(adata, spatial_key, sample=name, func="spatial_graph_stats")
    rs = _check_radii(radii, xy_all, name)
    xy = xy_all[lab.keep]
    codes = pd.Index(cats).get_indexer(lab.categories)[lab.codes]
    unit, names = _units(xy, subunits, min_obs, name)
    sel = unit >= 0
    xy, codes, unit = xy[sel], codes[sel], unit[sel]
    n_units, k = len(names), len(cats)
    area = np.array([K.hull_measure(xy[unit == u]) for u in range(n_units)])  # over units
    rows: list = []
    counts = K.unit_label_counts(codes, unit, k, n_units)
    n_u = counts.sum(axis=1)
    if "proportion" in stats:
        _tidy(rows, "proportion", np.nan, counts / n_u[:, None], cats)
    if "density" in stats:
        _tidy(rows, "density", np.nan, counts / area[:, None], cats)
    for i, r in enumerate(rs):  # over the radii
        _radius_stats(rows, xy, codes, unit, n_units, k, cats, r, stats, n_perms, seed + i, device, area)
    df = pd.concat(rows, ignore_index=True)
    # labels left out for having a single cell are missing here, not 0 (labels with no cell keep proportion 0)
    gone = pd.Index(cats).get_indexer([c for c, n in lab.excluded.items() if n > 0])
    drop = np.isin(df["a"].to_numpy(), gone) | np.isin(df["b"].to_numpy(), gone)
    df = df[np.isfinite(df["value"].to_numpy()) & ~drop]
    cat_names = np.asarray(cats + [""], dtype=object)
    return pd.DataFrame({
        "sample": name, "subunit": np.asarray(names, dtype=object)[df["unit"].to_numpy()],
        "n_obs": n_u[df["unit"].to_numpy()].astype(np.int64), "statistic": df["statistic"].to_numpy(),
        "radius": df["radius"].to_numpy(), "label_a": cat_names[df["a"].to_numpy()],
        "label_b": cat_names[df["b"].to_numpy()], "value": df["value"].to_numpy()})


def spatial_graph_stats(adatas, *, cluster_key: str, radii=(25, 50), subunits=None, min_obs_per_subunit: int = 10,
                        statistics=None, n_perms: int = 100, spatial_key: str = "spatial", group_key: str = "group",
                        batch_key: str = "batch", seed: int | None = None, use_gpu: bool = False) -> pd.DataFrame:
    """Label statistics of every sample (or subunit) in one tidy table, for comparisons between samples.

    Per sample (``adatas``: ``{sample: AnnData}`` or one AnnData) and, with ``subunits=(w, h)`` (or
    ``(w, h, d)`` for 3-D coordinates), per square / cube of that size holding ``min_obs_per_subunit`` cells
    or more, and per radius r of ``radii`` (a radius graph: all pairs closer than r, inside one unit):

    - ``proportion`` and ``density`` (cells per unit of convex hull area) of each label (no radius);
    - ``interaction``: the fraction of a label's neighbours that are of label b;
    - ``co_occurrence``: ``P(a | b) / P(a)`` over the pairs closer than r (squidpy's ratio at one distance);
    - ``nhood_enrichment``: z-score of the a-b edge count against ``n_perms`` label shuffles inside the unit;
    - ``degree_centrality``, ``average_clustering``: squidpy's centrality scores per label;
    - ``moran``: Moran's I of the label indicator; ``components``: connected pieces per cell of the label;
    - ``ripley_L``: Ripley's L of the label at r (K normalised by all cells of the unit, as squidpy).

    ``statistics``: a subset of :data:`STATISTICS` (None: all). Labels are the union of all samples'
    categories of ``obs[cluster_key]`` (natural order); a label with fewer than 2 cells in a sample is left out
    there (warned). A radius larger than a sample's extent is an error. Group and batch come from the first
    value of ``obs[group_key]`` / ``obs[batch_key]`` (expkit puts the sample table's columns there).

    Returns a DataFrame with columns :data:`TABLE_COLUMNS` (``subunit`` "" without subunits, ``radius`` NaN
    and ``label_b`` "" where they do not apply; undefined values, e.g. of a label absent from a subunit, are
    left out). Nothing is written to the AnnData. Memory: one sample's radius graph at a time.
    """
    if not isinstance(adatas, Mapping):
        from .stats_common import sample_of

        adatas = {sample_of(adatas) or "sample": adatas}
    if not adatas:
        raise InputError("spatial_graph_stats needs at least one sample")
    stats = list(STATISTICS) if statistics is None else ([statistics] if isinstance(statistics, str)
                                                         else list(statistics))
    bad = [s for s in stats if s not in STATISTICS]
    if bad or not stats:
        raise InputError(f"unknown statistic(s) {bad or stats}; choose from {list(STATISTICS)}")
    if not [s for s in stats if s not in _RADIUS_FREE] or radii is None:
        radii = [] if radii is None else radii
    seed = settings.seed if seed is None else int(seed)
    cats = []
    for name, ad in adatas.items():  # the label union first, so that every sample uses the same codes
        read_labels(ad, cluster_key, min_obs=0, sample=name, func="spatial_graph_stats")
        cats.extend(str(c) for c in ad.obs[cluster_key].cat.categories)
    cats = _natural(cats)
    device = resolve_device(use_gpu)
    frames = []
    for name, ad in adatas.items():  # over samples: the graph of one sample in memory at a time
        df = _one_sample(name, ad, cats, cluster_key, radii, subunits, min_obs_per_subunit, stats, int(n_perms),
                         seed, spatial_key, device)
        df.insert(1, "group", _meta(ad, group_key))
        df.insert(2, "batch", _meta(ad, batch_key))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for c in ("sample", "group", "batch", "subunit", "statistic", "label_a", "label_b"):
        out[c] = out[c].astype("category")
    return out[list(TABLE_COLUMNS)]
