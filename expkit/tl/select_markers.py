"""A small set of discriminative marker genes per group, ScMags-like (Yavuz & Ozkan, Bioinformatics 2022).

Two stages, both vectorised over genes:

1. **candidates by a rank filter** (per group): genes expressed (> 0) in at least 20% of the cells of some
   group; of those, the genes whose mean ``log2(1 + x)`` is highest in this group among all groups and whose
   in-group detection rate reaches the group's threshold (the midpoint of the 75th percentile and the maximum
   of its non-zero detection rates; lowered in 1% steps up to 10 times when fewer than ``n_candidates``
   pass); ranked by ``d * (pct_in / mean pct_out) ** im_exp``, ``d`` the gap between the group's mean and the
   next highest group mean, rescaled to [1, 10] within the group; the ``n_candidates`` best are kept. When
   fewer pass, genes whose group mean is the 2nd, 3rd ... highest fill the list (``d``: the gap to the top).
2. **discriminative set**: each candidate's silhouette of "group vs rest" on its own ``log2(1 + x)``
   values (exact, in one dimension: sums of absolute differences by sorting and prefix sums, O(n log n), no
   n x n matrix); the ``n_markers`` candidates of highest silhouette are the markers.

Results are stored in the table layout of :func:`expkit.tl.markers`, readable with
:func:`expkit.tl.get_markers` (``slot=key_added``): one row per candidate, ``score`` the silhouette, ``p`` /
``q`` from Welch's t-test of the candidate (group vs rest) on the same values.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels import rank_tests as rt

__all__ = ["select_markers"]
_LOG10 = np.log(10.0)


def _values(adata, layer) -> sp.csc_matrix:
    if layer is None:
        x = adata.X
    elif layer in adata.layers:
        x = adata.layers[layer]
    elif layer == "counts":
        x = adata.X
    else:
        raise KeyNotFoundError(f"layer {layer!r} not found (layers: {list(adata.layers)})")
    x = sp.csc_matrix(x, dtype=np.float64, copy=True)
    if (x.data < 0).any():
        raise InputError("select_markers needs non-negative expression values (counts or normalised counts)")
    np.log2(x.data + 1.0, out=x.data)
    return x


def _group_stats(x: sp.csc_matrix, codes: np.ndarray, k: int):
    """Per group: detection rate, mean, variance (k x genes)."""
    onehot = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(k, codes.size))
    n = np.asarray(onehot.sum(axis=1)).ravel()
    pos = sp.csc_matrix((np.ones_like(x.data), x.indices, x.indptr), shape=x.shape)
    rate = np.asarray((onehot @ pos).todense()) / n[:, None]
    s1 = np.asarray((onehot @ x).todense())
    s2 = np.asarray((onehot @ x.multiply(x)).todense())
    mean = s1 / n[:, None]
    var = np.maximum(s2 / n[:, None] - mean**2, 0.0) * n[:, None] / np.maximum(n[:, None] - 1, 1)
    return n, rate, mean, var, s1, s2


def _rank_score(rate, mean, g, idx, rank, im_exp):
    """ScMags' rank score of genes ``idx`` whose group-``g`` mean has rank ``rank`` (0: the highest)."""
    k = rate.shape[0]
    srt = -np.sort(-mean[:, idx], axis=0)
    other = srt[1] if rank == 0 else srt[0]
    gap = (srt[rank] - other) if k > 1 else srt[0]
    if gap.size > 1 and gap.max() > gap.min():
        gap = (gap - gap.min()) / (gap.max() - gap.min()) * 9 + 1
    out_rate = (rate[:, idx].sum(axis=0) - rate[g, idx]) / max(k - 1, 1) + 1e-9
    return gap * (rate[g, idx] / out_rate) ** im_exp


