"""Ripley's F, G, K and L statistics of each label of one sample, with simulation envelopes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .._settings import settings
from ..errors import InputError
from ..kernels import ripley as K
from ..kernels.device import resolve_device
from .stats_common import read_coords, read_labels, sample_of, uns_result

__all__ = ["ripley", "RIPLEY_MODES"]

RIPLEY_MODES = ("F", "G", "K", "L")


def _observed(mode, xy_all, xy_lab, codes, k, query, sup, n_neigh, device):
    """(k, n_steps) observed statistic of every label."""
    rows = []
    for c in range(k):  # over labels
        pts = xy_lab[codes == c]
        if mode == "F":
            rows.append(K.fg_stat(K.knn_distances(pts, query, n_neigh).ravel(), sup))
        elif mode == "G":
            rows.append(K.fg_stat(K.knn_distances(pts, xy_lab[codes != c], n_neigh).ravel(), sup))
        else:
            rows.append(K.pairs_below(pts, sup, device))
    return np.vstack(rows)


def _simulated(mode, sets, query, xy_all, sup, device):
    """(n_simulations, n_steps) statistic of each uniform point set."""
    if mode == "F":
        return K.fg_stat(K.knn_distances_sets(sets, query, 1)[:, :, 0], sup)
    if mode == "G":
        return K.fg_stat(K.knn_distances_sets(sets, xy_all, 1)[:, :, 0], sup)
    return K.pairs_below_sets(sets, sup, device)


def ripley(adata, *, cluster_key: str, mode: str = "F", spatial_key: str = "spatial", n_neigh: int = 2,
           n_simulations: int = 100, n_observations: int = 1000, max_dist: float | None = None, n_steps: int = 50,
           seed: int | None = None, min_obs: int = 2, envelope: float = 0.95, normalization: str = "squidpy",
           use_gpu: bool = False, key_added: str | None = None) -> dict:
    """Ripley's statistic of every label, simulated envelopes and p-values (squidpy 1.8's definitions).

    ``mode``: ``"F"`` (empty space: distances from ``n_observations`` random points of the hull to the
    ``n_neigh`` nearest cells of the label), ``"G"`` (distances from the cells of the other labels to the
    ``n_neigh`` nearest cells of the label), ``"K"`` or ``"L"`` (pairs of the label's cells closer than
    each distance; ``L = sqrt(K / pi)``). ``normalization`` (K and L): ``"squidpy"`` divides by the number N of
    all cells of the sample, for the labels and for the simulations alike (squidpy's numbers; a label's curve is
    then not comparable with the envelope), ``"label"`` by each label's own count (and the simulations by
    ``n_observations``), so that a label above the envelope is clustered, below it dispersed. The support
    is ``n_steps`` distances from 0 to ``max_dist`` (default ``sqrt(hull area / 2)``).

    Simulations: ``n_simulations`` independent uniform point sets of ``n_observations`` points in the convex
    hull of all cells, from one generator seeded by ``seed`` (squidpy re-seeds every simulation with the same
    seed, so its seeded simulations are all one draw; ours are independent). ``envelope``: the central
    quantile band of the simulations. ``pvalues``: ``(1 + #{sim >= obs}) / (S + 1)`` folded to
    ``min(p, 1 - p)``.

    Writes ``uns[key_added]`` (default ``f"{cluster_key}.ripley_{mode}"``): ``stat`` (labels x n_steps),
    ``bins``, ``sims``, ``envelope_low``/``envelope_high``, ``pvalues``, ``labels``, ``params``. Returns a dict
    with the same arrays and ``stat`` as a DataFrame (labels x bins).
    """
    func = "ripley"
    mode = str(mode).upper()
    if mode not in RIPLEY_MODES:
        raise InputError(f"{func}: mode must be one of {RIPLEY_MODES}, not {mode!r}")
    for name, v in (("n_simulations", n_simulations), ("n_observations", n_observations), ("n_steps", n_steps),
                    ("n_neigh", n_neigh)):
        if int(v) < (2 if name == "n_steps" else 1):
            raise InputError(f"{func}: {name} must be a positive integer (n_steps >= 2), not {v!r}")
    if normalization not in ("squidpy", "label"):
        raise InputError(f"{func}: normalization must be 'squidpy' or 'label', not {normalization!r}")
    if not 0 < envelope < 1:
        raise InputError(f"{func}: envelope must lie in (0, 1), not {envelope!r}")
    sample = sample_of(adata)
    lab = read_labels(adata, cluster_key, min_obs=min_obs, sample=sample, func=func)
    xy_all = read_coords(adata, spatial_key, sample=sample, func=func)
    hull = K.Hull(xy_all)
    md = float(np.sqrt(hull.area / 2.0)) if max_dist is None else float(max_dist)
    if not md > 0:
        raise InputError(f"{func}: max_dist must be positive, not {max_dist!r}")
    sup = K.support(md, n_steps)
    seed = settings.seed if seed is None else int(seed)
    rng = np.random.default_rng(seed)
    device = resolve_device(use_gpu)
    query = hull.sample(1, int(n_observations), rng)[0] if mode == "F" else None
    xy_lab = xy_all[lab.keep]
    obs = _observed(mode, xy_all, xy_lab, lab.codes, lab.k, query, sup, int(n_neigh), device)
    sets = hull.sample(int(n_simulations), int(n_observations), rng)
    sims = _simulated(mode, sets, query, xy_all, sup, device)
    if mode in ("K", "L"):
        if normalization == "squidpy":
            n_obs, n_sim = len(xy_all), len(xy_all)
        else:
            n_obs, n_sim = np.bincount(lab.codes, minlength=lab.k)[:, None].astype(float), int(n_observations)
        obs, sims = K.k_from_pairs(obs, n_obs, hull.area), K.k_from_pairs(sims, n_sim, hull.area)
        if mode == "L":
            obs, sims = K.l_from_k(obs), K.l_from_k(sims)
    q = (1.0 - envelope) / 2.0
    low, high = np.quantile(sims, q, axis=0), np.quantile(sims, 1.0 - q, axis=0)
    pv = K.sim_pvalues(obs, sims)
    params = {"mode": mode, "spatial_key": spatial_key, "n_neigh": int(n_neigh), "n_simulations": int(n_simulations),
              "n_observations": int(n_observations), "max_dist": md, "n_steps": int(n_steps), "seed": seed,
              "envelope": float(envelope), "min_obs": int(min_obs), "area": hull.area,
              "normalization": normalization}
    res = uns_result(lab, params, stat=obs, bins=sup, sims=sims, envelope_low=low, envelope_high=high, pvalues=pv)
    adata.uns[key_added or f"{cluster_key}.ripley_{mode}"] = res
    out = dict(res)
    out["stat"] = pd.DataFrame(obs, index=pd.Index(lab.categories, name=cluster_key), columns=sup)
    return out
