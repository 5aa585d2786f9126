"""SpaGCN's domain-level gene detection (Hu et al. 2021): spatially variable genes of a domain against its
neighbouring domains, and meta genes built iteratively. Differential expression through
:func:`expkit.tl.markers` (Wilcoxon), results readable with :func:`expkit.tl.get_markers`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .. import __version__
from .._logging import logger
from ..errors import InputError, KeyNotFoundError

__all__ = ["spatial_markers_spagcn", "spatial_metagene", "neighbour_domains", "search_radius"]


def _labels(adata, domain_key: str) -> np.ndarray:
    if domain_key not in adata.obs:
        raise KeyNotFoundError(f"obs[{domain_key!r}] (domain labels) not found: run spatial_detect_domains_spagcn")
    return adata.obs[domain_key].astype(str).to_numpy()


def _grid(adata) -> np.ndarray:
    key = "spatial.array" if "spatial.array" in adata.obsm else "spatial"
    if key not in adata.obsm:
        raise KeyNotFoundError("obsm['spatial.array'] or obsm['spatial'] needed")
    return np.asarray(adata.obsm[key], dtype=np.float64)[:, :2]


def search_radius(coords: np.ndarray, target_mask: np.ndarray, *, num_min: int = 8, num_max: int = 15,
                  start: float | None = None, end: float | None = None, max_run: int = 100) -> float:
    """A radius at which target spots have on average between ``num_min`` and ``num_max`` spots (themselves
    included) within it (SpaGCN's ``search_radius``, bisection; counts by a KD-tree, no loop over spots)."""
    tree = cKDTree(coords)
    pts = coords[target_mask]
    if start is None or end is None:
        d, _ = tree.query(pts, k=min(2, len(coords)))
        nn = float(np.median(d[:, -1])) if d.ndim > 1 else 1.0
        start = nn if start is None else start
        end = 10 * nn if end is None else end

    def count(r):
        return float(np.mean(tree.query_ball_point(pts, r, return_length=True)))

    lo, hi = count(start), count(end)
    if num_min <= lo <= num_max:
        return float(start)
    if num_min <= hi <= num_max:
        return float(end)
    if lo > num_max or hi < num_min:
        raise InputError(f"no radius in [{start:.4g}, {end:.4g}] gives {num_min}-{num_max} neighbours "
                         f"(counts {lo:.3g}, {hi:.3g}); pass start/end")
    for _ in range(max_run):
        mid = (start + end) / 2
        c = count(mid)
        if num_min <= c <= num_max:
            return float(mid)
        if c < num_min:
            start = mid
        else:
            end = mid
    return float(start)


def neighbour_domains(coords: np.ndarray, labels: np.ndarray, target: str, radius: float,
                      ratio: float = 0.5) -> list[str]:
    """Domains adjacent to ``target``: spots of a domain found within ``radius`` of target spots (counted
    once per target spot) more than ``ratio`` x the domain's size; sorted by that count. When none passes,
    the domain with the largest count (SpaGCN's ``find_neighbor_clusters``)."""
    tree = cKDTree(coords)
    hits = tree.query_ball_point(coords[labels == target], radius)
    flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]) if len(hits) else np.zeros(0, np.int64)
    found = pd.Series(labels[flat]).value_counts()
    found = found.drop(target, errors="ignore")
    sizes = pd.Series(labels).value_counts()
    keep = [d for d, c in found.items() if c > ratio * sizes[d]]
    if not keep and len(found):
        keep = [found.index[0]]
        logger.info("domain %s: no neighbour above ratio %g; using the closest one, %s", target, ratio, keep[0])
    return [str(k) for k in keep]


