"""Scaling and principal component analysis (sparse-aware, CPU or CUDA)."""
from __future__ import annotations

import numpy as np

from .._settings import settings
from ..errors import InputError, KeyNotFoundError
from ..kernels.device import resolve_device
from ..kernels.linalg import pca as pca_kernel
from ..kernels.linalg import scale_sparse
from ._utils import as_csr, get_matrix, uns_entry


def _gene_mask(adata, use_hvg) -> np.ndarray:
    if use_hvg is None or use_hvg is False:
        return np.ones(adata.n_vars, dtype=bool)
    if isinstance(use_hvg, str):
        if use_hvg not in adata.var:
            raise KeyNotFoundError(f"scale_pca: var column {use_hvg!r} not found (run select_hvg first, or pass "
                                   "use_hvg=None to use every gene)")
        return adata.var[use_hvg].eq(True).to_numpy()
    mask = np.asarray(use_hvg)
    if mask.dtype != bool or mask.shape != (adata.n_vars,):
        raise InputError("scale_pca: use_hvg must be a var column name, None, or a boolean mask over the genes")
    return mask


def scale_pca(adata, *, n_comps: int = 50, layer: str | None = "lognorm", use_hvg: str | None = "vst.hvg",
              scale: bool = True, max_value: float | None = 10, use_gpu: bool = False, seed: int | None = None,
              key_added: str = "pca", svd_solver: str = "auto") -> dict:
    """Standardise the selected genes and compute their principal components, without densifying.

    Genes: those flagged by the var column ``use_hvg`` (None: all). Each is centred and, with
    ``scale``, divided by its standard deviation (ddof=1) and clipped to ``[-max_value, max_value]``
    (the scanpy ``pp.scale`` + ``pp.pca`` recipe); the scaled matrix itself is not stored. The
    centring is implicit (see :mod:`expkit.kernels.linalg`). ``svd_solver``: ``"full"`` (exact
    covariance eigen-decomposition), ``"randomized"`` (Halko et al., seeded), ``"auto"`` (full for up
    to a few thousand genes). Components are sign-fixed (largest loading positive); same inputs and
    seed give the same result, on the CPU and on CUDA up to rounding.

    Writes ``obsm[key]`` (n_obs x n_comps float64 scores), ``varm[key]`` (n_vars x n_comps loadings,
    zero rows for genes not used) and ``uns[key]`` = ``{variance, variance_ratio, params, version}``.
    Returns ``{"variance_ratio": ..., "solver": ...}``.
    """
    seed = settings.seed if seed is None else int(seed)
    mask = _gene_mask(adata, use_hvg)
    if mask.sum() < 2:
        raise InputError(f"scale_pca: {int(mask.sum())} genes selected by use_hvg={use_hvg!r}; need at least 2")
    x = as_csr(get_matrix(adata, layer))[:, np.flatnonzero(mask)]
    k = int(n_comps)
    limit = min(adata.n_obs, int(mask.sum()))
    if k > limit:
        raise InputError(f"scale_pca: n_comps={k} exceeds min(n_obs, n_genes used) = {limit}")
    d, _, _, _ = scale_sparse(x, center=True, scale=scale, max_value=max_value if scale else None)
    res = pca_kernel(d, k, solver=svd_solver, seed=seed, device=resolve_device(use_gpu))
    adata.obsm[key_added] = res["scores"]
    loadings = np.zeros((adata.n_vars, k), dtype=np.float64)
    loadings[mask] = res["components"]
    adata.varm[key_added] = loadings
    params = {"n_comps": k, "layer": layer, "use_hvg": use_hvg if isinstance(use_hvg, str) else None,
              "n_genes": int(mask.sum()), "scale": bool(scale), "max_value": max_value if scale else None,
              "seed": seed, "svd_solver": svd_solver, "solver_used": res["solver"]}
    adata.uns[key_added] = uns_entry(params, variance=res["variance"], variance_ratio=res["variance_ratio"])
    return {"variance_ratio": res["variance_ratio"], "solver": res["solver"]}
