"""DeepST's inputs: the spatial graph, the neighbour-weighted augmentation of the expression, the model's
features and the morphology features of each spot (Xu et al., Nucleic Acids Res 50:e131, 2022).

Everything here is sparse or per spot: a spot keeps its ``spatial_k`` nearest spots as candidates and its
``n_neighbours`` best-weighted ones as augmentation partners; no n x n dense matrix is formed.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels import gcn
from ..kernels import spatial_graph as _sg
from . import _images
from .domains import median_log1p

__all__ = ["spatial_knn_graph", "augment_weights", "augment_counts", "model_features", "morphology"]


def sample_name(adata, fallback: str = "this AnnData") -> str:
    """The sample an AnnData holds, for messages (see :func:`expkit.spatial._images.sample_name`)."""
    return _images.sample_name(adata, None, None) or fallback


def counts_matrix(adata, layer: str | None) -> sp.csr_matrix:
    """Raw counts: ``layers[layer]`` (None: X; ``"counts"`` falls back to X when absent, as a reader leaves
    it) as float32 CSR."""
    if layer is None or (layer == "counts" and layer not in adata.layers):
        x = adata.X
    elif layer in adata.layers:
        x = adata.layers[layer]
    else:
        raise KeyNotFoundError(f"sample {sample_name(adata)!r}: layer {layer!r} not found; "
                               f"available: {list(adata.layers)}")
    return sp.csr_matrix(x, dtype=np.float32)


def coords(adata) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"sample {sample_name(adata)!r}: obsm['spatial'] (spot coordinates) not found")
    return np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]


def _knn(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other spots of every spot (n x k indices and distances; k-d tree on the CPU)."""
    if len(xy) < 2:
        raise InputError(f"DeepST needs at least 2 spots, got {len(xy)}")
    return _sg.knn(xy, k, torch.device("cpu"))


def spatial_knn_graph(xy: np.ndarray, k: int = 12) -> sp.csr_matrix:
    """Symmetric 0/1 graph linking each spot to its ``k`` nearest spots (12 on the Visium grid: two rings)."""
    idx, _ = _knn(xy, k)
    n = len(xy)
    a = sp.csr_matrix((np.ones(idx.size, np.float32), (np.repeat(np.arange(n), idx.shape[1]), idx.ravel())),
                      shape=(n, n))
    return ((a + a.T) > 0).astype(np.float32).tocsr()