def spatial_markers_spagcn(adata, *, domain_key: str = "spagcn.refined", targets=None,
                           layer: str | None = "lognorm", radius: float | None = None, ratio: float = 0.5,
                           min_in_group_fraction: float = 0.8, min_in_out_group_ratio: float = 1.0,
                           min_fold_change: float = 1.5, max_q: float = 0.05, use_gpu: bool = False,
                           key_added: str = "spagcn.markers") -> pd.DataFrame:
    """Spatially variable genes of each domain: Wilcoxon of the domain against its neighbouring domains only.

    For each target domain (``targets``: all by default): the radius (given, or searched so that target
    spots have 8-15 spots around them on the array grid), the neighbouring domains (:func:`neighbour_domains`),
    then :func:`expkit.tl.markers` of target vs neighbours. A gene is kept (column ``pass``) when q <
    ``max_q``, in-group fraction > ``min_in_group_fraction``, in/out fraction ratio >
    ``min_in_out_group_ratio`` and fold change ``exp(mean.in - mean.out)`` (means of the log layer, SpaGCN's
    definition) > ``min_fold_change``.
    Stores ``uns[key_added]`` = ``{"results": table (markers' columns + fold_change, in_out_ratio, pass,
    neighbours), "params", "neighbours", "version"}``, readable with
    ``get_markers(adata, slot=key_added, group_name=domain)``. Returns the passing genes.
    """
    from ..tl.markers import markers

    labels = _labels(adata, domain_key)
    coords = _grid(adata)
    doms = sorted(set(labels), key=lambda s: (len(s), s))
    targets = doms if targets is None else [str(t) for t in ([targets] if np.isscalar(targets) else targets)]
    unknown = [t for t in targets if t not in doms]
    if unknown:
        raise KeyNotFoundError(f"domains {unknown} not in obs[{domain_key!r}] (domains: {doms})")
    tables, nbrs, radii = [], {}, {}
    for t in targets:
        r = radius if radius is not None else search_radius(coords, labels == t)
        nb = neighbour_domains(coords, labels, t, r, ratio)
        radii[t], nbrs[t] = float(r), nb
        sel = np.isin(labels, [t] + nb)
        sub = adata[sel].copy()
        sub.obs["_target"] = pd.Categorical(np.where(labels[sel] == t, "target", "neighbours"))
        markers(sub, groupby="_target", groups=["target"], reference="neighbours", layer=layer,
                use_gpu=use_gpu, key_added="_spagcn_tmp")
        tab = sub.uns["_spagcn_tmp"]["results"].copy()
        tab["group"] = t
        tab["fold_change"] = np.exp(tab["mean.in"].to_numpy() - tab["mean.out"].to_numpy())
        tab["in_out_ratio"] = tab["pct.in"].to_numpy() / np.maximum(tab["pct.out"].to_numpy(), 1e-12)
        tab["pass"] = ((tab["q"] < max_q) & (tab["pct.in"] > min_in_group_fraction)
                       & (tab["in_out_ratio"] > min_in_out_group_ratio) & (tab["fold_change"] > min_fold_change))
        tab["neighbours"] = ",".join(nb)
        tables.append(tab)
    results = pd.concat(tables, ignore_index=True)
    results["group"] = results["group"].astype(str)
    params = dict(domain_key=domain_key, targets=np.asarray(targets, dtype=str), layer=layer, ratio=ratio,
                  min_in_group_fraction=min_in_group_fraction, min_in_out_group_ratio=min_in_out_group_ratio,
                  min_fold_change=min_fold_change, max_q=max_q, groupby=domain_key,
                  groups=np.asarray(targets, dtype=str), reference="neighbouring domains", method="wilcoxon")
    adata.uns[key_added] = {"results": results, "params": params,
                            "neighbours": {t: np.asarray(v, dtype=str) for t, v in nbrs.items()},
                            "radius": radii, "version": __version__}
    out = results[results["pass"]].sort_values(["group", "score"], ascending=[True, False])
    return out.reset_index(drop=True)


