"""Quality-control metrics and filtering of observations and genes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels.stats import qc_metrics
from ._utils import as_csr, get_matrix, uns_entry

_FLAGS = ("mito", "ribo")


def _taxa_of(adata, taxa):
    if taxa is not None:
        return taxa
    if "taxa" in adata.obs:
        values = pd.unique(adata.obs["taxa"].astype(str))
        if len(values) == 1:
            return values[0]
        raise InputError(f"obs['taxa'] holds several taxa {list(values)}: pass taxa=")
    return None


def gene_flags(adata, taxa=None) -> dict[str, np.ndarray | None]:
    """Boolean mitochondrial / ribosomal flags of ``adata``'s genes.

    Taken from ``var['mito']`` / ``var['ribo']`` when present (``expkit.database.annotate`` writes
    them), else looked up in ``expkit.database.genes(taxa)`` (indexed by gene uid, columns ``gene``,
    ``mito``, ``ribo``) by ``var_names`` and, for genes not found by uid, by the ``var['gene']``
    symbol. A flag that cannot be resolved is None (with a warning).
    """
    flags: dict[str, np.ndarray | None] = {}
    missing = []
    for name in _FLAGS:
        if name in adata.var:
            flags[name] = adata.var[name].eq(True).to_numpy()
        else:
            missing.append(name)
    if not missing:
        return flags
    taxa = _taxa_of(adata, taxa)
    table = None
    why = ""
    if taxa is None:
        why = "no taxa given (taxa= or obs['taxa'])"
    else:
        try:
            from .. import database  # noqa: PLC0415 - optional until the database module lands

            table = database.genes(taxa)
        except ImportError as err:  # pragma: no cover - depends on the installed package
            why = f"expkit.database unavailable ({err})"
        except Exception as err:  # an unknown taxa, a missing table
            why = f"gene database lookup failed for taxa {taxa!r} ({err})"
    for name in missing:
        if table is None or name not in table:
            logger.warning(f"qc: no '{name}' flags: var['{name}'] absent and {why or f'no {name!r} column in the database'}; "
                           f"pct_{name} is NaN")
            flags[name] = None
            continue
        col = table[name].astype(bool)
        by_uid = pd.Series(adata.var_names).map(col)
        if "gene" in adata.var and "gene" in table:
            by_symbol = col.groupby(table["gene"].astype(str).to_numpy()).any()
            from_symbol = pd.Series(adata.var["gene"].astype(str).to_numpy()).map(by_symbol)
            by_uid = by_uid.where(by_uid.notna(), from_symbol)
        flags[name] = by_uid.eq(True).to_numpy()
    return flags


def qc(adata, *, layer: str | None = "counts", taxa=None, key_added: str = "qc") -> dict:
    """Per-observation and per-gene quality-control metrics.

    Writes obs columns ``<key>.n_counts`` (total counts), ``<key>.n_genes`` (detected genes),
    ``<key>.pct_mito`` and ``<key>.pct_ribo`` (percent of counts in mitochondrial / ribosomal genes,
    flags from :func:`gene_flags`, NaN when unavailable); var columns ``<key>.n_cells``,
    ``<key>.total_counts``, ``<key>.mean_counts``, ``<key>.pct_dropout``; and ``uns[key]`` with the
    params and the number of flagged genes. Returns a dict of medians.
    """
    x = as_csr(get_matrix(adata, layer))
    flags = gene_flags(adata, taxa)
    masks = {name: m for name, m in flags.items() if m is not None}
    obs, var = qc_metrics(x, masks)
    for name in _FLAGS:
        if flags.get(name) is None:
            obs[f"pct_{name}"] = np.full(adata.n_obs, np.nan)
    for what in ("n_counts", "n_genes", "pct_mito", "pct_ribo"):
        adata.obs[f"{key_added}.{what}"] = obs[what]
    for what, values in var.items():
        adata.var[f"{key_added}.{what}"] = values
    n_flagged = {f"n_{name}_genes": (int(flags[name].sum()) if flags.get(name) is not None else None)
                 for name in _FLAGS}
    adata.uns[key_added] = uns_entry({"layer": layer, "taxa": None if taxa is None else str(taxa)}, **n_flagged)
    summary = {"n_obs": adata.n_obs, "n_vars": adata.n_vars,
               **{f"median_{w}": float(np.median(obs[w])) if adata.n_obs else float("nan")
                  for w in ("n_counts", "n_genes", "pct_mito", "pct_ribo")}, **n_flagged}
    return summary


def filter(adata, *, min_counts: float | None = None, max_counts: float | None = None,
           min_genes: int | None = None, max_genes: int | None = None,
           max_pct_mito: float | None = None, max_pct_ribo: float | None = None,
           min_cells: int | None = None, min_gene_counts: float | None = None,
           layer: str | None = "counts", taxa=None, key: str = "qc"):
    """Remove low-quality observations, then rarely detected genes; return the filtered AnnData.

    Observations are kept when ``min_counts <= total <= max_counts``, ``min_genes <= detected <=
    max_genes``, ``pct_mito <= max_pct_mito`` and ``pct_ribo <= max_pct_ribo`` (None: no bound), all
    computed from ``layer`` (mito/ribo flags as in :func:`qc`). Genes are then kept when detected in at
    least ``min_cells`` of the kept observations and with at least ``min_gene_counts`` counts there.

    AnnData cannot drop rows in place, so this returns a new AnnData (the input is untouched). Used on an
    Experiment, the dispatcher stores the returned AnnData as the sample in place of the old one (and
    marks it changed for ``save()``). When ``uns[key]`` exists (``qc`` ran before), the qc metrics of the
    result are recomputed with the same params, since totals change when genes go. ``uns['filter']``
    records the params and what was removed; the same numbers are logged.
    """
    x = as_csr(get_matrix(adata, layer))
    masks = {}
    if max_pct_mito is not None or max_pct_ribo is not None:
        flags = gene_flags(adata, taxa)
        for name, bound in (("mito", max_pct_mito), ("ribo", max_pct_ribo)):
            if bound is not None:
                if flags.get(name) is None:
                    raise KeyNotFoundError(f"filter: max_pct_{name} given but no '{name}' gene flags "
                                           f"(var['{name}'] absent and no database lookup; pass taxa=)")
                masks[name] = flags[name]
    obs, _ = qc_metrics(x, masks)
    keep_obs = np.ones(adata.n_obs, dtype=bool)
    for values, lo, hi in ((obs["n_counts"], min_counts, max_counts), (obs["n_genes"], min_genes, max_genes),
                           (obs.get("pct_mito"), None, max_pct_mito), (obs.get("pct_ribo"), None, max_pct_ribo)):
        if lo is not None:
            keep_obs &= values >= lo
        if hi is not None:
            keep_obs &= values <= hi
    x_kept = x[keep_obs]
    _, var = qc_metrics(x_kept)
    keep_var = np.ones(adata.n_vars, dtype=bool)
    if min_cells is not None:
        keep_var &= var["n_cells"] >= min_cells
    if min_gene_counts is not None:
        keep_var &= var["total_counts"] >= min_gene_counts
    total = float(obs["n_counts"].sum())
    counts_obs = total - float(obs["n_counts"][keep_obs].sum())
    counts_var = float(var["total_counts"][~keep_var].sum())
    removed = {"n_obs": int((~keep_obs).sum()), "n_vars": int((~keep_var).sum()),
               "counts_with_obs": counts_obs, "counts_with_vars": counts_var,
               "pct_counts": 100.0 * (counts_obs + counts_var) / total if total > 0 else 0.0}
    logger.info(f"filter: removed {removed['n_obs']:,} of {adata.n_obs:,} observations "
                f"({counts_obs:,.0f} counts) and {removed['n_vars']:,} of {adata.n_vars:,} genes "
                f"({counts_var:,.0f} counts); {removed['pct_counts']:.2f}% of the counts removed")
    if keep_obs.all() and keep_var.all():
        out = adata.copy()
    else:
        out = adata[keep_obs, keep_var].copy()
    params = {"min_counts": min_counts, "max_counts": max_counts, "min_genes": min_genes,
              "max_genes": max_genes, "max_pct_mito": max_pct_mito, "max_pct_ribo": max_pct_ribo,
              "min_cells": min_cells, "min_gene_counts": min_gene_counts, "layer": layer,
              "taxa": None if taxa is None else str(taxa), "key": key}
    out.uns["filter"] = uns_entry({k: v for k, v in params.items() if v is not None}, removed=removed)
    if key in adata.uns and isinstance(adata.uns[key], dict) and "params" in adata.uns[key]:
        p = dict(adata.uns[key]["params"])
        qc(out, layer=p.get("layer", layer), taxa=p.get("taxa", taxa), key_added=key)
    return out
