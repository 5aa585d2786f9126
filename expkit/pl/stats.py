"""Plots of the spatial label statistics: enrichment / interaction heat maps, co-occurrence curves, Ripley curves
with simulation envelopes, the sample embedding and the group comparison. Every function returns the Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..errors import InputError, KeyNotFoundError
from ._utils import category_colors, fig_ax

__all__ = ["plot_nhood_enrichment", "plot_interaction_matrix", "plot_co_occurrence", "plot_ripley",
           "plot_sample_embedding", "plot_group_comparison"]


def _result(adata, key: str, func: str) -> dict:
    if key not in adata.uns:
        found = sorted(k for k in adata.uns if isinstance(adata.uns[k], dict) and "labels" in adata.uns[k])
        raise KeyNotFoundError(f"uns[{key!r}] is absent: run {func} first (statistics found: {found})")
    return adata.uns[key]


def _heatmap(mat, labels, *, ax, figsize, dpi, cmap, vmin, vmax, title, cbar_label, annotate):
    n = len(labels)
    fig, ax = fig_ax(ax, figsize or (1.6 + 0.45 * n, 1.2 + 0.42 * n), dpi)
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    if annotate and n <= 12:
        for i in range(n):
            for j in range(n):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label=cbar_label)
    ax.set_title(title)
    return fig


def plot_nhood_enrichment(adata, *, cluster_key: str, key: str | None = None, value: str = "zscore",
                          cmap: str = "RdBu_r", vmax: float | None = None, annotate: bool = True, ax=None,
                          figsize=None, dpi=None, title: str | None = None):
    """Heat map of ``uns[key]`` (default ``f"{cluster_key}.nhood"`` from :func:`nhood_enrichment`): the z-scores
    (``value="zscore"``, colour scale symmetric around 0) or the edge counts (``value="count"``)."""
    res = _result(adata, key or f"{cluster_key}.nhood", "nhood_enrichment")
    if value not in ("zscore", "count"):
        raise InputError(f"value must be 'zscore' or 'count', not {value!r}")
    mat = np.asarray(res[value], dtype=float)
    lim = vmax if vmax is not None else float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
    return _heatmap(mat, list(res["labels"]), ax=ax, figsize=figsize, dpi=dpi, cmap=cmap,
                    vmin=-lim if value == "zscore" else None, vmax=lim, annotate=annotate,
                    title=title or f"neighbourhood enrichment ({cluster_key})", cbar_label=value)


def plot_interaction_matrix(adata, *, cluster_key: str, key: str | None = None, cmap: str = "viridis",
                            annotate: bool = False, ax=None, figsize=None, dpi=None, title: str | None = None):
    """Heat map of the interaction matrix (``uns[f"{cluster_key}.interactions"]``)."""
    res = _result(adata, key or f"{cluster_key}.interactions", "interaction_matrix")
    return _heatmap(np.asarray(res["matrix"], dtype=float), list(res["labels"]), ax=ax, figsize=figsize, dpi=dpi,
                    cmap=cmap, vmin=None, vmax=None, annotate=annotate,
                    title=title or f"interactions ({cluster_key})", cbar_label="edges")


def plot_co_occurrence(adata, *, cluster_key: str, clusters=None, key: str | None = None, palette=None,
                       figsize=None, dpi=None, title: str | None = None):
    """Co-occurrence ratio ``P(a | b) / P(a)`` against distance, one panel per conditioning label b
    (``clusters``: names; default the first four), one curve per label a (``uns[f"{cluster_key}.co_occurrence"]``)."""
    res = _result(adata, key or f"{cluster_key}.co_occurrence", "co_occurrence")
    labels = [str(v) for v in res["labels"]]
    wanted = labels[:4] if clusters is None else ([clusters] if isinstance(clusters, str) else list(clusters))
    bad = [c for c in wanted if c not in labels]
    if bad:
        raise KeyNotFoundError(f"label(s) {bad} not in the co-occurrence result (labels: {labels})")
    occ, x = np.asarray(res["occ"]), np.asarray(res["interval"])[1:]
    colors = category_colors(labels, palette)
    fig, axes = plt.subplots(1, len(wanted), figsize=figsize or (4.2 * len(wanted) + 1.5, 3.6), dpi=dpi,
                             squeeze=False, layout="constrained")
    for ax, b in zip(axes[0], wanted):
        j = labels.index(b)
        for i, a in enumerate(labels):
            ax.plot(x, occ[i, j], color=colors[a], label=a, linewidth=1.2)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        ax.set_xlabel("distance")
        ax.set_ylabel(f"P(label | {b}) / P(label)")
        ax.set_title(f"near {b}")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize="small",
                       title=cluster_key)
    if title:
        fig.suptitle(title)
    return fig


def plot_ripley(adata, *, cluster_key: str, mode: str = "L", clusters=None, key: str | None = None, palette=None,
                ax=None, figsize=None, dpi=None, title: str | None = None):
    """Ripley's statistic of each label against distance, with the simulation envelope (grey band) of
    ``uns[f"{cluster_key}.ripley_{mode}"]`` (from :func:`ripley`)."""
    res = _result(adata, key or f"{cluster_key}.ripley_{str(mode).upper()}", "ripley")
    labels = [str(v) for v in res["labels"]]
    show = labels if clusters is None else ([clusters] if isinstance(clusters, str) else list(clusters))
    colors = category_colors(labels, palette)
    fig, ax = fig_ax(ax, figsize or (6, 4.2), dpi)
    bins = np.asarray(res["bins"])
    ax.fill_between(bins, res["envelope_low"], res["envelope_high"], color="0.8", label="simulations", linewidth=0)
    for a in show:
        ax.plot(bins, np.asarray(res["stat"])[labels.index(a)], color=colors[a], label=a, linewidth=1.2)
    ax.set_xlabel("distance")
    ax.set_ylabel(f"{res['params']['mode']}(t)")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize="small", title=cluster_key)
    ax.set_title(title or f"Ripley's {res['params']['mode']} ({cluster_key})")
    return fig


def plot_sample_embedding(emb, *, basis: str = "umap", color: str = "group", ptsize: float = 60.0, **kw):
    """The units of :func:`sample_embedding` (an AnnData) in ``obsm[basis]`` coloured by ``obs[color]``."""
    from .basic import plot_embedding

    return plot_embedding(emb, basis=basis, color=color, ptsize=ptsize, **kw)


def plot_group_comparison(diff, *, q: float = 0.05, n_labels: int = 10, ax=None, figsize=None, dpi=None,
                          title: str | None = None):
    """Volcano plot of :func:`compare_groups`: AUC - 0.5 against -log10 p, statistics with ``qval < q`` in
    colour (one colour per statistic), the ``n_labels`` smallest p-values named."""
    need = {"statistic", "auc", "pval", "qval"}
    if not need <= set(getattr(diff, "columns", [])):
        raise InputError(f"expected the DataFrame of compare_groups (columns {sorted(need)})")
    fig, ax = fig_ax(ax, figsize or (6.5, 4.5), dpi)
    y = -np.log10(np.clip(diff["pval"].to_numpy(dtype=float), 1e-300, 1))
    x = diff["auc"].to_numpy(dtype=float) - 0.5
    sig = diff["qval"].to_numpy(dtype=float) < q
    ax.scatter(x[~sig], y[~sig], s=10, color="0.7", linewidths=0, label=f"q >= {q:g}")
    stats = [str(s) for s in diff["statistic"].astype(str).unique()]
    colors = category_colors(stats)
    for s in stats:
        m = sig & (diff["statistic"].astype(str).to_numpy() == s)
        if m.any():
            ax.scatter(x[m], y[m], s=16, color=colors[s], linewidths=0, label=s)
    for i in np.argsort(-y, kind="stable")[:n_labels]:
        r = diff.iloc[i]
        name = f"{r['statistic']}:{r['label_a']}" + (f"|{r['label_b']}" if str(r.get("label_b", "")) else "")
        ax.annotate(name, (x[i], y[i]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"AUC - 0.5 ({diff.attrs.get('other', 'other')} vs {diff.attrs.get('reference', 'reference')})")
    ax.set_ylabel("-log10 p")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize="small")
    ax.set_title(title or "statistics between groups")
    return fig
