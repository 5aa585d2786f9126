"""Spatial domains with DeepST (Xu et al., Nucleic Acids Res 50:e131, 2022), re-implemented from the paper.

``spatial_detect_domains_deepst`` (one sample) and ``integrate_domains_deepst`` (several samples, one model,
no graph edges between samples, a domain-adversarial branch against batch effects). Steps:

1. augmentation (:mod:`expkit.spatial.deepst_data`): each spot's counts plus ``adjacent_weight`` x the
   weighted mean of its ``n_neighbours`` best partners among its ``spatial_k`` nearest spots, weights =
   expression correlation x (with ``use_image``) morphological similarity;
2. features: the augmented counts normalised, log1p, scaled, ``n_comps`` principal components;
3. the model (:mod:`expkit.kernels.deepst`): a denoising feature autoencoder and a variational graph
   autoencoder over the ``graph_k``-nearest-spot graph, pre-trained ``pre_epochs``, then trained
   ``epochs`` with a DEC clustering head;
4. domains: Leiden on the 15-NN graph of the embedding, resolution searched to ``n_domains``, then the
   majority refinement on the array grid (as SpaGCN's).

Differences from the published code: morphology features come from our own image feature extractor
(colour, histograms, texture; no ImageNet CNN, which would need downloaded weights); the graph
reconstruction loss estimates the n^2 negative pairs by sampling (no n x n matrix); the resolution is found
by bisection instead of a 0.01-step scan; expression correlations use log-normalised counts.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from ..errors import InputError, ResourceError
from ..kernels import deepst as dk
from ..kernels import gcn
from ..kernels import knn as _knn
from ..kernels.device import resolve_device, seed_everything
from . import deepst_data as dd
from .domains import _array_coords, _categorical, _shared_genes, refine_domains

__all__ = ["spatial_detect_domains_deepst", "integrate_domains_deepst", "search_leiden"]

_KNN_BUDGET = 128 * 2**20


def _check(n_domains, refine_shape, adatas):
    if int(n_domains) < 1:
        raise InputError(f"n_domains must be >= 1, got {n_domains}")
    if refine_shape not in ("hexagon", "square", None):
        raise InputError(f"refine_shape must be 'hexagon', 'square' or None, not {refine_shape!r}")
    if refine_shape is not None:
        for ad in adatas:
            _array_coords(ad)


def _knn_graph(z: np.ndarray, k: int, device) -> sp.csr_matrix:
    k = min(k, z.shape[0])
    idx, dist = _knn.knn_exact(z, k, device=device, memory_budget=_KNN_BUDGET)
    conn, _, _ = _knn.fuzzy_simplicial_set(idx, _knn.graph_distances32(dist), k, device=device)
    return conn


def search_leiden(conn: sp.csr_matrix, n_domains: int, *, seed: int = 0, lo: float = 0.01, hi: float = 3.0,
                  max_tries: int = 30) -> tuple[float, np.ndarray, bool]:
    """The Leiden resolution giving ``n_domains`` communities, by bisection on ``[lo, hi]`` (the count grows
    with the resolution, not always strictly). Returns (resolution, labels, exact); when no tried resolution
    gives exactly ``n_domains``, the closest count is taken and a warning says so."""
    g = gcn.to_igraph(conn)
    tried: dict[float, np.ndarray] = {}

    def count(r):
        r = round(float(r), 6)
        if r not in tried:
            tried[r] = gcn.cluster_graph(g, r, "leiden", seed)
        return int(tried[r].max()) + 1, r

    for _ in range(max_tries):
        mid = (lo + hi) / 2.0
        c, r = count(mid)
        if c == n_domains:
            return r, tried[r], True
        if c < n_domains:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    best = min(tried, key=lambda r: (abs(int(tried[r].max()) + 1 - n_domains), r))
    got = int(tried[best].max()) + 1
    logger.warning("Leiden resolution search: no resolution in the %d tried gives %d domains; using res = %.4g "
                   "with %d domains", len(tried), n_domains, best, got)
    return best, tried[best], False


def _memory_check(n, n_features, n_edges, device, name, max_memory):
    """Refuse a run estimated above ``max_memory`` GiB (default: 80 % of the device's free memory)."""
    need = dk.estimate_bytes(n, n_features, int(n_edges))
    from .svg import _available_memory

    budget = int(max_memory * 2**30) if max_memory is not None else int(0.8 * _available_memory(device))
    if need > budget:
        raise ResourceError(f"DeepST on {name} ({n:,} spots, ~{n_edges:,} graph edges) needs about "
                            f"{dk.bytes_human(need)} on {device}, more than the {dk.bytes_human(budget)} available")
    return need


def _prepare(adata, *, layer, use_image, image_key, image_store, sample, spatial_k, n_neighbours,
             adjacent_weight, graph_k, seed, device, use_gpu, image_spot_scale=(1.0, 2.0, 4.0),
             key_added="deepst"):
    """Augmented counts, the augmentation weights and the spatial graph of one sample."""
    xy = dd.coords(adata)
    counts = dd.counts_matrix(adata, layer)
    morph = None
    if use_image:
        morph = dd.morphology(adata, image_key=image_key, image_store=image_store, sample=sample, seed=seed,
                              spot_scale=image_spot_scale, use_gpu=use_gpu, key_added=key_added + ".image")
    pcs = dd.lognorm_pcs(counts, 50, seed=seed, device=device)
    w = dd.augment_weights(xy, pcs, morph, spatial_k=spatial_k, n_neighbours=n_neighbours)
    return dd.augment_counts(counts, w, adjacent_weight), w, dd.spatial_knn_graph(xy, graph_k)


def _domains(z, n_domains, seed, device):
    conn = _knn_graph(z, 15, device)
    return search_leiden(conn, int(n_domains), seed=seed)


def _dec_init(seed, device):
    def init(z):  # DEC centres: Leiden (resolution 1) communities of the pre-trained embedding's 20-NN graph
        return gcn.cluster_graph(_knn_graph(z, 20, device), 1.0, "leiden", seed)
    return init


_TRAIN_KEYS = ("lr", "weight_decay", "corrupt", "mse_weight", "bce_kld_weight", "kl_weight", "domain_weight",
               "n_sample", "update_interval", "dec_alpha")


def spatial_detect_domains_deepst(adata, *, n_domains: int = 7, layer: str | None = "counts",
                                  use_image: bool = False, image_key: str = "lowres", image_store=None,
                                  image_spot_scale=(1.0, 2.0, 4.0), sample: str | None = None,
                                  pre_epochs: int = 200, epochs: int = 200,
                                  n_comps: int = 200, spatial_k: int = 30, n_neighbours: int = 3,
                                  adjacent_weight: float = 0.3, graph_k: int = 12, target_sum: float | None = None,
                                  refine_shape: str | None = "hexagon", seed: int | None = None,
                                  use_gpu: bool = False, max_memory: float | None = None,
                                  key_added: str = "deepst", **train) -> dict:
    """DeepST spatial domains of one sample (see the module docstring for the steps).

    ``layer``: raw counts (``"counts"``, X when there is no such layer; None: X). ``use_image``: weight the augmentation by morphological
    similarity from image ``image_key`` (an error names the sample and its images when it is absent), with
    image features of crops ``image_spot_scale`` x the spot diameter.
    ``train``: the loss weights and optimiser settings of :func:`expkit.kernels.deepst.train_deepst`
    (``lr``, ``weight_decay``, ``corrupt``, ``mse_weight``, ``bce_kld_weight``, ``kl_weight``, ``n_sample``, ``update_interval``, ``dec_alpha``).
    ``max_memory``: GiB allowed (default 80 % of what the device has free); a run estimated above it raises
    ``ResourceError`` before it starts.

    Writes ``obs[key_added + '.domain']``, ``obs[key_added + '.refined']`` (categorical "0".."k-1"),
    ``obsm[key_added + '.embedding']`` (n x 28), ``obsp[key_added + '.augment']`` (the augmentation weights,
    ``n_neighbours`` per spot), with ``use_image`` ``obsm[key_added + '.image']`` (the raw image features),
    and ``uns[key_added]`` (params, resolution, seed, version, time). Returns a summary dict.
    """
    unknown = set(train) - set(_TRAIN_KEYS)
    if unknown:
        raise InputError(f"unknown DeepST parameter(s) {sorted(unknown)}; training options: {list(_TRAIN_KEYS)}")
    _check(n_domains, refine_shape, [adata])
    name = sample or dd.sample_name(adata)
    t0 = time.perf_counter()
    seed = seed_everything(seed)
    device = resolve_device(use_gpu)
    _memory_check(adata.n_obs, n_comps, adata.n_obs * graph_k * 2, device, f"sample {name!r}", max_memory)
    aug, w, graph = _prepare(adata, layer=layer, use_image=use_image, image_key=image_key,
                             image_store=image_store, sample=sample, spatial_k=spatial_k,
                             n_neighbours=n_neighbours, adjacent_weight=adjacent_weight, graph_k=graph_k,
                             seed=seed, device=device, use_gpu=use_gpu, image_spot_scale=image_spot_scale,
                             key_added=key_added)
    t_prep = time.perf_counter()
    x = dd.model_features(aug, n_comps, target_sum=target_sum, seed=seed, device=device)
    out = dk.train_deepst(x, graph, pre_epochs=pre_epochs, epochs=epochs, init_clusters=_dec_init(seed, device),
                          seed=seed, device=device, label=f" {name}", **train)
    t_train = time.perf_counter()
    res, labels, exact = _domains(out["z"], n_domains, seed, device)
    k = int(labels.max()) + 1
    adata.obs[f"{key_added}.domain"] = _categorical(labels, k)
    if refine_shape is not None:
        refined = refine_domains(labels, _array_coords(adata), refine_shape)
        adata.obs[f"{key_added}.refined"] = _categorical(refined, k)
    adata.obsm[f"{key_added}.embedding"] = out["z"]
    adata.obsp[f"{key_added}.augment"] = w
    t_end = time.perf_counter()
    steps = {"augment": t_prep - t0, "train": t_train - t_prep, "cluster": t_end - t_train}
    summary = {"res": float(res), "exact": bool(exact), "n_domains": k, "epochs": list(out["epochs"]),
               "n_dec_clusters": int(out.get("n_dec_clusters", 0)), "time": t_end - t0,
               "steps": {s: round(v, 4) for s, v in steps.items()}}
    params = dict(n_domains=int(n_domains), layer=layer, use_image=bool(use_image), image_key=image_key,
                  image_spot_scale=[float(v) for v in np.atleast_1d(image_spot_scale)],
                  pre_epochs=pre_epochs, epochs=epochs, n_comps=n_comps, spatial_k=spatial_k,
                  n_neighbours=n_neighbours, adjacent_weight=adjacent_weight, graph_k=graph_k,
                  target_sum=target_sum, refine_shape=refine_shape, seed=seed, use_gpu=bool(use_gpu), **train)
    adata.uns[key_added] = {"params": {p: v for p, v in params.items() if v is not None},
                            **{s: v for s, v in summary.items() if s != "steps"}, "version": __version__}
    return summary


def _joint_inputs(adatas, names, *, layer, use_image, image_key, image_store, spatial_k, n_neighbours,
                  adjacent_weight, graph_k, seed, device, use_gpu, image_spot_scale, result_key):
    """Per sample: augmentation (own partners, own image) and graph; stacked on the shared genes."""
    genes = _shared_genes([adatas[s] for s in names])
    if not genes:
        raise InputError(f"samples {names} share no genes")
    mats, graphs, weights = [], [], {}
    for s in names:
        ad = adatas[s]
        store = image_store.get(s) if isinstance(image_store, Mapping) else image_store
        aug, w, g = _prepare(ad, layer=layer, use_image=use_image, image_key=image_key, image_store=store,
                             sample=None if s == "integrated" else s, spatial_k=spatial_k,
                             n_neighbours=n_neighbours, adjacent_weight=adjacent_weight, graph_k=graph_k,
                             seed=seed, device=device, use_gpu=use_gpu, image_spot_scale=image_spot_scale,
                             key_added=result_key)
        mats.append(aug[:, ad.var_names.get_indexer(genes)])
        graphs.append(g)
        weights[s] = w
    return sp.vstack(mats).tocsr(), gcn.block_diag_adjacency(graphs).tocsr(), weights


def _write_integrated(integrated, names, adatas, result_key):
    """The joint labels into the integrated AnnData's obs, matched by obs name (``<sample>:<barcode>``)."""
    for col in (result_key, result_key + ".refined"):
        if col not in adatas[names[0]].obs:
            continue
        lab = pd.concat([adatas[s].obs[col].astype(str) for s in names])
        cats = adatas[names[0]].obs[col].cat.categories
        vals = lab.reindex(integrated.obs_names)
        integrated.obs[col] = pd.Categorical(vals.to_numpy(), categories=cats)
    return int(integrated.obs_names.isin(lab.index).sum())


def integrate_domains_deepst(adatas: Mapping[str, object], *, n_domains: int = 7, layer: str | None = "counts",
                             result_key: str = "deepst.integrated", use_image: bool = False,
                             image_key: str = "lowres", image_store=None, image_spot_scale=(1.0, 2.0, 4.0),
                             integrated=None,
                             pre_epochs: int = 200, epochs: int = 200, n_comps: int = 200, spatial_k: int = 30,
                             n_neighbours: int = 3, adjacent_weight: float = 0.3, graph_k: int = 12,
                             target_sum: float | None = None, refine_shape: str | None = "hexagon",
                             adversarial: bool = True, seed: int | None = None, use_gpu: bool = False,
                             max_memory: float | None = None, **train) -> dict:
    """One DeepST model over several samples (kind "joint"): each sample is augmented with its own partners
    (and image), the graph is block-diagonal (no edges between samples), the features are the PCA of the
    stacked augmented counts on the genes all samples share, and with ``adversarial`` a domain-adversarial
    branch (gradient reversal, sample classifier) keeps the embedding from encoding the sample. One Leiden
    clustering of the joint embedding gives labels that mean the same in every sample.

    Writes, in each sample, ``obs[result_key]``, ``obs[result_key + '.refined']``, ``obsm[result_key +
    '.embedding']``, ``obsp[result_key + '.augment']`` and ``uns[result_key]``; with ``integrated`` (given by the Experiment when its integrated
    data exist) the labels also go to the integrated obs. Returns ``{sample: {"n_spots", "domains"}}``.
    """
    unknown = set(train) - set(_TRAIN_KEYS)
    if unknown:
        raise InputError(f"unknown DeepST parameter(s) {sorted(unknown)}; training options: {list(_TRAIN_KEYS)}")
    if not adatas:
        raise InputError("integrate_domains_deepst needs at least one sample")
    names = list(adatas)
    _check(n_domains, refine_shape, [adatas[s] for s in names])
    t0 = time.perf_counter()
    seed = seed_everything(seed)
    device = resolve_device(use_gpu)
    n_total = sum(adatas[s].n_obs for s in names)
    _memory_check(n_total, n_comps, n_total * graph_k * 2, device, f"samples {names}", max_memory)
    aug, graph, weights = _joint_inputs(adatas, names, layer=layer, use_image=use_image, image_key=image_key,
                                        image_store=image_store, spatial_k=spatial_k, n_neighbours=n_neighbours,
                                        adjacent_weight=adjacent_weight, graph_k=graph_k, seed=seed,
                                        device=device, use_gpu=use_gpu, image_spot_scale=image_spot_scale,
                                        result_key=result_key)
    x = dd.model_features(aug, n_comps, target_sum=target_sum, seed=seed, device=device)
    batches = np.repeat(np.arange(len(names)), [adatas[s].n_obs for s in names]) if adversarial else None
    out = dk.train_deepst(x, graph, pre_epochs=pre_epochs, epochs=epochs, init_clusters=_dec_init(seed, device),
                          batches=batches, seed=seed, device=device, label=" joint", **train)
    res, labels, exact = _domains(out["z"], n_domains, seed, device)
    k = int(labels.max()) + 1
    params = dict(n_domains=int(n_domains), layer=layer, use_image=bool(use_image), image_key=image_key,
                  pre_epochs=pre_epochs, epochs=epochs, n_comps=n_comps, spatial_k=spatial_k,
                  n_neighbours=n_neighbours, adjacent_weight=adjacent_weight, graph_k=graph_k,
                  image_spot_scale=[float(v) for v in np.atleast_1d(image_spot_scale)],
                  target_sum=target_sum, refine_shape=refine_shape, adversarial=bool(adversarial), seed=seed,
                  samples=names, **train)
    params = {p: v for p, v in params.items() if v is not None}
    result, start = {}, 0
    for s in names:
        ad = adatas[s]
        sl = slice(start, start + ad.n_obs)
        start += ad.n_obs
        ad.obs[result_key] = _categorical(labels[sl], k)
        if refine_shape is not None:
            ad.obs[result_key + ".refined"] = _categorical(refine_domains(labels[sl], _array_coords(ad),
                                                                          refine_shape), k)
        ad.obsm[result_key + ".embedding"] = out["z"][sl]
        ad.obsp[result_key + ".augment"] = weights[s]
        ad.uns[result_key] = {"params": params, "res": float(res), "exact": bool(exact), "n_domains": k,
                              "version": __version__}
        result[s] = {"n_spots": ad.n_obs, "domains": np.bincount(labels[sl], minlength=k).tolist()}
    if integrated is not None:
        n_written = _write_integrated(integrated, names, adatas, result_key)
        logger.info("%s written to %d of the integrated data's %d obs", result_key, n_written, integrated.n_obs)
    logger.info("DeepST joint model over %d samples: %d domains (res %.4g) in %.1f s", len(names), k, res,
                time.perf_counter() - t0)
    return result
