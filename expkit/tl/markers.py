"""Differential expression of groups of cells: one-vs-rest (or vs a reference group) marker genes.

``markers`` tests every gene at once (kernels in :mod:`expkit.kernels.rank_tests`) and stores one long
table in ``uns[key_added]["results"]`` (a pandas DataFrame: HDF5/zarr safe, anndata writes it as a
dataframe); ``get_markers`` reads it back as a tidy, filtered, sorted table.

Statistics per group and gene (``in`` = the group's cells, ``out`` = the rest or the reference group):

* ``score``: the z-score of the Wilcoxon rank-sum statistic (tie-corrected variance) or Welch's t.
* ``p``: two-sided p-value (normal approximation for Wilcoxon, Student t with Welch-Satterthwaite degrees
  of freedom for the t-test); ``log10.p`` is exact where ``p`` underflows to 0.
* ``q``: Benjamini-Hochberg over all genes of the group; ``log10.q`` likewise exact.
* ``fc``: log2 fold change of the layer read as log1p data, the definition scanpy uses for
  ``logfoldchanges``: ``log2((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9))``, where ``mean_*`` is
  the mean of the (log) layer. It is the ratio of the geometric-like means ``expm1(mean(log1p x))``, not of
  the arithmetic means of the counts.
* ``pct.in`` / ``pct.out``: fraction of cells with a value > 0 in / out of the group.
* ``mean.in`` / ``mean.out``: means of the layer.

With ``reference="rest"``, cells whose ``groupby`` value is missing belong to the rest of every group
(as in scanpy); with a named reference, only the group and the reference cells are used.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels import rank_tests as rt
from ..kernels.device import resolve_device

_LOG10 = np.log(10.0)
_METHODS = ("wilcoxon", "t-test")
COLUMNS = ("group", "uid", "gene", "score", "fc", "p", "q", "log10.p", "log10.q", "pct.in", "pct.out",
           "mean.in", "mean.out")


def _layer(adata, layer):
    if layer is None or layer == "X":
        return adata.X
    if layer not in adata.layers:
        raise KeyNotFoundError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})")
    return adata.layers[layer]


def markers(adata, *, groupby: str, groups="all", reference: str = "rest", method: str = "wilcoxon",
            layer: str | None = "lognorm", use_gpu: bool = False, tie_correct: bool = True,
            key_added: str = "markers", memory_budget: int = rt.DEFAULT_MEMORY_BUDGET) -> pd.DataFrame:
    """Marker genes of each group of ``obs[groupby]`` against the rest (or a ``reference`` group).

    Parameters
    ----------
    groupby : obs column of group labels (categorical or not; missing values belong to no group).
    groups : "all" or a list of groups to test.
    reference : "rest" or the name of one group to compare every other group with.
    method : "wilcoxon" (rank-sum, normal approximation) or "t-test" (Welch's).
    layer : layer of log1p-normalised data (None or "X" for ``adata.X``).
    tie_correct : tie-corrected variance of the rank-sum statistic.
    memory_budget : bytes for one dense chunk of genes and its temporaries while ranking.

    Writes ``uns[key_added] = {"params", "version", "groups", "results"}`` (``results``: the long table,
    genes in ``var`` order within each group) and returns a summary: per group the number of cells and of
    genes with ``q < 0.05`` and a positive ``fc``.
    """
    if method not in _METHODS:
        raise InputError(f"method must be one of {_METHODS}, not {method!r}")
    if groupby not in adata.obs:
        raise KeyNotFoundError(f"obs column {groupby!r} not found (available: {list(adata.obs.columns)})")
    X = _layer(adata, layer)
    if sp.issparse(X):
        X = sp.csc_matrix(X)  # gene chunks are column slices
    labels = adata.obs[groupby]
    cats = (list(labels.cat.categories) if isinstance(labels.dtype, pd.CategoricalDtype)
            else sorted(pd.unique(labels.dropna()), key=str))
    observed = set(labels.dropna().unique())
    cats = [c for c in cats if c in observed]
    values = labels.to_numpy()
    if groups == "all" or groups is None:
        tested = list(cats)
    else:
        tested = [groups] if isinstance(groups, str) else list(groups)
        str_cats = {str(c): c for c in cats}
        missing = [g for g in tested if g not in cats and str(g) not in str_cats]
        if missing:
            raise InputError(f"groups {missing} not found in obs[{groupby!r}] (values: {cats})")
        tested = [g if g in cats else str_cats[str(g)] for g in tested]
    ref_value = None
    if reference != "rest":
        str_cats = {str(c): c for c in cats}
        if reference not in cats and str(reference) not in str_cats:
            raise InputError(f"reference {reference!r} not found in obs[{groupby!r}] (values: {cats})")
        ref_value = reference if reference in cats else str_cats[str(reference)]
        tested = [g for g in tested if g != ref_value]
    if not tested:
        raise InputError("no group left to test")

    in_masks = np.stack([values == g for g in tested])
    n_in = in_masks.sum(1)
    if ref_value is None:
        out_masks = ~in_masks
    else:
        out_masks = np.broadcast_to(values == ref_value, in_masks.shape).copy()
    n_out = out_masks.sum(1)
    small = [str(g) for g, a, b in zip(tested, n_in, n_out) if a < 2 or b < 2]
    if small:
        logger.warning(f"markers: groups {small} (or their reference) have fewer than 2 cells")
    if method == "wilcoxon":  # raises ResourceError before any work when one gene cannot be ranked
        rt.chunk_size(int(X.shape[0] if ref_value is None else (in_masks | out_masks).sum(1).max()), X.shape[1],
                      memory_budget=memory_budget)
    device = resolve_device(use_gpu)
    logger.info(f"markers: {method} on {len(tested)} groups x {X.shape[1]} genes ({device})")

    # per group and reference: sums, sums of squares and non-zero counts in one pass over gene chunks
    masks = np.concatenate([in_masks, out_masks if ref_value is None else (values == ref_value)[None]])
    stats = rt.group_stats(X, masks, device, memory_budget=memory_budget)
    k = len(tested)
    mean_in, var_in, _ = rt.mean_var(stats, slice(0, k))
    rows_out = slice(k, 2 * k) if ref_value is None else np.zeros(k, dtype=int) + k
    mean_out, var_out, _ = rt.mean_var(stats, rows_out)
    pct_in = stats["npos"][:k] / n_in[:, None]
    pct_out = stats["npos"][rows_out] / np.maximum(n_out, 1)[:, None]

    if method == "wilcoxon":
        rsum, tsum, n_ranked = rt.rank_sums(X, in_masks, None if ref_value is None else out_masks, device,
                                            memory_budget=memory_budget)
        score = rt.wilcoxon_z(rsum, tsum, n_in, n_ranked, tie_correct=tie_correct)
        p, logp = rt.normal_two_sided(score)
    else:
        score, df = rt.welch(mean_in, var_in, n_in[:, None], mean_out, var_out, n_out[:, None])
        p, logp = rt.t_two_sided(score, df)
    score = np.where(np.isnan(score), 0.0, score)
    logq = rt.bh_log(logp)
    q = np.exp(logq)
    with np.errstate(over="ignore"):
        fc = np.log2((np.expm1(mean_in) + 1e-9) / (np.expm1(mean_out) + 1e-9))

    n_genes = X.shape[1]
    uid = np.asarray(adata.var_names, dtype=object)
    symbol = (adata.var["gene"].astype(str).to_numpy() if "gene" in adata.var
              else uid)
    group_labels = [str(g) for g in tested]
    results = pd.DataFrame({
        "group": pd.Categorical(np.repeat(group_labels, n_genes), categories=group_labels),
        "uid": np.tile(uid, k).astype(str),
        "gene": np.tile(np.asarray(symbol, dtype=object), k).astype(str),
        "score": score.ravel(),
        "fc": fc.ravel(),
        "p": p.ravel(),
        "q": q.ravel(),
        "log10.p": (logp / _LOG10).ravel(),
        "log10.q": (logq / _LOG10).ravel(),
        "pct.in": pct_in.ravel(),
        "pct.out": pct_out.ravel(),
        "mean.in": mean_in.ravel(),
        "mean.out": mean_out.ravel(),
    })
    params = {"groupby": groupby, "groups": np.asarray(group_labels, dtype=str), "reference": str(reference),
              "method": method, "layer": "X" if layer is None else str(layer), "tie_correct": bool(tie_correct),
              "fc": "log2((expm1(mean.in) + 1e-9) / (expm1(mean.out) + 1e-9))"}
    adata.uns[key_added] = {
        "params": params,
        "version": __version__,
        "groups": pd.DataFrame({"group": group_labels, "n.in": n_in.astype(np.int64),
                                "n.out": n_out.astype(np.int64)}),
        "results": results,
    }
    summary = pd.DataFrame({
        "n.in": n_in, "n.out": n_out,
        "n.markers": ((q < 0.05) & (fc > 0)).sum(1),
    }, index=pd.Index(group_labels, name="group"))
    return summary


def get_markers(adata, *, slot: str = "markers", group_name, min_pct: float = 0.0, max_q: float = 1.0,
                min_fc: float | None = None, only_positive: bool = False,
                n_genes: int | None = None) -> pd.DataFrame:
    """The markers of one group as a tidy table, sorted by decreasing score.

    Columns ``gene, uid, pct.in, pct.out, fc, p, q, log10.q, score``; ``gene`` is ``var["gene"]`` where
    present, else the uid. Filters: ``pct.in >= min_pct``, ``q <= max_q``, ``fc >= min_fc`` (when given),
    ``score > 0`` (``only_positive``); ``n_genes`` keeps the first rows.
    """
    if slot not in adata.uns or "results" not in adata.uns[slot]:
        raise KeyNotFoundError(f"uns[{slot!r}] holds no marker results: run expkit.tl.markers first")
    res = adata.uns[slot]["results"]
    groups = [str(g) for g in pd.unique(res["group"])]
    if str(group_name) not in groups:
        raise KeyNotFoundError(f"group {group_name!r} not in uns[{slot!r}] (groups: {groups})")
    df = res[res["group"].astype(str) == str(group_name)]
    keep = (df["pct.in"].to_numpy() >= min_pct) & (df["q"].to_numpy() <= max_q)
    if min_fc is not None:
        keep &= df["fc"].to_numpy() >= min_fc
    if only_positive:
        keep &= df["score"].to_numpy() > 0
    df = df[keep]
    order = np.lexsort((df["log10.p"].to_numpy(), -df["score"].to_numpy()))
    df = df.iloc[order]
    if n_genes is not None:
        df = df.iloc[:n_genes]
    cols = ["gene", "uid", "pct.in", "pct.out", "fc", "p", "q", "log10.q", "score"]
    return df[cols].reset_index(drop=True)
