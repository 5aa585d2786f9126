"""Batch integration of an embedding: Harmony (Korsunsky et al. 2019) in torch.

``integrate(adata, batch_key="batch", use_rep="pca")`` reads ``obsm[use_rep]`` and writes the corrected
embedding to ``obsm[key_added]`` (default ``"pca.harmony"``), with ``uns[key_added]`` holding the params,
the version, the number of iterations, whether it converged and the objective per iteration.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels.device import resolve_device, to_numpy
from ..kernels.harmony import harmony

_METHODS = ("harmony",)


def _rep(adata, use_rep: str) -> tuple[str, np.ndarray]:
    for key in (use_rep, f"X_{use_rep}"):
        if key in adata.obsm:
            return key, np.asarray(adata.obsm[key])
    raise KeyNotFoundError(f"obsm[{use_rep!r}] not found (available: {list(adata.obsm)}): run a PCA first")


def integrate(adata, *, batch_key: str = "batch", method: str = "harmony", use_rep: str = "pca",
              key_added: str = "pca.harmony", theta: float | list = 2.0, sigma: float = 0.1,
              lamb: float = 1.0, n_clusters: int | None = None, max_iter: int = 10,
              max_iter_kmeans: int = 20, n_comps: int | None = None, seed: int | None = None,
              dtype: str = "float64", use_gpu: bool = False) -> dict:
    """Correct ``obsm[use_rep]`` for ``obs[batch_key]`` with Harmony; writes ``obsm[key_added]``.

    Parameters
    ----------
    theta : diversity penalty (one value, or one per batch in the order of the batch categories).
    sigma : width of the soft k-means kernel.
    lamb : ridge penalty of the batch terms in the correction.
    n_clusters : number of clusters (default ``min(round(n_obs / 30), 100)``).
    max_iter, max_iter_kmeans : outer Harmony iterations and clustering rounds per iteration.
    n_comps : use only the first ``n_comps`` columns of the representation.
    seed : seed of the k-means++ initialisation and of the block order (None: ``settings.seed``).
    dtype : ``"float64"`` (default) or ``"float32"``, the precision of the computation. On the CPU float32 is
        ~1.5x faster and agrees with harmonypy as well on DLPFC (per-dim r 0.9992 for both, see
        benchmarks/results/markers.md). Its output differs from float64 by up to ~1.5e-3 (values up to ~30),
        so float32 runs on the CPU and on a GPU cannot be expected to agree more closely than that (not
        measured). float64 runs agree across devices to rounding.

    Returns ``{"n_iter", "converged", "n_clusters", "n_batches"}``.
    """
    if method not in _METHODS:
        raise InputError(f"method must be one of {_METHODS}, not {method!r}")
    if dtype not in ("float64", "float32"):
        raise InputError(f"dtype must be 'float64' or 'float32', not {dtype!r}")
    if batch_key not in adata.obs:
        raise KeyNotFoundError(f"obs column {batch_key!r} not found (available: {list(adata.obs.columns)})")
    rep_key, z = _rep(adata, use_rep)
    if n_comps is not None:
        z = z[:, :n_comps]
    batches = adata.obs[batch_key]
    if batches.isna().any():
        raise InputError(f"obs[{batch_key!r}] has missing values")
    codes, names = pd.factorize(batches, sort=True)
    n_batches = len(names)
    seed = settings.seed if seed is None else int(seed)
    device = resolve_device(use_gpu)
    if n_batches < 2:
        logger.warning(f"integrate: obs[{batch_key!r}] has one batch; the embedding is copied unchanged")
    gen = torch.Generator().manual_seed(seed)
    zt = torch.as_tensor(np.ascontiguousarray(z, dtype=np.float64)).to(device=device, dtype=getattr(torch, dtype))
    logger.info(f"integrate: harmony on {z.shape[0]} cells x {z.shape[1]} dims, {n_batches} batches ({device})")
    if n_batches < 2:
        out = {"z": zt, "n_iter": 0, "converged": True, "objective": [], "R": None}
        k = 0
    else:
        out = harmony(zt, torch.as_tensor(codes), n_batches, theta=theta, sigma=sigma, lamb=lamb,
                      n_clusters=n_clusters, max_iter=max_iter, max_iter_kmeans=max_iter_kmeans, generator=gen)
        k = out["R"].shape[1]
    adata.obsm[key_added] = to_numpy(out["z"]).astype(np.float32 if z.dtype == np.float32 else np.float64)
    params = {"batch_key": batch_key, "method": method, "use_rep": rep_key, "theta": np.atleast_1d(theta).astype(float),
              "sigma": float(sigma), "lamb": float(lamb), "n_clusters": int(k), "max_iter": int(max_iter),
              "max_iter_kmeans": int(max_iter_kmeans), "n_comps": int(z.shape[1]), "seed": seed,
              "dtype": dtype}
    adata.uns[key_added] = {"params": params, "version": __version__, "n_iter": int(out["n_iter"]),
                            "converged": bool(out["converged"]),
                            "objective": np.asarray(out["objective"], dtype=np.float64),
                            "batches": np.asarray([str(b) for b in names])}
    return {"n_iter": int(out["n_iter"]), "converged": bool(out["converged"]), "n_clusters": int(k),
            "n_batches": n_batches}
