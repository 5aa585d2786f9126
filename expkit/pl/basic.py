"""Embeddings, compositions and QC distributions."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..errors import InputError, KeyNotFoundError
from ._utils import (_stored_colors, add_legend, category_colors, fig_ax, get_basis, prepare_colors,
                     sorted_categories)

__all__ = ["plot_embedding", "plot_proportions", "plot_qc", "QC_KEYS"]

QC_KEYS = ("qc.n_counts", "qc.n_genes", "qc.pct_mito")


def plot_embedding(adata, *, basis: str = "umap", color: str | None = None, layer: str | None = None,
                   ptsize: float | None = None, palette=None, cmap=None, vmin=None, vmax=None,
                   alpha: float = 1.0, ax=None, figsize=None, title=None, dpi=None, legend: bool = True,
                   sort_values: bool = True):
    """Scatter of ``obsm[basis]`` (or ``obsm["X_" + basis]``) coloured by an obs column or a gene.

    ``ptsize``: marker area in points^2 (default from the number of points). Continuous values are
    drawn in increasing order (high values on top) when ``sort_values``. Returns the Figure.
    """
    xy = get_basis(adata, basis)
    spec = prepare_colors([adata], color, layer=layer, palette=palette, cmap=cmap, vmin=vmin, vmax=vmax)
    fig, ax = fig_ax(ax, figsize or (5.5, 5), dpi)
    fc = spec.facecolors(0)
    miss = spec.missing(0)
    if spec.key is not None and not spec.categorical and sort_values:
        v = np.where(miss, -np.inf, spec.values[0])
        order = np.argsort(v, kind="stable")
    else:
        order = np.concatenate([np.flatnonzero(miss), np.flatnonzero(~miss)])
    s = ptsize if ptsize is not None else float(np.clip(1.2e5 / max(len(xy), 1), 1.0, 60.0))
    ax.scatter(xy[order, 0], xy[order, 1], c=fc[order], s=s, linewidths=0, alpha=alpha, rasterized=len(xy) > 20000)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{basis} 1")
    ax.set_ylabel(f"{basis} 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title if title is not None else (color or basis))
    if legend:
        add_legend(ax, spec)
    return fig


def _obs_of(adata_or_obs) -> tuple[pd.DataFrame, list]:
    if isinstance(adata_or_obs, pd.DataFrame):
        return adata_or_obs, []
    if isinstance(adata_or_obs, dict):  # {sample: AnnData}
        frames = []
        for name, ad in adata_or_obs.items():
            o = ad.obs.copy()
            if "sample" not in o.columns:
                o["sample"] = name
            frames.append(o)
        return pd.concat(frames, axis=0, join="outer"), list(adata_or_obs.values())
    if hasattr(adata_or_obs, "obs"):
        return adata_or_obs.obs, [adata_or_obs]
    raise InputError(f"expected an AnnData, a dict of them or an obs DataFrame, got {type(adata_or_obs).__name__}")


def plot_proportions(adata_or_obs, *, groupby: str, by: str = "sample", normalize: bool = True,
                     palette=None, ax=None, figsize=None, title=None, dpi=None, legend: bool = True,
                     horizontal: bool = False, dropna: bool = True):
    """Stacked bars: the composition of ``groupby`` (e.g. clusters) within each ``by`` (e.g. sample).

    ``adata_or_obs``: an AnnData, a dict {sample: AnnData} or an obs DataFrame. ``normalize``:
    fractions (True) or counts. Colours follow the categorical palette rule of :mod:`expkit.pl`.
    Returns the Figure.
    """
    obs, ads = _obs_of(adata_or_obs)
    for k in (groupby, by):
        if k not in obs.columns:
            raise KeyNotFoundError(f"no obs column {k!r}; available: {list(obs.columns)}")
    g = obs[groupby].astype(object).where(obs[groupby].notna(), None)
    b = obs[by].astype(object).where(obs[by].notna(), None)
    df = pd.DataFrame({"g": g.map(lambda v: None if v is None else str(v)),
                       "b": b.map(lambda v: None if v is None else str(v))})
    if dropna:
        df = df.dropna()
    else:
        df = df.fillna("NA")
    tab = pd.crosstab(df["b"], df["g"])
    tab = tab.loc[sorted_categories(tab.index), sorted_categories(tab.columns)]
    if normalize:
        tab = tab.div(tab.sum(axis=1).replace(0, 1), axis=0)
    colors = category_colors(tab.columns, palette, stored=_stored_colors(ads, groupby) if palette is None else None)
    fig, ax = fig_ax(ax, figsize or (1.0 + 0.6 * len(tab.index) + 1.5, 4.5) if not horizontal else figsize or (6, 1 + 0.4 * len(tab.index)), dpi)
    pos = np.arange(len(tab.index))
    bottom = np.zeros(len(tab.index))
    for cat in tab.columns:
        vals = tab[cat].to_numpy(dtype=float)
        if horizontal:
            ax.barh(pos, vals, left=bottom, color=colors[cat], label=cat, height=0.8, linewidth=0)
        else:
            ax.bar(pos, vals, bottom=bottom, color=colors[cat], label=cat, width=0.8, linewidth=0)
        bottom += vals
    lab = "fraction" if normalize else "count"
    if horizontal:
        ax.set_yticks(pos, list(tab.index))
        ax.set_xlabel(lab)
        ax.invert_yaxis()
    else:
        ax.set_xticks(pos, list(tab.index), rotation=45 if len(tab.index) > 4 else 0,
                      ha="right" if len(tab.index) > 4 else "center")
        ax.set_ylabel(lab)
    if normalize:
        (ax.set_xlim if horizontal else ax.set_ylim)(0, 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else f"{groupby} by {by}")
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  title=groupby, fontsize="small")
    return fig


def plot_qc(adata_or_obs, *, keys: Sequence[str] | None = None, groupby: str | None = "sample",
            kind: str = "violin", log: bool | Sequence[str] = ("qc.n_counts",), axes=None, figsize=None,
            dpi=None, title=None, bins: int = 50):
    """Distributions of QC obs columns (default ``qc.n_counts``, ``qc.n_genes``, ``qc.pct_mito``:
    those present), one panel per column, one violin (``kind="violin"``) or histogram
    (``kind="hist"``) per ``groupby`` group. ``log``: log10 axis for these keys (True: all).
    ``axes``: existing axes, one per key. Returns the Figure.
    """
    if kind not in ("violin", "hist"):
        raise InputError(f"kind must be 'violin' or 'hist', not {kind!r}")
    obs, _ = _obs_of(adata_or_obs)
    if keys is None:
        keys = [k for k in QC_KEYS if k in obs.columns]
        if not keys:
            raise KeyNotFoundError(f"none of the QC columns {list(QC_KEYS)} is in obs (run the QC first); "
                                   f"obs columns: {list(obs.columns)}")
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in obs.columns]
        if missing:
            raise KeyNotFoundError(f"no obs column(s) {missing}; available: {list(obs.columns)}")
    if groupby is not None and groupby not in obs.columns:
        groupby = None
    groups = ["all"] if groupby is None else sorted_categories(obs[groupby].dropna().unique())
    gcol = pd.Series("all", index=obs.index) if groupby is None else obs[groupby].astype(str)
    colors = category_colors(groups)
    if axes is None:
        fig, axes = plt.subplots(1, len(keys), figsize=figsize or (max(3.2, 0.9 * len(groups) + 1.5) * len(keys), 3.8),
                                 dpi=dpi, squeeze=False, layout="constrained")
        axes = list(axes.ravel())
    else:
        axes = list(np.ravel(axes))
        if len(axes) != len(keys):
            raise InputError(f"plot_qc: {len(keys)} keys need {len(keys)} axes, got {len(axes)}")
        fig = axes[0].figure
    for ax, key in zip(axes, keys):
        use_log = log is True or (not isinstance(log, bool) and key in log)
        data = []
        for gname in groups:
            v = pd.to_numeric(obs.loc[gcol == gname, key], errors="coerce").to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if use_log:
                v = np.log10(np.maximum(v, 0) + 1)
            data.append(v)
        if kind == "violin":
            keep = [i for i, v in enumerate(data) if v.size > 1 and np.ptp(v) > 0]
            if keep:
                parts = ax.violinplot([data[i] for i in keep], positions=keep, showmedians=True, widths=0.8)
                for body, i in zip(parts["bodies"], keep):
                    body.set_facecolor(colors[groups[i]])
                    body.set_edgecolor("black")
                    body.set_linewidth(0.5)
                    body.set_alpha(0.85)
                for part in ("cbars", "cmins", "cmaxes", "cmedians"):
                    if part in parts:
                        parts[part].set_color("black")
                        parts[part].set_linewidth(0.8)
            ax.set_xticks(range(len(groups)), groups, rotation=45 if len(groups) > 3 else 0,
                          ha="right" if len(groups) > 3 else "center")
            ax.set_ylabel(f"log10({key} + 1)" if use_log else key)
        else:
            for gname, v in zip(groups, data):
                if v.size:
                    ax.hist(v, bins=bins, histtype="step", color=colors[gname], label=gname, linewidth=1.2)
            ax.set_xlabel(f"log10({key} + 1)" if use_log else key)
            ax.set_ylabel("count")
            if len(groups) > 1:
                ax.legend(frameon=False, fontsize="small")
        ax.set_title(key)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if title is not None:
        fig.suptitle(title)
    return fig
