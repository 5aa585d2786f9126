"""Name spatial domains from gene-set scores (elbow / gap rule) or from the cell types inside them (majority).

``method="elbow_gap"``: the scores ``obs[f"{score_key}.<set>"]`` (from :func:`expkit.spatial.score_genesets`)
are standardised per set over all cells (so sets of different scales compare), averaged per domain, and each
domain's set means sorted in decreasing order. The elbow is the largest drop between consecutive sorted means;
the domain takes the top set's name when the elbow is the first drop (one set stands out) and that drop is at
least ``min_gap`` standard deviations, otherwise ``"mixed"``. ``method="majority"``: each domain takes the most
frequent value of ``obs[label_key]`` among its cells, or ``"mixed"`` when that value holds less than
``min_share`` of them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import __version__
from ..errors import InputError, KeyNotFoundError

__all__ = ["label_domains"]

MIXED = "mixed"


def _domains(adata, domain_key):
    if domain_key not in adata.obs:
        raise KeyNotFoundError(f"obs[{domain_key!r}] (domains) not found (obs columns: {list(adata.obs.columns)})")
    lab = adata.obs[domain_key]
    keep = lab.notna().to_numpy()
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    c, cats = pd.factorize(lab[keep].astype(str), sort=True)
    codes[keep] = c
    return codes, [str(x) for x in cats]


def _onehot_means(values: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ok = codes >= 0
    sums = np.zeros((k, values.shape[1]))
    np.add.at(sums, codes[ok], values[ok])
    n = np.bincount(codes[ok], minlength=k).astype(np.float64)
    return sums / np.maximum(n, 1)[:, None], n


def _elbow(adata, codes, cats, score_key, min_gap):
    cols = [c for c in adata.obs.columns if str(c).startswith(f"{score_key}.")]
    if len(cols) < 2:
        raise KeyNotFoundError(f"need at least 2 score columns obs['{score_key}.<set>'], found {cols}; run "
                               f"score_genesets(key_added={score_key!r}) first")
    v = adata.obs[cols].to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"score columns {cols} hold non-finite values")
    sd = v.std(axis=0)
    z = (v - v.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    means, n = _onehot_means(z, codes, len(cats))
    order = np.argsort(-means, axis=1, kind="stable")
    srt = np.take_along_axis(means, order, axis=1)
    drops = srt[:, :-1] - srt[:, 1:]
    elbow = drops.argmax(axis=1)
    gap = drops[:, 0]
    names = np.asarray([c[len(score_key) + 1:] for c in cols], dtype=object)
    clear = (elbow == 0) & (gap >= min_gap)
    label = np.where(clear, names[order[:, 0]], MIXED)
    table = pd.DataFrame(means, index=pd.Index(cats, name="domain"), columns=list(names))
    table["n.cells"] = n.astype(np.int64)
    table["top"] = names[order[:, 0]]
    table["gap"] = gap
    table["elbow"] = elbow + 1  # number of sets above the elbow
    table["label"] = label
    return table


def _majority(adata, codes, cats, label_key, min_share):
    if label_key is None or label_key not in adata.obs:
        raise KeyNotFoundError(f"method='majority' needs obs[label_key]; {label_key!r} not found (obs columns: "
                               f"{list(adata.obs.columns)})")
    lab = adata.obs[label_key]
    ok = (codes >= 0) & lab.notna().to_numpy()
    lc, lcats = pd.factorize(lab[ok].astype(str), sort=True)
    k, m = len(cats), len(lcats)
    tab = np.bincount(codes[ok] * m + lc, minlength=k * m).reshape(k, m)
    best = tab.argmax(axis=1)
    share = tab[np.arange(k), best] / np.maximum(tab.sum(axis=1), 1)
    label = np.where(share >= min_share, np.asarray(lcats, dtype=object)[best], MIXED)
    table = pd.DataFrame(tab / np.maximum(tab.sum(axis=1), 1)[:, None], index=pd.Index(cats, name="domain"),
                         columns=[str(c) for c in lcats])
    table["n.cells"] = tab.sum(axis=1)
    table["top"] = np.asarray(lcats, dtype=object)[best]
    table["share"] = share
    table["label"] = label
    return table


def label_domains(adata, *, domain_key: str, score_key: str = "score", method: str = "elbow_gap",
                  label_key: str | None = None, min_gap: float = 0.25, min_share: float = 0.0,
                  key_added: str | None = None) -> pd.DataFrame:
    """A label for every domain of ``obs[domain_key]`` (module docstring).

    ``method``: ``"elbow_gap"`` (gene-set scores ``obs[f"{score_key}.<set>"]``, clear winner by at least
    ``min_gap`` standard deviations, else "mixed") or ``"majority"`` (most frequent ``obs[label_key]``; "mixed"
    below ``min_share``). Writes ``obs[key_added]`` (default ``f"{domain_key}.label"``; categorical, NA for cells
    without a domain) and ``uns[key_added]`` (params, version, the per-domain ``table``). Returns the table: one
    row per domain with the per-set mean z-scores (or label shares), ``top``, ``gap`` / ``share`` and ``label``.
    """
    if method not in ("elbow_gap", "majority"):
        raise InputError(f"method must be 'elbow_gap' or 'majority', not {method!r}")
    if not 0.0 <= float(min_share) <= 1.0:
        raise InputError(f"min_share must lie in [0, 1], not {min_share}")
    key_added = f"{domain_key}.label" if key_added is None else key_added
    codes, cats = _domains(adata, domain_key)
    if method == "elbow_gap":
        table = _elbow(adata, codes, cats, score_key, float(min_gap))
    else:
        table = _majority(adata, codes, cats, label_key, float(min_share))
    labels = table["label"].to_numpy(dtype=object)
    levels = list(dict.fromkeys(labels.tolist()))
    per_cell = np.where(codes >= 0, np.asarray([levels.index(x) for x in labels])[np.maximum(codes, 0)], -1)
    adata.obs[key_added] = pd.Categorical.from_codes(per_cell, categories=levels)
    params = {"domain_key": domain_key, "method": method, "min_gap": float(min_gap), "min_share": float(min_share)}
    params.update({"score_key": score_key} if method == "elbow_gap" else {"label_key": str(label_key)})
    adata.uns[key_added] = {"params": params, "version": __version__, "table": table.rename(columns=lambda c: str(c).replace("/", "_")).reset_index()}
    return table
