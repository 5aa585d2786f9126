"""From the tidy statistics table of :func:`expkit.spatial.cohort.spatial_graph_stats` to samples: an embedding of
samples (or subunits) by their statistics, and the statistics that differ between groups of samples."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
import torch

from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels import rank_tests as R
from ..kernels.autocorr import fdr_bh

__all__ = ["feature_matrix", "sample_embedding", "compare_groups", "FEATURE_KEYS"]

FEATURE_KEYS = ("statistic", "radius", "label_a", "label_b")
_UNIT_KEYS = ("sample", "subunit")


def _check_table(stats) -> pd.DataFrame:
    if not isinstance(stats, pd.DataFrame):
        raise InputError(f"expected the DataFrame of spatial_graph_stats, got {type(stats).__name__}")
    need = set(FEATURE_KEYS) | {"sample", "value"}
    missing = sorted(need - set(stats.columns))
    if missing:
        raise KeyNotFoundError(f"the statistics table lacks column(s) {missing} (columns: {list(stats.columns)}); "
                               f"make it with spatial_graph_stats")
    return stats


def _feature_names(cols: pd.MultiIndex) -> list[str]:
    out = []
    for stat, radius, a, b in cols:
        r = "" if pd.isna(radius) else f"@{radius:g}"
        out.append(f"{stat}{r}:{a}" + (f"|{b}" if str(b) else ""))
    return out


def feature_matrix(stats: pd.DataFrame, *, statistics=None, by=("sample", "subunit"), aggregate: str = "mean"):
    """Wide table: one row per unit (``by``: sample and subunit, or only sample, averaging its subunits with
    ``aggregate``), one column per (statistic, radius, label_a, label_b); plus the units' metadata."""
    stats = _check_table(stats)
    if statistics is not None:
        keep = [statistics] if isinstance(statistics, str) else list(statistics)
        stats = stats[stats["statistic"].isin(keep)]
        if stats.empty:
            raise InputError(f"no rows of the statistics {keep} in the table")
    by = [b for b in by if b in stats.columns]
    df = stats.assign(radius=stats["radius"].fillna(-1.0))
    wide = df.pivot_table(index=by, columns=list(FEATURE_KEYS), values="value", aggfunc=aggregate, observed=True)
    wide = wide.rename(columns=lambda v: np.nan if isinstance(v, float) and v == -1.0 else v, level="radius")
    meta_cols = [c for c in ("group", "batch") if c in stats.columns]
    meta = df.groupby(by, observed=True)[meta_cols + (["n_obs"] if "n_obs" in df else [])].first()
    meta = meta.reindex(wide.index)
    return wide, meta


def _impute_scale(x: np.ndarray, max_missing: float):
    """Drop columns missing in more than ``max_missing`` of the rows or constant; impute the column mean;
    standardise (ddof=1)."""
    miss = np.isnan(x).mean(axis=0)
    x = x[:, miss <= max_missing]
    keep = miss <= max_missing
    mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), mean[None, :], x)
    sd = x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
    ok = sd > 1e-12
    idx = np.flatnonzero(keep)[ok]
    return (x[:, ok] - mean[ok]) / sd[ok], idx