def _row_corr(a: np.ndarray, i: np.ndarray, j: np.ndarray, centre: bool) -> np.ndarray:
    """Pearson (``centre``) or cosine similarity of rows ``a[i]`` and ``a[j]`` (pairs given elementwise)."""
    a = np.asarray(a, dtype=np.float64)
    if centre:
        a = a - a.mean(1, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return np.einsum("pk,pk->p", a[i], a[j])


def augment_weights(xy: np.ndarray, expr_pcs: np.ndarray, morph: np.ndarray | None = None, *,
                    spatial_k: int = 30, n_neighbours: int = 3) -> sp.csr_matrix:
    """DeepST's augmentation weights: among each spot's ``spatial_k`` nearest spots, the weight of spot j is
    its expression correlation (Pearson of the PCA scores) times, with ``morph``, its morphological similarity
    (cosine of the image features), both clipped at 0; the ``n_neighbours`` largest are kept and scaled to sum
    to 1 (a spot with no positive weight keeps none). Returns a row-stochastic sparse n x n matrix."""
    idx, _ = _knn(xy, spatial_k)
    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    w = np.clip(_row_corr(expr_pcs, rows, idx.ravel(), centre=True), 0.0, None)
    if morph is not None:
        w = w * np.clip(_row_corr(morph, rows, idx.ravel(), centre=False), 0.0, None)
    w = w.reshape(n, k)
    m = min(n_neighbours, k)
    # the m best candidates per spot; ties broken by distance rank (candidates are sorted by distance)
    order = np.argsort(-w, axis=1, kind="stable")[:, :m]
    top_w = np.take_along_axis(w, order, 1)
    top_j = np.take_along_axis(idx, order, 1)
    tot = top_w.sum(1, keepdims=True)
    top_w = np.where(tot > 0, top_w / np.where(tot > 0, tot, 1.0), 0.0)
    out = sp.csr_matrix((top_w.ravel().astype(np.float32), (np.repeat(np.arange(n), m), top_j.ravel())),
                        shape=(n, n))
    out.eliminate_zeros()
    return out


def augment_counts(counts: sp.csr_matrix, weights: sp.csr_matrix, adjacent_weight: float) -> sp.csr_matrix:
    """Each spot's counts plus ``adjacent_weight`` times the weighted mean of its partners' counts."""
    return (counts + adjacent_weight * (weights @ counts)).tocsr()


def lognorm_pcs(counts: sp.csr_matrix, n_comps: int, *, seed: int, device=None) -> np.ndarray:
    """PCA scores of log1p(counts scaled to the median total): the expression used for the correlations."""
    return gcn.pca(median_log1p(counts), n_comps, seed=seed, device=device)


def model_features(augmented: sp.csr_matrix, n_comps: int, *, target_sum: float | None, seed: int,
                   device=None, owners: np.ndarray | None = None) -> np.ndarray:
    """The model's input: augmented counts scaled per spot to ``target_sum`` (None: the median total), log1p,
    every gene scaled to unit variance (zero-variance genes dropped; centring is implicit in the PCA), then
    ``n_comps`` principal components. Sparse throughout."""
    x = sp.csr_matrix(augmented, dtype=np.float32)
    tot = np.asarray(x.sum(1)).ravel()
    target = float(np.median(tot[tot > 0])) if target_sum is None else float(target_sum)
    x = (sp.diags(np.where(tot > 0, target / np.maximum(tot, 1e-12), 0.0).astype(np.float32)) @ x).tocsr()
    x.data = np.log1p(x.data)
    mean = np.asarray(x.mean(0)).ravel()
    var = np.asarray(x.multiply(x).mean(0)).ravel() - mean ** 2
    sd = np.sqrt(np.maximum(var, 0.0) * x.shape[0] / max(x.shape[0] - 1, 1))
    keep = sd > 1e-8
    x = (x[:, keep] @ sp.diags((1.0 / sd[keep]).astype(np.float32))).tocsr()
    k = min(n_comps, min(x.shape) - 1)
    return gcn.pca(x, k, seed=seed, device=device)


def check_image(adata, image_key: str, image_store, sample: str | None) -> list[str]:
    """The channels of image ``image_key`` (``"<image>/<channel>"``); a clear error naming the sample and the
    images it has when it is absent."""
    from ..io.images import image_sources

    name = sample or sample_name(adata)
    try:
        source = image_sources(image_store if image_store is not None else adata, sample)
        images = source.images()
        chans = source.channels()
    except (KeyNotFoundError, InputError) as exc:
        raise KeyNotFoundError(f"sample {name!r}: no images found for use_image=True ({exc})") from exc
    if image_key not in images:
        raise KeyNotFoundError(f"sample {name!r} has no image {image_key!r}; its images: {images or 'none'}")
    return [c for c in chans if c.split("/", 1)[0] == image_key]


def morphology(adata, *, image_key: str, image_store=None, sample: str | None = None, n_comps: int = 50,
               spot_scale=(1.0, 2.0), seed: int = 0, use_gpu: bool = False,
               key_added: str = "deepst.image") -> np.ndarray:
    """Per-spot morphology features without downloaded weights: colour summaries, histograms and grey-level
    co-occurrence texture of the image around each spot at ``spot_scale`` crop sizes
    (:func:`expkit.spatial.image_features.image_features`, stored in ``obsm[key_added]``), standardised and
    reduced to ``n_comps`` principal components (DeepST uses a pretrained CNN's features, reduced alike)."""
    from .image_features import image_features

    chans = check_image(adata, image_key, image_store, sample)
    spec = image_key + "/" + ",".join(c.split("/", 1)[1] for c in chans)
    image_features(adata, channels=spec, features=("summary", "histogram", "texture"), spot_scale=spot_scale,
                   sample=sample, image_store=image_store, key_added=key_added, use_gpu=use_gpu)
    f = np.asarray(adata.obsm[key_added], dtype=np.float64)
    sd = f.std(0)
    f = (f[:, sd > 1e-12] - f[:, sd > 1e-12].mean(0)) / sd[sd > 1e-12]
    k = min(n_comps, f.shape[1], f.shape[0] - 1)
    logger.info("morphology: %d image features -> %d components", adata.obsm[key_added].shape[1], k)
    return gcn.pca(f.astype(np.float32), k, seed=seed)
