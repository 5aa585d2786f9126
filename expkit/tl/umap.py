"""UMAP 2-D layout of the neighbour graph (McInnes, Healy & Melville 2018), optimised in torch."""
from __future__ import annotations

import numpy as np

from .._settings import settings
from ..errors import InputError
from ..kernels import umap as _umap
from ..kernels.device import resolve_device, single_thread
from .neighbors import get_connectivities


def umap(adata, *, min_dist: float = 0.5, spread: float = 1.0, n_epochs: int | None = None,
         seed: int | None = None, init: str | np.ndarray = "spectral", use_gpu: bool = False,
         key_added: str = "umap", neighbors_key: str = "neighbors", n_components: int = 2,
         negative_sample_rate: int = 5) -> dict:
    """Embed the fuzzy graph ``obsp[uns[neighbors_key]['connectivities_key']]`` in ``n_components`` dims.

    ``a, b`` are fitted from ``min_dist``/``spread``; the start is spectral (``init="spectral"``), uniform
    random (``"random"``), an obsm key or an array; ``n_epochs=None`` means 500 below 10,000 points, else
    200. Same seed, same layout on the CPU.

    Writes ``obsm[key_added]`` (float32) and ``uns[key_added] = {"params": {..., "a", "b"}, "version"}``;
    returns ``{"a", "b", "n_epochs"}``.
    """
    import expkit

    seed = settings.seed if seed is None else int(seed)
    W = get_connectivities(adata, neighbors_key)
    n = W.shape[0]
    a, b = _umap.find_ab_params(spread, min_dist)
    n_epochs = _umap.default_n_epochs(n) if n_epochs is None else int(n_epochs)
    if isinstance(init, str) and init == "spectral":
        Y0 = _umap.spectral_init(W, n_components, seed=seed)
    elif isinstance(init, str) and init == "random":
        Y0 = _umap.random_init(n, n_components, seed=seed)
    else:
        Y0 = np.asarray(adata.obsm[init] if isinstance(init, str) else init, dtype=np.float32)
        if Y0.shape != (n, n_components):
            raise InputError(f"init must have shape {(n, n_components)}, got {Y0.shape}")
    device = resolve_device(use_gpu)
    with single_thread(device):  # ~30 small tensor ops per epoch: a 2nd OpenMP thread only waits
        Y = _umap.optimize_layout(Y0, W, a=a, b=b, n_epochs=n_epochs, device=device, seed=seed,
                                  negative_sample_rate=negative_sample_rate)
    adata.obsm[key_added] = Y.astype(np.float32)
    adata.uns[key_added] = {"params": {"min_dist": float(min_dist), "spread": float(spread), "n_epochs": n_epochs,
                                       "seed": seed, "init": init if isinstance(init, str) else "array",
                                       "neighbors_key": neighbors_key, "a": a, "b": b,
                                       "negative_sample_rate": int(negative_sample_rate)},
                            "version": expkit.__version__}
    return {"a": a, "b": b, "n_epochs": n_epochs}