def _harmony(z: np.ndarray, batch: pd.Series, seed: int) -> np.ndarray:
    from ..kernels.harmony import harmony

    codes, uniq = pd.factorize(batch.astype(str))
    t = torch.as_tensor(z, dtype=torch.float64)
    out = harmony(t, torch.as_tensor(codes), len(uniq), generator=torch.Generator().manual_seed(seed),
                  n_clusters=max(1, min(len(z) // 5, 10)))
    return out["z"].cpu().numpy()


def sample_embedding(stats: pd.DataFrame, *, n_dim: int = 16, statistics=None, by=("sample", "subunit"),
                     batch_key: str | None = None, umap: bool = True, n_neighbors: int = 15,
                     max_missing: float = 0.5, seed: int | None = None, use_gpu: bool = False):
    """An embedding of the samples (or subunits) by their spatial statistics.

    The table of :func:`spatial_graph_stats` becomes a units x features matrix (:func:`feature_matrix`;
    ``by=("sample",)`` averages the subunits of each sample); features missing in more than ``max_missing`` of
    the units or constant are dropped, the rest mean-imputed and standardised; then PCA to ``n_dim``
    components (capped by the units and features), Harmony over the column ``batch_key`` of the table when
    given (and holding 2+ batches), and a UMAP of the kNN graph of the result (``umap=True``).

    Returns an AnnData: one row per unit, ``X`` the standardised features (``var`` names them:
    statistic, radius, label_a, label_b), ``obs`` (sample, subunit, group, batch, n_obs), ``obsm['pca']``,
    ``obsm['harmony']`` (with ``batch_key``), ``obsm['umap']``; plot it with :func:`expkit.pl.plot_embedding`
    or :func:`expkit.pl.stats.plot_sample_embedding`.
    """
    import anndata as ad

    from ..kernels.device import resolve_device
    from ..kernels.linalg import pca

    seed = settings.seed if seed is None else int(seed)
    wide, meta = feature_matrix(stats, statistics=statistics, by=by)
    if len(wide) < 3:
        raise InputError(f"sample_embedding needs at least 3 units (samples or subunits), got {len(wide)}")
    x, cols = _impute_scale(wide.to_numpy(dtype=np.float64), max_missing)
    if x.shape[1] < 2:
        raise InputError("fewer than 2 statistics vary between the units: nothing to embed")
    obs = meta.reset_index()
    obs.index = [" / ".join(str(v) for v in row if str(v)) for row in wide.index.to_flat_index()] \
        if isinstance(wide.index, pd.MultiIndex) else wide.index.astype(str)
    obs = obs.astype({c: str for c in obs.columns if c != "n_obs"})
    var_cols = wide.columns[cols]
    var = pd.DataFrame(var_cols.to_frame(index=False).astype({"radius": float}))
    var.index = _feature_names(var_cols)
    emb = ad.AnnData(X=x.astype(np.float64), obs=obs, var=var.astype({"statistic": str, "label_a": str,
                                                                      "label_b": str}))
    k = int(min(n_dim, x.shape[0] - 1, x.shape[1]))
    res = pca(x, k, solver="full" if x.shape[1] <= 2000 else "randomized", seed=seed,
              device=resolve_device(use_gpu))
    emb.obsm["pca"] = res["scores"]
    rep = "pca"
    if batch_key is not None:
        if batch_key not in obs.columns:
            raise KeyNotFoundError(f"batch_key {batch_key!r} is not a column of the table's units "
                                   f"({list(obs.columns)})")
        if obs[batch_key].nunique() > 1:
            emb.obsm["harmony"] = _harmony(res["scores"], obs[batch_key], seed)
            rep = "harmony"
    emb.uns["sample_embedding"] = {"params": {"n_dim": k, "by": list(by), "umap": bool(umap), "seed": seed,
                                              "max_missing": float(max_missing), "rep": rep,
                                              **({"batch_key": batch_key} if batch_key else {})},
                                   "variance_ratio": res["variance_ratio"]}
    if umap:
        from ..tl import knn, umap as run_umap

        knn(emb, n_neighbors=int(min(n_neighbors, len(emb) - 1)), use_rep=rep, use_gpu=use_gpu)
        run_umap(emb, seed=seed, init="spectral" if len(emb) > 10 else "random")
    return emb


# --------------------------------------------------------------------------------------------
# compare_groups
# --------------------------------------------------------------------------------------------
def _exact_pvalues(ranks: np.ndarray, n1: int, max_exact: int) -> np.ndarray | None:
    """Two-sided exact permutation p-values of the rank sum of the first ``n1`` columns (all splits of the
    columns enumerated; ties handled exactly); None when there are more than ``max_exact`` splits."""
    n = ranks.shape[1]
    if math.comb(n, n1) > max_exact:
        return None
    splits = np.zeros((math.comb(n, n1), n))
    rows = np.repeat(np.arange(splits.shape[0]), n1)
    splits[rows, np.fromiter((i for c in combinations(range(n), n1) for i in c), dtype=np.int64)] = 1.0
    null = splits @ ranks.T                                  # (splits, features)
    expected = n1 * (n + 1) / 2.0
    obs = ranks[:, :n1].sum(axis=1)
    dev = np.abs(obs - expected)
    return (np.abs(null - expected) >= dev[None, :] - 1e-9).mean(axis=0)


def _rank_test(x: np.ndarray, n1: int, max_exact: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(U of group 2, two-sided p, method) for features x (f x n), group 1 in the first n1 columns."""
    ranks, ties = R.average_ranks(torch.as_tensor(x, dtype=torch.float64))
    ranks, ties = ranks.numpy(), ties.numpy()
    n = x.shape[1]
    u2 = ranks[:, n1:].sum(axis=1) - (n - n1) * (n - n1 + 1) / 2.0
    p = _exact_pvalues(ranks, n1, max_exact)
    if p is not None:
        return u2, p, "exact"
    z = R.wilcoxon_z(ranks[:, :n1].sum(axis=1)[None, :], ties[None, :], np.array([n1]), np.array([n]))[0]
    return u2, R.normal_two_sided(z)[0], "normal"


def _two_groups(units: pd.DataFrame, group_key: str, groups) -> list[str]:
    present = sorted(units[group_key].dropna().astype(str).unique())
    if groups is None:
        if len(present) != 2:
            raise InputError(f"compare_groups: column {group_key!r} holds {len(present)} groups {present}; pass "
                             f"groups=(reference, other) to choose two")
        return present
    groups = [str(g) for g in groups]
    missing = [g for g in groups if g not in present]
    if len(groups) != 2 or missing:
        raise InputError(f"compare_groups: groups must name two of {present}, not {groups}")
    return groups


def compare_groups(stats: pd.DataFrame, *, group_key: str = "group", groups=None, statistics=None,
                   unit: str = "sample", min_per_group: int = 2, max_exact: int = 20000) -> pd.DataFrame:
    """Which statistics differ between two groups of samples: a rank-sum (Mann-Whitney) test per statistic,
    Benjamini-Hochberg across the statistics.

    ``unit="sample"`` (default): samples are the unit (subunits averaged within their sample first), so cells
    or subunits of one sample are never counted as replicates; ``"subunit"`` tests subunits (descriptive only:
    they are not independent). ``groups``: ``(reference, other)``, needed when the column holds more than two
    groups. p-values are exact (all splits enumerated, ties included) while there are at most ``max_exact``
    splits, otherwise the tie-corrected normal approximation. Statistics with fewer than ``min_per_group``
    units in a group are left out.

    Returns one row per statistic (statistic, radius, label_a, label_b): ``n_ref``, ``n_other``, ``mean_ref``,
    ``mean_other``, ``median_ref``, ``median_other``, ``diff`` (mean_other - mean_ref), ``auc`` (P(other >
    reference), ties half), ``pval``, ``qval``, ``method``; sorted by p-value.
    """
    stats = _check_table(stats)
    if group_key not in stats.columns:
        raise KeyNotFoundError(f"compare_groups: the table has no column {group_key!r} (columns: "
                               f"{list(stats.columns)})")
    if unit not in ("sample", "subunit"):
        raise InputError(f"compare_groups: unit must be 'sample' or 'subunit', not {unit!r}")
    wide, meta = feature_matrix(stats.assign(group=stats[group_key]), statistics=statistics,
                                by=("sample",) if unit == "sample" else ("sample", "subunit"))
    ref, other = _two_groups(meta, "group", groups)
    g = meta["group"].astype(str).to_numpy()
    order = np.concatenate([np.flatnonzero(g == ref), np.flatnonzero(g == other)])
    n1 = int((g == ref).sum())
    x = wide.to_numpy(dtype=np.float64)[order].T             # features x units, reference first
    nan = np.isnan(x)
    out = []
    patterns, inverse = np.unique(nan, axis=0, return_inverse=True)
    for pi, pat in enumerate(patterns):  # over missingness patterns (usually a few), all features of one at once
        fi = np.flatnonzero(inverse.ravel() == pi)
        cols = np.flatnonzero(~pat)
        m1 = int((cols < n1).sum())
        if m1 < min_per_group or cols.size - m1 < min_per_group:
            continue
        sub = x[np.ix_(fi, cols)]
        u2, p, method = _rank_test(sub, m1, max_exact)
        a, b = sub[:, :m1], sub[:, m1:]
        out.append(pd.DataFrame({"f": fi, "n_ref": m1, "n_other": cols.size - m1, "mean_ref": a.mean(1),
                                 "mean_other": b.mean(1), "median_ref": np.median(a, 1), "median_other": np.median(b, 1),
                                 "diff": b.mean(1) - a.mean(1), "auc": u2 / (m1 * (cols.size - m1)), "pval": p,
                                 "method": method}))
    if not out:
        raise InputError(f"compare_groups: no statistic has {min_per_group}+ units in both groups {ref!r} and "
                         f"{other!r} (units per group: {dict(pd.Series(g).value_counts())})")
    res = pd.concat(out, ignore_index=True)
    keys = wide.columns.to_frame(index=False).iloc[res["f"].to_numpy()].reset_index(drop=True)
    res = pd.concat([keys, res.drop(columns="f")], axis=1)
    res["qval"] = fdr_bh(res["pval"].to_numpy())
    res.attrs.update({"reference": ref, "other": other, "unit": unit})
    return res.sort_values(["pval", "statistic"], kind="mergesort").reset_index(drop=True)
