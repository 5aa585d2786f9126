"""Spatial domains (niches) shared across samples, and the clean-up of small islands of a labelling.

``spatial_domains`` (a joint method: all samples given are clustered together, labels consistent across
them) and ``spatial_filter_islands`` (one sample). The maths is in :mod:`expkit.kernels.niches`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels import niches as _kn
from ..kernels import spatial_graph as _sg
from ..kernels.device import resolve_device
from ..kernels.linalg import pca, scale_sparse
from ..kernels.stats import mean_var
from .domains import _shared_genes as shared_genes
from .domains import median_log1p

__all__ = ["spatial_domains", "spatial_filter_islands"]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _as_dict(adatas) -> dict:
    if isinstance(adatas, Mapping):
        if not adatas:
            raise InputError("spatial_domains needs at least one sample")
        return dict(adatas)
    name = "sample"
    if "sample" in adatas.obs and adatas.n_obs:
        name = str(adatas.obs["sample"].iloc[0])
    return {name: adatas}


def _lognorm(adata, layer, sample):
    """``layers[layer]`` (None: X); a missing ``"lognorm"`` computed from the counts (median-scaled log1p)."""
    if layer is None:
        return sp.csr_matrix(adata.X, dtype=np.float32)
    if layer in adata.layers:
        return sp.csr_matrix(adata.layers[layer], dtype=np.float32)
    if layer != "lognorm":
        raise KeyNotFoundError(f"sample {sample!r}: layer {layer!r} not found; available: {list(adata.layers)}")
    return median_log1p(adata.layers["counts"] if "counts" in adata.layers else adata.X)


def _coords(adata, sample) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"sample {sample!r}: obsm['spatial'] (coordinates) not found")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise InputError(f"sample {sample!r}: obsm['spatial'] must be finite (n, 2) coordinates")
    return xy[:, :2]


def _resolutions(resolutions, n_cells: int) -> list:
    res = [resolutions] if np.isscalar(resolutions) else list(resolutions)
    if not res:
        raise InputError("resolutions must name at least one number of domains")
    try:
        ints = [int(r) for r in res]
    except (TypeError, ValueError):
        raise InputError(f"resolutions must be numbers of domains (integers), not {resolutions!r}") from None
    if any(float(r) != i for r, i in zip(res, ints)) or any(i < 1 for i in ints):
        raise InputError(f"resolutions must be positive integers, not {resolutions!r}")
    if any(b <= a for a, b in zip(ints, ints[1:])):
        raise InputError(f"resolutions must be strictly increasing, not {resolutions!r}")
    if ints[-1] > n_cells:
        raise InputError(f"resolution {ints[-1]} exceeds the number of cells ({n_cells})")
    return ints


def _shared_genes(adatas: dict) -> list:
    genes = shared_genes(list(adatas.values()))
    if not genes:
        raise InputError(f"samples {list(adatas)} share no genes")
    return genes


def _select_genes(x: sp.csr_matrix, n_top: int | None) -> np.ndarray:
    """The ``n_top`` genes with the highest variance of the log-normalised values (all when None or fewer)."""
    _, var = mean_var(x, axis=0, ddof=1)
    if n_top is None or n_top >= x.shape[1]:
        return np.nonzero(var > 0)[0]
    return np.sort(np.argsort(-var, kind="stable")[: int(n_top)])


# --------------------------------------------------------------------------------------------
# spatial_domains
# --------------------------------------------------------------------------------------------
def _features(adatas, layer, n_top_genes, n_pcs, seed, device):
    genes = _shared_genes(adatas)
    mats = []
    for name, ad in adatas.items():
        x = _lognorm(ad, layer, name)
        if x.shape[1] != ad.n_vars:
            raise InputError(f"sample {name!r}: layer {layer!r} has {x.shape[1]} columns, not {ad.n_vars}")
        mats.append(x[:, ad.var_names.get_indexer(genes)])
    x = sp.vstack(mats, format="csr")
    keep = _select_genes(x, n_top_genes)
    d, _, _, _ = scale_sparse(x[:, keep], max_value=10.0)
    k = int(min(n_pcs, d.shape[0] - 1, d.shape[1]))
    if k < 1:
        raise InputError(f"samples {list(adatas)}: too few cells or variable genes for a PCA")
    scores = pca(d, k, solver="randomized", seed=seed, device=device)["scores"]
    return torch.as_tensor(scores, dtype=torch.float64, device=device), len(keep)


def _correct(feats: torch.Tensor, sizes: list, how: str | None, seed: int) -> torch.Tensor:
    """Per-sample batch correction of the joint components: ``"center"`` (each sample's mean removed),
    ``"harmony"`` (:mod:`expkit.kernels.harmony`) or None."""
    if how is None or len(sizes) < 2:
        return feats
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes)).to(feats.device)
    if how == "center":
        means = torch.zeros((len(sizes), feats.shape[1]), dtype=feats.dtype, device=feats.device)
        means.index_add_(0, batch, feats)
        means /= torch.as_tensor(sizes, dtype=feats.dtype, device=feats.device)[:, None]
        return feats - means[batch]
    from ..kernels.harmony import harmony

    return harmony(feats, batch, len(sizes), generator=torch.Generator().manual_seed(seed))["z"]


def _neighbour_blocks(adatas, feats, n_neighbors, agf, kernel, device):
    """Per sample (graphs never cross samples), per scale: the neighbour means and Gabor magnitudes."""
    means, agfs = [[] for _ in n_neighbors], [[] for _ in n_neighbors]
    start = 0
    for name, ad in adatas.items():
        xy = _coords(ad, name)
        block = feats[start:start + ad.n_obs]
        for s, k in enumerate(n_neighbors):
            w, phi = _kn.neighbour_weights(xy, int(k), device, kernel=kernel)
            m, g = _kn.neighbour_features(block, w, phi if agf else None, device)
            means[s].append(m)
            agfs[s].append(g)
        start += ad.n_obs
    means = [torch.cat(m) for m in means]
    agfs = [torch.cat(g) for g in agfs] if agf else []
    return means, agfs


def spatial_domains(adatas, *, resolutions=(7,), layer: str | None = "lognorm", n_top_genes: int | None = 2000,
                    n_pcs: int = 20, n_neighbors=(6, 18), lambda_: float = 0.8, agf: float = 0.0,
                    kernel: str = "gaussian", n_pcs_domains: int | None = 20, method: str = "gmm",
                    n_init: int = 10, batch_correction: str | None = "center",
                    seed: int | None = None, use_gpu: bool = False, key_added: str = "niche") -> dict:
    """Spatial domains clustered jointly over the samples given, nested from fine to coarse.

    Steps (maths in :mod:`expkit.kernels.niches`): (1) ``layers[layer]`` of every sample on the genes they
    all share (a missing ``"lognorm"`` computed on the fly: counts scaled to the median total, log1p), the
    ``n_top_genes`` most variable of them, standardised (clipped at 10) and reduced to ``n_pcs`` principal
    components over all cells jointly; (2) per sample (graphs never cross samples) and per neighbourhood size
    ``k`` in ``n_neighbors``, the Gaussian-weighted mean of the k nearest neighbours' components (and, with
    ``agf > 0``, BANKSY's azimuthal Gabor magnitude, taking that share of ``lambda_``); (3) own and neighbour
    blocks weighted ``sqrt(1 - lambda_)`` and ``sqrt(lambda_ / S)`` (BANKSY), reduced to ``n_pcs_domains``
    components (None: no reduction); (4) k-means (``n_init`` k-means++ starts) at the largest resolution;
    (5) Ward agglomeration of those clusters' centroids (weighted by size), cut at every coarser resolution.

    Why k-means then Ward: k-means at a fixed k needs no resolution search (Leiden does) and is the
    maximum-likelihood clustering under a shared spherical Gaussian, which Ward's merge cost extends
    exactly: each merge is the one that raises the total within-cluster sum of squares least, so every level
    optimises the same criterion as the finest and each coarse domain is an exact union of finer ones.

    ``adatas``: ``{sample: AnnData}`` or one AnnData. ``resolutions``: an int or strictly increasing ints
    (numbers of domains). Writes ``obs[f"{key_added}.{k}"]`` (categorical "0".."k-1") in every sample and
    ``uns[key_added]`` (params, version, ``hierarchy``: for each coarser k the parent of every finest
    domain). Returns ``{"resolutions", "hierarchy", "n_genes", "counts": {k: {sample: counts}}}``.
    Memory: linear in cells (sparse k-NN weights, n x k distances in k-means).
    """
    adatas = _as_dict(adatas)
    seed = settings.seed if seed is None else int(seed)
    n_neighbors = [int(n_neighbors)] if np.isscalar(n_neighbors) else [int(k) for k in n_neighbors]
    if not n_neighbors or min(n_neighbors) < 1:
        raise InputError(f"n_neighbors must be positive integers, not {n_neighbors!r}")
    if method not in ("gmm", "kmeans"):
        raise InputError(f"method must be 'gmm' or 'kmeans', not {method!r}")
    if batch_correction not in (None, "center", "harmony"):
        raise InputError(f"batch_correction must be None, 'center' or 'harmony', not {batch_correction!r}")
    if not 0.0 <= agf < 1.0:
        raise InputError(f"agf (the Gabor share of lambda_) must lie in [0, 1), not {agf}")
    for name, ad in adatas.items():
        _coords(ad, name)
    n_total = sum(ad.n_obs for ad in adatas.values())
    res = _resolutions(resolutions, n_total)
    device = resolve_device(use_gpu)
    feats, n_genes = _features(adatas, layer, n_top_genes, n_pcs, seed, device)
    feats = _correct(feats, [ad.n_obs for ad in adatas.values()], batch_correction, seed)
    feats = feats / feats.pow(2).sum(1).mean().sqrt().clamp_min(1e-300)
    means, agfs = _neighbour_blocks(adatas, feats, n_neighbors, agf > 0, kernel, device)
    z = _kn.augment(feats, means, agfs, float(lambda_), float(agf))
    if n_pcs_domains is not None and n_pcs_domains < z.shape[1]:
        z = torch.as_tensor(pca(z.cpu().numpy(), int(n_pcs_domains), seed=seed, device=device)["scores"],
                            dtype=torch.float64, device=device)
    k_fine = res[-1]
    fine, centres = _kn.kmeans(z, k_fine, seed=seed, n_init=n_init)
    if method == "gmm":
        fit = _kn.gmm_tied(z, fine, k_fine)
        fine, centres = fit["labels"], fit["means"] @ fit["whiten"].T
    sizes = np.bincount(fine, minlength=k_fine)
    merges = _kn.ward_merges(centres.cpu().numpy(), sizes)
    parents = _kn.cut_levels(merges, k_fine, res)
    fine = parents[k_fine][fine]  # renumber the finest level by its own stable order
    parents = {k: _relabelled(parents[k], parents[k_fine]) for k in res}
    out = _write(adatas, fine, parents, res, key_added, dict(
        resolutions=res, layer=layer, n_top_genes=n_top_genes, n_pcs=n_pcs, n_neighbors=n_neighbors,
        lambda_=float(lambda_), agf=float(agf), kernel=kernel, n_pcs_domains=n_pcs_domains, method=method, n_init=n_init, batch_correction=batch_correction,
        seed=seed, use_gpu=bool(use_gpu)))
    out["n_genes"] = n_genes
    return out


def _relabelled(parent: np.ndarray, fine_order: np.ndarray) -> np.ndarray:
    """Parents indexed by the renumbered fine domains (``fine_order[old] = new``)."""
    out = np.empty_like(parent)
    out[fine_order] = parent
    return out


def _write(adatas, fine, parents, res, key_added, params) -> dict:
    hierarchy = {str(k): [int(p) for p in parents[k]] for k in res[:-1]}
    counts = {}
    start = 0
    for name, ad in adatas.items():
        f = fine[start:start + ad.n_obs]
        start += ad.n_obs
        for k in res:
            lab = parents[k][f]
            ad.obs[f"{key_added}.{k}"] = pd.Categorical(lab.astype(str), categories=[str(i) for i in range(k)])
            counts.setdefault(k, {})[name] = np.bincount(lab, minlength=k).tolist()
        ad.uns[key_added] = {"params": {p: v for p, v in params.items() if v is not None},
                             "version": __version__, "hierarchy": hierarchy,
                             "samples": list(adatas)}
    logger.info("spatial_domains: %d cells in %d samples, resolutions %s", len(fine), len(adatas), res)
    return {"resolutions": res, "hierarchy": hierarchy, "counts": counts}


# --------------------------------------------------------------------------------------------
# spatial_filter_islands
# --------------------------------------------------------------------------------------------
def _graph(adata, graph: str, sample) -> sp.csr_matrix:
    if graph in adata.obsp:
        return sp.csr_matrix(adata.obsp[graph])
    xy = _coords(adata, sample)
    rows, cols, _ = _sg.knn_edges(xy, 6, torch.device("cpu"))
    n = adata.n_obs
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))


def spatial_filter_islands(adata, *, key: str = "niche.10", min_size: int = 20,
                           graph: str = "spatial.connectivities", action: str = "relabel",
                           key_added: str | None = None) -> dict:
    """Remove islands: connected pieces of one label smaller than ``min_size`` cells on the spatial graph.

    ``graph``: an ``obsp`` key (symmetrised); absent, a 6-nearest-neighbour graph of ``obsm['spatial']``.
    A label's pieces are the connected components of the graph restricted to edges whose ends share that
    label. ``action="relabel"``: a small piece takes the majority label across its boundary (votes from
    cells of large pieces first; repeated while pieces stay small and something changes); ``"na"``: its
    cells become NA. Writes ``obs[key_added]`` (default ``f"{key}.filtered"``) with the categories of
    ``obs[key]`` and ``uns[key_added]``; returns ``{"n_islands", "n_cells", "changed"}``.
    """
    sample = str(adata.obs["sample"].iloc[0]) if "sample" in adata.obs and adata.n_obs else None
    if key not in adata.obs:
        raise KeyNotFoundError(f"sample {sample!r}: obs[{key!r}] not found")
    if action not in ("relabel", "na"):
        raise InputError(f"action must be 'relabel' or 'na', not {action!r}")
    if int(min_size) < 1:
        raise InputError(f"min_size must be a positive integer, not {min_size}")
    key_added = f"{key}.filtered" if key_added is None else key_added
    cat = pd.Categorical(adata.obs[key])
    codes = np.asarray(cat.codes, dtype=np.int64)
    adj = _graph(adata, graph, sample)
    new, small = _kn.island_relabel(codes, adj, int(min_size), len(cat.categories),
                                    max_rounds=10 if action == "relabel" else 1)
    if action == "na":
        new = np.where(small, -1, codes)
    ncomp, comp = _kn._components(((adj + adj.T) > 0).tocsr(), codes)
    n_islands = int(np.unique(comp[small]).size)
    adata.obs[key_added] = pd.Categorical.from_codes(new, categories=cat.categories)
    adata.uns[key_added] = {"params": {"key": key, "min_size": int(min_size), "graph": graph, "action": action},
                            "version": __version__}
    out = {"n_islands": n_islands, "n_cells": int(small.sum()), "changed": int((new != codes).sum())}
    logger.info("spatial_filter_islands %s: %d islands, %d cells", key, n_islands, out["n_cells"])
    return out
