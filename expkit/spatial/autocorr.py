"""Global spatial autocorrelation of genes: ``spatial_autocorr`` (Moran's I, Geary's C)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels import autocorr as K
from ..kernels.device import resolve_device

__all__ = ["spatial_autocorr"]

_STAT = {"moran": "I", "geary": "C"}
_DEFAULT_KEY = {"moran": "moranI", "geary": "gearyC"}


def _version() -> str:
    from .. import __version__

    return __version__


def _resolve_genes(adata, genes) -> np.ndarray:
    """Column positions of ``genes`` (var_names or symbols in var['gene']); all genes when None."""
    if genes is None:
        return np.arange(adata.n_vars)
    if isinstance(genes, str):
        genes = [genes]
    genes = list(genes)
    names = pd.Index(adata.var_names)
    pos = names.get_indexer(genes)
    missing = pos < 0
    if missing.any() and "gene" in adata.var:
        sym = pd.Series(np.arange(adata.n_vars), index=adata.var["gene"].astype(str).to_numpy())
        sym = sym[~sym.index.duplicated(keep="first")]
        alt = sym.reindex([genes[i] for i in np.nonzero(missing)[0]]).to_numpy()
        found = ~pd.isna(alt)
        idx = np.nonzero(missing)[0]
        pos[idx[found]] = alt[found].astype(np.int64)
        missing = pos < 0
    if missing.any():
        bad = [genes[i] for i in np.nonzero(missing)[0][:10]]
        raise KeyNotFoundError(f"{int(missing.sum())} gene(s) are neither var_names nor symbols in "
                               f"var['gene']: {bad}")
    return pos


def spatial_autocorr(adata, *, mode: str = "moran", layer: str | None = None, genes=None,
                     connectivity_key: str = "spatial.connectivities", transformation: bool = True,
                     n_perms: int | None = None, two_tailed: bool = False, corr_method: str | None = "fdr_bh",
                     seed: int | None = None, use_gpu: bool = False, key_added: str | None = None,
                     chunk_bytes: int = 1 << 28) -> pd.DataFrame:
    """Moran's I or Geary's C of every gene over the spatial graph, with analytic (and permutation) p-values.

    Parameters
    ----------
    mode
        ``"moran"`` (I, large = clustered) or ``"geary"`` (C, small = clustered).
    layer
        Values to test (``None``: ``X``). Use normalised, log-transformed values, as for squidpy.
    genes
        var_names or symbols (``var['gene']``); ``None``: all genes.
    connectivity_key
        ``obsp`` key of the weights (from :func:`expkit.spatial.spatial_neighbors`).
    transformation
        Row-normalise the weights (each row sums to 1), as squidpy does.
    n_perms
        Also compute permutation p-values from this many row permutations (same permutation for all genes,
        seeded by ``seed``; many permutations per sparse product).
    two_tailed
        Two-sided p-values (default: one-sided in the direction of the observed deviation, as squidpy).
    corr_method
        ``"fdr_bh"`` adds Benjamini-Hochberg columns ``<pval column>_fdr_bh``; ``None`` skips them.

    The analytic p-value ``pval_norm`` uses the expectation and variance under the normality assumption
    (Cliff & Ord 1981), the same definition as squidpy's ``pval_norm`` / ``var_norm`` (one variance for all
    genes); ``pval_rand`` / ``var_rand`` use the randomization assumption (per gene, through its kurtosis).

    Writes ``uns[key_added]`` (default ``"moranI"`` / ``"gearyC"``): a DataFrame indexed by var_names with
    columns ``I`` (or ``C``), ``pval_norm``, ``var_norm``, ``pval_rand``, ``var_rand``, with permutations
    ``pval_z_sim``, ``pval_sim``, ``var_sim``, then the BH columns, plus ``gene`` (symbol) when var has it,
    sorted like squidpy (I descending, C ascending); ``uns[f"{key_added}.params"]``; and var columns
    ``<key_added>.I`` (or ``.C``), ``<key_added>.pval`` (pval_norm), ``<key_added>.padj`` (its BH), NaN for
    genes not tested. Returns the DataFrame.
    """
    if mode not in _STAT:
        raise InputError(f"mode must be 'moran' or 'geary', not {mode!r}")
    if corr_method not in (None, "fdr_bh"):
        raise InputError(f"corr_method must be 'fdr_bh' or None, not {corr_method!r}")
    if connectivity_key not in adata.obsp:
        raise KeyNotFoundError(f"obsp[{connectivity_key!r}] is absent: run spatial_neighbors first "
                               f"(obsp keys: {list(adata.obsp.keys())})")
    if layer is None:
        x = adata.X
    else:
        if layer not in adata.layers:
            raise KeyNotFoundError(f"layer {layer!r} is absent (layers: {list(adata.layers.keys())})")
        x = adata.layers[layer]
    if x is None:
        raise InputError("adata.X is empty; pass layer=")
    n = adata.n_obs
    if n < 4:
        raise InputError(f"spatial autocorrelation needs at least 4 observations, got {n}")
    pos = _resolve_genes(adata, genes)
    if len(pos) < adata.n_vars or not np.array_equal(pos, np.arange(adata.n_vars)):
        x = x[:, pos]
    if not sp.issparse(x):
        x = np.asarray(x)
    if n_perms is not None and int(n_perms) < 1:
        raise InputError(f"n_perms must be a positive integer or None, not {n_perms!r}")
    seed = settings.seed if seed is None else int(seed)
    key_added = key_added or _DEFAULT_KEY[mode]
    stat = _STAT[mode]

    w = sp.csr_matrix(adata.obsp[connectivity_key], dtype=np.float64)
    w = K.row_normalize(w) if transformation else w
    if w.sum() == 0:
        raise InputError(f"obsp[{connectivity_key!r}] has no edges")
    device = resolve_device(use_gpu)
    res = K.autocorr_scores(x, w, device, mode=mode, chunk_bytes=chunk_bytes)
    score = res["score"]
    s0, s1, s2 = K.weight_moments(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        kurt = n * res["z4"] / (res["z2"] ** 2)
    expected, var_norm, var_rand = K.analytic_moments(mode, n, s0, s1, s2, kurt)
    cols = {stat: score,
            "pval_norm": K.normal_pvalue(score, expected, var_norm, two_tailed),
            "var_norm": np.full(score.shape, var_norm),
            "pval_rand": K.normal_pvalue(score, expected, var_rand, two_tailed),
            "var_rand": var_rand}
    if n_perms is not None:
        sims = K.autocorr_permutation_scores(x, w, device, n_perms=int(n_perms), seed=seed, mode=mode,
                                             chunk_bytes=chunk_bytes)
        cols.update(K.permutation_pvalues(score, sims, two_tailed))
    if corr_method is not None:
        for c in [c for c in cols if c.startswith("pval")]:
            cols[f"{c}_{corr_method}"] = K.fdr_bh(cols[c])
    df = pd.DataFrame(cols, index=pd.Index(np.asarray(adata.var_names)[pos], name=None))
    if "gene" in adata.var:
        df.insert(0, "gene", adata.var["gene"].astype(str).to_numpy()[pos])
    df = df.sort_values(stat, ascending=(mode == "geary"), kind="mergesort", na_position="last")

    adata.uns[key_added] = df
    params = {"mode": mode, "connectivity_key": connectivity_key, "transformation": bool(transformation),
              "two_tailed": bool(two_tailed), "n_genes": int(len(pos)), "seed": int(seed),
              "use_gpu": bool(use_gpu), "expected": float(expected)}
    if layer is not None:
        params["layer"] = layer
    if n_perms is not None:
        params["n_perms"] = int(n_perms)
    if corr_method is not None:
        params["corr_method"] = corr_method
    adata.uns[f"{key_added}.params"] = {"params": params, "version": _version()}
    for suffix, values in ((stat, score), ("pval", cols["pval_norm"]),
                           ("padj", cols.get("pval_norm_fdr_bh"))):
        if values is None:
            continue
        full = np.full(adata.n_vars, np.nan)
        full[pos] = values
        adata.var[f"{key_added}.{suffix}"] = full
    logger.debug(f"spatial_autocorr: {mode} on {len(pos)} genes, {n} observations")
    return df