def spatial_metagene(adata, *, target: str, start_gene: str, domain_key: str = "spagcn.refined",
                     layer: str | None = "lognorm", max_iter: int = 5, early_stop: bool = True,
                     key_added: str = "spagcn.metagene", use_gpu: bool = False) -> dict:
    """SpaGCN's meta gene: starting from ``start_gene`` (a var name or ``var['gene']``/``var['gene_symbols']``
    symbol), repeatedly take the spots of the target domain plus those whose meta expression exceeds the
    target's mean, and add the top up-regulated gene of the target and subtract the top gene of the others
    (Wilcoxon among those spots); the result is shifted to a minimum of 0. With ``early_stop``, it stops when
    the number of non-target spots selected does not fall or the target-vs-rest mean difference does not rise.
    Writes ``obs[key_added]`` and ``uns[key_added]`` (name like ``"GENE+A-B"``, the genes, params)."""
    import anndata as ad

    from ..tl.markers import markers

    labels = _labels(adata, domain_key)
    if target not in set(labels):
        raise KeyNotFoundError(f"domain {target!r} not in obs[{domain_key!r}]")
    x = adata.X if layer is None else adata.layers.get(layer)
    if x is None:
        raise KeyNotFoundError(f"layer {layer!r} not found; available: {list(adata.layers)}")
    x = sp.csc_matrix(x) if sp.issparse(x) else np.asarray(x)
    names = pd.Index(adata.var_names)
    symbols = None
    for col in ("gene", "gene_symbols"):
        if col in adata.var:
            symbols = adata.var[col].astype(str).to_numpy()
            break

    def col(g):
        j = names.get_loc(g) if g in names else (int(np.nonzero(symbols == g)[0][0])
                                                   if symbols is not None and (symbols == g).any() else None)
        if j is None:
            raise KeyNotFoundError(f"gene {g!r} not found in var_names or symbols")
        v = x[:, j]
        return np.asarray(v.toarray()).ravel() if sp.issparse(v) else np.asarray(v).ravel()

    def label(j):
        return symbols[j] if symbols is not None else names[j]

    is_t = labels == target
    meta = col(start_gene)
    name, added, removed = start_gene, [], []
    n_non_target, mean_diff = adata.n_obs, 0.0
    for _ in range(max_iter):
        sel = (meta > meta[is_t].mean()) | is_t
        grp = np.where(is_t[sel], "target", "other")
        if len(set(grp)) < 2 or min((grp == "target").sum(), (grp == "other").sum()) < 5:
            break
        sub = ad.AnnData(x[sel] if not sp.issparse(x) else sp.csr_matrix(x[sel]), var=adata.var[[]].copy())
        sub.obs_names = adata.obs_names[sel]
        sub.obs["_g"] = pd.Categorical(grp)
        markers(sub, groupby="_g", layer=None, use_gpu=use_gpu, key_added="_m")
        tab = sub.uns["_m"]["results"]
        up = tab[tab["group"] == "target"].sort_values("score", ascending=False)["uid"].iloc[0]
        down = tab[tab["group"] == "other"].sort_values("score", ascending=False)["uid"].iloc[0]
        ju, jd = names.get_loc(up), names.get_loc(down)
        cur = meta + col(up) - col(down)
        cur = cur - cur.min()
        diff = float(cur[is_t].mean() - cur[~is_t].mean())
        n_cur = int((~is_t[sel]).sum())
        if early_stop and not (n_non_target >= n_cur and mean_diff <= diff):
            break
        n_non_target, mean_diff = n_cur, diff
        meta = cur
        added.append(str(label(ju)))
        removed.append(str(label(jd)))
        name = f"{name}+{label(ju)}-{label(jd)}"
    adata.obs[key_added] = meta.astype(np.float32)
    adata.uns[key_added] = {"name": name, "added": np.asarray(added, dtype=str),
                            "removed": np.asarray(removed, dtype=str),
                            "params": dict(target=target, start_gene=start_gene, domain_key=domain_key, layer=layer,
                                           max_iter=max_iter, early_stop=early_stop),
                            "version": __version__}
    logger.info("meta gene: %s", name)
    return {"name": name, "added": added, "removed": removed, "mean_diff": mean_diff}