def _candidates(rate, mean, g: int, n_candidates: int, im_exp: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate genes of group ``g`` (indices, rank scores), best first: genes where the group's mean is the
    highest (threshold lowered up to 10 times); if still fewer than ``n_candidates``, genes where it is the
    2nd, 3rd ... highest fill the list (at the first threshold), as ScMags does."""
    k = rate.shape[0]
    expressed = (rate >= 0.2).any(axis=0)
    mean_rank = np.argsort(np.argsort(-mean, axis=0, kind="stable"), axis=0, kind="stable")[g]
    nz = rate[g][(rate[g] > 0) & expressed]
    thres0 = thres = (np.percentile(nz, 75) + nz.max()) / 2 if nz.size else 0.0
    for _ in range(10):  # lower the threshold in 1% steps until enough genes pass
        ok = (mean_rank == 0) & expressed & (rate[g] >= thres)
        if ok.sum() >= n_candidates:
            break
        thres *= 0.99
    picked, scores = [], []
    for rank in range(k):  # ranks of the group mean: a handful
        if rank > 0:
            ok = (mean_rank == rank) & expressed & (rate[g] >= thres0)
        idx = np.flatnonzero(ok)
        room = n_candidates - sum(len(p) for p in picked)
        if room <= 0:
            break
        if idx.size:
            sc = _rank_score(rate, mean, g, idx, rank, im_exp)
            order = np.argsort(-sc, kind="stable")[:room]
            picked.append(idx[order])
            scores.append(sc[order])
    if not picked:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(picked), np.concatenate(scores)


def silhouette_1d(v: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Silhouette of the two-group labelling ``inside`` on each column of ``v`` (cells x genes), exact.

    For a cell, ``a`` / ``b`` are its mean absolute difference to the other cells of its own / the other
    group; ``s = (b - a) / max(a, b)``; the result is the mean of ``s`` over all cells (scikit-learn's
    ``silhouette_score`` on one feature). Sums of ``|x_i - x_j|`` over a group come from the sorted group
    values and their prefix sums.
    """
    v = np.asarray(v, dtype=np.float64)
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    if n_in < 2 or n_out < 1:
        return np.zeros(v.shape[1])
    d_in, d_out = _abs_sums(v, v[inside]), _abs_sums(v, v[~inside])
    own = np.where(inside[:, None], d_in, d_out)
    other = np.where(inside[:, None], d_out, d_in)
    size_own = np.where(inside, n_in, n_out)[:, None].astype(np.float64)
    size_other = np.where(inside, n_out, n_in)[:, None].astype(np.float64)
    a = own / np.maximum(size_own - 1, 1)
    b = other / size_other
    s = np.divide(b - a, np.maximum(a, b), out=np.zeros_like(a), where=np.maximum(a, b) > 0)
    s[(size_own[:, 0] < 2)] = 0.0  # a cell alone in its group scores 0 (as scikit-learn)
    return s.mean(axis=0)


def _abs_sums(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``sum_j |v[i, c] - ref[j, c]|`` for every cell i and column c (sorting, prefix sums)."""
    srt = np.sort(ref, axis=0)
    csum = np.vstack([np.zeros((1, ref.shape[1])), np.cumsum(srt, axis=0)])
    total = csum[-1]
    out = np.empty_like(v)
    for c in range(v.shape[1]):  # over the few candidate genes of one group
        below = np.searchsorted(srt[:, c], v[:, c], side="right")
        s_below = csum[below, c]
        out[:, c] = v[:, c] * below - s_below + (total[c] - s_below) - v[:, c] * (ref.shape[0] - below)
    return out


def _groups(adata, groupby: str):
    if groupby not in adata.obs:
        raise KeyNotFoundError(f"obs column {groupby!r} not found (available: {list(adata.obs.columns)})")
    lab = adata.obs[groupby]
    keep = lab.notna().to_numpy()
    codes, cats = pd.factorize(lab[keep].astype(str), sort=True)
    if len(cats) < 2:
        raise InputError(f"obs[{groupby!r}] needs at least 2 groups, has {list(cats)}")
    return keep, codes.astype(np.int64), [str(c) for c in cats]


def _welch_all(n, mean, var, s1, s2, g, cols):
    """Welch's t of group g vs the rest on genes ``cols``: (t, p, log p, mean_out, fc)."""
    n_out = n.sum() - n[g]
    m_out = (s1[:, cols].sum(0) - s1[g, cols]) / n_out
    q_out = (s2[:, cols].sum(0) - s2[g, cols]) / n_out
    v_out = np.maximum(q_out - m_out**2, 0.0) * n_out / max(n_out - 1, 1)
    t, df = rt.welch(mean[g, cols], var[g, cols], n[g], m_out, v_out, n_out)
    p, logp = rt.t_two_sided(np.nan_to_num(t), np.nan_to_num(df, nan=1.0))
    return m_out, p, logp


def select_markers(adata, *, groupby: str, n_candidates: int = 10, n_markers: int = 3, layer: str | None = "counts",
                   im_exp: float = 10.0, key_added: str = "markers.sel") -> dict:
    """Select ``n_markers`` discriminative markers per group of ``obs[groupby]`` (module docstring).

    ``layer``: counts or normalised counts (None: X; a missing ``"counts"`` layer: X), read as
    ``log2(1 + x)``. ``im_exp``: weight of the detection-rate ratio in the candidate rank (ScMags' default 10).
    Writes ``uns[key_added] = {"params", "version", "markers", "results"}`` (``markers``: a table group, rank,
    gene; group names are values, not HDF5 keys, so names like "L2/3" are safe); ``results`` is a
    table in :func:`expkit.tl.markers`' layout (``get_markers(adata, slot=key_added, group_name=...)`` lists a
    group's candidates by silhouette) with the extra columns ``rank.filter`` and ``selected``. Returns
    ``{group: [markers]}``.
    """
    if int(n_candidates) < 1 or int(n_markers) < 1:
        raise InputError(f"n_candidates and n_markers must be >= 1, not {n_candidates} and {n_markers}")
    if int(n_markers) > int(n_candidates):
        raise InputError(f"n_markers ({n_markers}) cannot exceed n_candidates ({n_candidates})")
    keep, codes, cats = _groups(adata, groupby)
    x = _values(adata, layer)[np.flatnonzero(keep)]
    n, rate, mean, var, s1, s2 = _group_stats(x, codes, len(cats))
    uid = np.asarray(adata.var_names, dtype=str)
    symbol = adata.var["gene"].astype(str).to_numpy() if "gene" in adata.var else uid
    frames, markers = [], {}
    for g, name in enumerate(cats):  # a handful of groups
        idx, rank_score = _candidates(rate, mean, g, int(n_candidates), float(im_exp))
        if idx.size == 0:
            logger.warning(f"select_markers: group {name!r} has no candidate gene")
            markers[name] = []
            continue
        sil = silhouette_1d(x[:, idx].toarray(), codes == g)
        order = np.argsort(-sil, kind="stable")
        chosen = idx[order[: int(n_markers)]]
        markers[name] = [str(s) for s in symbol[chosen]]
        m_out, p, logp = _welch_all(n, mean, var, s1, s2, g, idx)
        pct_out = (rate[:, idx] * n[:, None]).sum(0) - rate[g, idx] * n[g]
        with np.errstate(divide="ignore"):
            fc = mean[g, idx] - m_out  # log2 scale: the difference of the mean log2(1 + x)
        frames.append(pd.DataFrame({
            "group": name, "uid": uid[idx], "gene": symbol[idx], "score": sil, "fc": fc, "p": p,
            "log10.p": logp / _LOG10, "pct.in": rate[g, idx], "pct.out": pct_out / (n.sum() - n[g]),
            "mean.in": mean[g, idx], "mean.out": m_out, "rank.filter": rank_score, "selected": np.isin(idx, chosen)}))
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(results):
        logq = rt.bh_log(results["log10.p"].to_numpy()[None] * _LOG10)[0]
        results["q"], results["log10.q"] = np.exp(logq), logq / _LOG10
        results["group"] = pd.Categorical(results["group"], categories=[c for c in cats if c in set(results["group"])])
    adata.uns[key_added] = {"params": {"groupby": groupby, "n_candidates": int(n_candidates),
                                       "n_markers": int(n_markers), "layer": "X" if layer is None else layer,
                                       "im_exp": float(im_exp)},
                            "version": __version__,
                            "markers": pd.DataFrame([(k, i + 1, gname) for k, v in markers.items()
                                                     for i, gname in enumerate(v)], columns=["group", "rank", "gene"]),
                            "results": results}
    return markers
