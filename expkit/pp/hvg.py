"""Highly variable genes (Seurat v3 variance-stabilising transformation)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels.device import resolve_device
from ..kernels.hvg import seurat_v3
from ._utils import as_csr, get_matrix, looks_like_counts, uns_entry


def select_hvg(adata, *, layer: str | None = "counts", n_top_genes: int = 2000, batch_key: str | None = None,
               key_added: str = "vst", span: float = 0.3, surface: str = "interpolate",
               batch_rank: str = "nbatches", use_gpu: bool = False) -> pd.DataFrame:
    """Select highly variable genes by the Seurat v3 VST (Stuart et al. 2019) on raw counts.

    Per batch (``obs[batch_key]``, None: all observations) a degree-2 loess (``span``) of log10
    variance on log10 mean gives each gene's expected standard deviation; counts are standardised by
    it, clipped at sqrt(n_obs of the batch) and their variance is the gene's standardised variance.
    With ``batch_rank="nbatches"`` (default, Seurat v3 ``SelectIntegrationFeatures``; scanpy flavor
    ``"seurat_v3_paper"``) genes are ranked by the number of batches where they are in the top
    ``n_top_genes``, then by their median rank in those batches; ``"median_rank"`` ranks by the median
    rank first, then the number of batches (scanpy flavor ``"seurat_v3"``). The first ``n_top_genes``
    are selected. With one batch both orders are the same. ``surface``:
    ``"interpolate"`` (the reference loess, default) or ``"direct"`` (exact local fits).

    Writes var ``<key>.means``, ``<key>.vars`` (float64, all observations), ``<key>.vars.norm``
    (float64, mean over batches), ``<key>.hvg.rank`` (float32: median within-batch rank, 0 = most
    variable, NaN outside every batch's top genes), ``<key>.hvg`` (bool), ``<key>.hvg.nbatches``
    (with a ``batch_key``), and ``uns[key]`` (params). Returns the selected genes as a DataFrame in
    rank order.
    """
    x = as_csr(get_matrix(adata, layer))
    if n_top_genes < 1:
        raise InputError(f"select_hvg: n_top_genes must be >= 1, not {n_top_genes}")
    if not looks_like_counts(x):
        logger.warning(f"select_hvg: layer {layer!r} does not look like raw counts; the Seurat v3 VST "
                       "expects counts")
    batches = None
    if batch_key is not None:
        if batch_key not in adata.obs:
            raise KeyNotFoundError(f"select_hvg: batch_key {batch_key!r} not in obs (columns: {list(adata.obs)})")
        batches = adata.obs[batch_key].astype(str).to_numpy()
    if n_top_genes > adata.n_vars:
        logger.warning(f"select_hvg: n_top_genes={n_top_genes} > {adata.n_vars} genes: selecting all")
    res = seurat_v3(x, n_top_genes=n_top_genes, batches=batches, span=span, surface=surface,
                    batch_rank=batch_rank, device=resolve_device(use_gpu))
    k = key_added
    adata.var[f"{k}.means"] = res["means"]
    adata.var[f"{k}.vars"] = res["vars"]
    adata.var[f"{k}.vars.norm"] = res["vars_norm"]
    adata.var[f"{k}.hvg.rank"] = res["rank"].astype(np.float32)
    adata.var[f"{k}.hvg"] = res["hvg"]
    if batch_key is not None:
        adata.var[f"{k}.hvg.nbatches"] = res["nbatches"]
    adata.uns[k] = uns_entry({"flavor": "seurat_v3", "layer": layer, "n_top_genes": int(n_top_genes),
                              "batch_key": batch_key, "batch_rank": batch_rank if batch_key else None,
                              "span": float(span), "surface": surface},
                             n_hvg=int(res["hvg"].sum()))
    cols = [c for c in (f"{k}.hvg.rank", f"{k}.hvg.nbatches", f"{k}.means", f"{k}.vars.norm") if c in adata.var]
    out = adata.var.loc[res["hvg"], (["gene"] if "gene" in adata.var else []) + cols]
    if batch_key is None:
        return out.sort_values(f"{k}.hvg.rank", kind="stable")
    sort = [f"{k}.hvg.nbatches", f"{k}.hvg.rank"]
    if batch_rank != "nbatches":
        sort = sort[::-1]
    return out.sort_values(sort, ascending=[c.endswith("rank") for c in sort], kind="stable")
