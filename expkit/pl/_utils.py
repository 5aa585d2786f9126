"""Shared plotting helpers: figure/axes creation, colour values, palettes.

Categorical palette rule (stable across samples and calls)
----------------------------------------------------------
The colour of a category is chosen, in this order, from:

1. the ``palette`` argument: a dict ``{category: colour}``, or a list of colours / a matplotlib
   colormap name assigned in sorted category order;
2. ``adata.uns[f"{key}.colors"]``: a dict ``{category: colour}`` stored by
   :func:`set_category_colors` (call it once over all samples of an experiment, or set it by hand);
3. :data:`DEFAULT_PALETTE` (40 colours) assigned in *natural sorted order of the union* of the
   categories of every sample drawn together (``"2" < "10"``, ``"L1" < "L2" < "WM"``); categories
   already coloured by 1 or 2 keep their colour and the others take the unused palette colours.

So panels drawn together always agree; separate calls agree whenever the samples hold the same
categories, and always once :func:`set_category_colors` has stored the experiment-wide mapping.
Missing values (NaN) are drawn in :data:`NA_COLOR` and left out of the legend.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors

from ..errors import InputError, KeyNotFoundError

NA_COLOR = "#d3d3d3"
#: var columns searched for gene symbols, in order (expkit's own is "gene"; readers' raw output
#: may carry "gene_symbols")
SYMBOL_COLUMNS = ("gene", "gene_symbols", "gene_name", "symbol")


def _hexes(cmap: str, idx: Iterable[int]) -> list[str]:
    cm = matplotlib.colormaps[cmap]
    return [mcolors.to_hex(cm(i)) for i in idx]


#: 40 distinct colours: tab10, then the light tab20 shades, then tab20b and the dark tab20c shades.
DEFAULT_PALETTE: list[str] = (
    _hexes("tab10", range(10))
    + _hexes("tab20", range(1, 20, 2))
    + _hexes("tab20b", range(0, 20, 1))
)
DEFAULT_PALETTE = list(dict.fromkeys(DEFAULT_PALETTE))[:40]


def natural_key(value: Any):
    parts = re.split(r"(\d+)", str(value))
    return [(0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts]


def sorted_categories(values: Iterable[Any]) -> list[str]:
    return sorted({str(v) for v in values}, key=natural_key)


def sample_name(adata) -> str:
    try:
        s = adata.obs["sample"]
        if len(s) and s.nunique() == 1:
            return str(s.iloc[0])
    except Exception:
        pass
    sp = adata.uns.get("spatial") if hasattr(adata, "uns") else None
    if isinstance(sp, dict) and len(sp) == 1:
        return str(next(iter(sp)))
    return "<unnamed>"


def fig_ax(ax=None, figsize=None, dpi=None):
    if ax is not None:
        return ax.figure, ax
    # constrained layout keeps a legend or colorbar placed outside the axes inside the saved figure
    fig, ax = plt.subplots(figsize=figsize or (6, 6), dpi=dpi, layout="constrained")
    return fig, ax


def is_categorical(series: pd.Series) -> bool:
    dt = series.dtype
    return isinstance(dt, pd.CategoricalDtype) or dt == object or dt == bool or pd.api.types.is_string_dtype(dt)


def color_values(adata, key: str, layer: str | None = None) -> tuple[np.ndarray, bool]:
    """Values to colour by: an obs column, a var_name or a gene symbol (``var['gene']``, else
    another of :data:`SYMBOL_COLUMNS`; the first matching gene when a symbol is repeated).

    Returns (values, categorical). Categorical values are strings with NaN for missing.
    """
    if key in adata.obs.columns:
        s = adata.obs[key]
        if is_categorical(s):
            vals = np.array([None if pd.isna(v) else str(v) for v in s], dtype=object)
            return vals, True
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64), False
    idx = None
    if key in adata.var_names:
        idx = int(adata.var_names.get_loc(key)) if adata.var_names.is_unique else int(
            np.flatnonzero(adata.var_names == key)[0])
    else:
        for col in SYMBOL_COLUMNS:
            if col in adata.var.columns:
                hits = np.flatnonzero(adata.var[col].astype(str).to_numpy() == key)
                if len(hits):
                    idx = int(hits[0])
                    break
    if idx is None:
        raise KeyNotFoundError(
            f"sample {sample_name(adata)!r}: {key!r} is neither an obs column, a var_name nor a gene "
            f"symbol (var['gene']); obs columns: {list(adata.obs.columns)}")
    if layer is None:
        mat = adata.X
    else:
        if layer not in adata.layers:
            raise KeyNotFoundError(f"sample {sample_name(adata)!r}: no layer {layer!r}; "
                                   f"available: {list(adata.layers)}")
        mat = adata.layers[layer]
    col = mat[:, idx]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=np.float64).ravel(), False


def _stored_colors(adatas: Sequence, key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for ad in adatas:
        stored = getattr(ad, "uns", {}).get(f"{key}.colors") if hasattr(ad, "uns") else None
        if stored is None:
            continue
        if isinstance(stored, Mapping):
            for k, v in stored.items():
                out.setdefault(str(k), mcolors.to_hex(v))
        else:  # a list aligned with the column's categories (scanpy-like)
            s = ad.obs.get(key)
            if s is not None and isinstance(s.dtype, pd.CategoricalDtype):
                for k, v in zip(s.cat.categories, stored):
                    out.setdefault(str(k), mcolors.to_hex(v))
    return out


def category_colors(categories: Iterable[Any], palette=None, *, stored: Mapping | None = None) -> dict[str, str]:
    """Colours of ``categories`` (see the module doc for the rule); returns {category: hex}."""
    cats = sorted_categories(categories)
    fixed: dict[str, str] = {}
    seq: list[str] | None = None
    if isinstance(palette, Mapping):
        fixed.update({str(k): mcolors.to_hex(v) for k, v in palette.items()})
    elif isinstance(palette, str):
        cm = matplotlib.colormaps[palette]
        n = getattr(cm, "N", 256)
        if n <= 40:
            seq = [mcolors.to_hex(cm(i)) for i in range(n)]
        else:
            seq = [mcolors.to_hex(cm(x)) for x in np.linspace(0, 1, max(len(cats), 1))]
    elif palette is not None:
        seq = [mcolors.to_hex(c) for c in palette]
    if seq is not None:
        return {c: seq[i % len(seq)] for i, c in enumerate(cats)}
    for k, v in (stored or {}).items():
        fixed.setdefault(k, v)
    used = {v.lower() for k, v in fixed.items() if k in cats}
    free = [c for c in DEFAULT_PALETTE if c.lower() not in used] or DEFAULT_PALETTE
    out, i = {}, 0
    for c in cats:
        if c in fixed:
            out[c] = fixed[c]
        else:
            out[c] = free[i % len(free)]
            i += 1
    return out


def set_category_colors(adatas, key: str, palette=None) -> dict[str, str]:
    """Assign colours to obs column ``key`` over all given samples, store them in each
    ``adata.uns[f"{key}.colors"]`` (a dict category -> hex) and return the mapping.

    ``adatas``: one AnnData, a list or a dict of them. Existing stored colours are kept.
    """
    ads = list(adatas.values()) if isinstance(adatas, Mapping) else (
        [adatas] if hasattr(adatas, "obs") else list(adatas))
    cats: set[str] = set()
    for ad in ads:
        if key not in ad.obs.columns:
            raise KeyNotFoundError(f"sample {sample_name(ad)!r}: no obs column {key!r}")
        cats |= {str(v) for v in ad.obs[key].dropna().unique()}
    mapping = category_colors(cats, palette, stored=_stored_colors(ads, key))
    for ad in ads:
        ad.uns[f"{key}.colors"] = dict(mapping)
    return mapping


@dataclass
class ColorSpec:
    """Colouring shared by every panel drawn together."""

    key: str | None = None
    categorical: bool = False
    values: list = field(default_factory=list)  # one array per adata
    colors: dict[str, str] = field(default_factory=dict)
    cmap: Any = None
    norm: Any = None

    def facecolors(self, i: int) -> np.ndarray:
        v = self.values[i]
        if self.key is None:
            return np.tile(mcolors.to_rgba("#1f4e79"), (len(v), 1))
        if self.categorical:
            na = mcolors.to_rgba(NA_COLOR)
            return np.array([mcolors.to_rgba(self.colors[x]) if x is not None else na for x in v])
        return self.cmap(self.norm(v))

    def missing(self, i: int) -> np.ndarray:
        v = self.values[i]
        if self.key is None:
            return np.zeros(len(v), dtype=bool)
        if self.categorical:
            return np.array([x is None for x in v], dtype=bool)
        return ~np.isfinite(v)

    def legend_handles(self, present_only: bool = True):
        from matplotlib.lines import Line2D

        present = set()
        for v in self.values:
            present |= {x for x in v if x is not None}
        cats = [c for c in sorted_categories(self.colors) if (c in present or not present_only)]
        return [Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=self.colors[c],
                       markeredgecolor="none", label=c) for c in cats]

    def scalar_mappable(self):
        sm = matplotlib.cm.ScalarMappable(norm=self.norm, cmap=self.cmap)
        sm.set_array([])
        return sm


def prepare_colors(adatas: Sequence, key: str | None, *, layer=None, palette=None, cmap=None,
                   vmin=None, vmax=None) -> ColorSpec:
    if key is None:
        return ColorSpec(values=[np.zeros(ad.n_obs) for ad in adatas])
    vals, cats = [], []
    for ad in adatas:
        v, c = color_values(ad, key, layer)
        vals.append(v)
        cats.append(c)
    if len(set(cats)) > 1:
        raise InputError(f"{key!r} is categorical in some samples and numeric in others")
    if cats[0]:
        union = set()
        for v in vals:
            union |= {x for x in v if x is not None}
        for ad in adatas:  # keep unused categories of a Categorical so the colours stay put
            s = ad.obs.get(key) if key in ad.obs.columns else None
            if s is not None and isinstance(s.dtype, pd.CategoricalDtype):
                union |= {str(x) for x in s.cat.categories}
        stored = {} if palette is not None else _stored_colors(adatas, key)
        return ColorSpec(key, True, vals, category_colors(union, palette, stored=stored))
    finite = np.concatenate([v[np.isfinite(v)] for v in vals]) if vals else np.array([])
    lo = _limit(vmin, finite, "min")
    hi = _limit(vmax, finite, "max")
    if hi <= lo:
        hi = lo + 1.0
    cm = matplotlib.colormaps[cmap or "viridis"].copy() if not isinstance(cmap, mcolors.Colormap) else cmap
    return ColorSpec(key, False, vals, {}, cm, mcolors.Normalize(lo, hi))


def _limit(v, finite: np.ndarray, which: str) -> float:
    """A colour-scale limit: a number, None (data min/max) or "p<q>" (the q-th percentile)."""
    if isinstance(v, str) and v.startswith("p"):
        return float(np.percentile(finite, float(v[1:]))) if finite.size else 0.0
    if v is None:
        if not finite.size:
            return 0.0 if which == "min" else 1.0
        return float(finite.min() if which == "min" else finite.max())
    return float(v)


def get_basis(adata, basis: str) -> np.ndarray:
    for k in (basis, f"X_{basis}"):
        if k in adata.obsm:
            xy = np.asarray(adata.obsm[k], dtype=np.float64)
            if xy.ndim != 2 or xy.shape[1] < 2:
                raise InputError(f"sample {sample_name(adata)!r}: obsm[{k!r}] must have 2 columns")
            return xy[:, :2]
    raise KeyNotFoundError(f"sample {sample_name(adata)!r}: no obsm[{basis!r}]; available: {list(adata.obsm)}")


def add_legend(ax, spec: ColorSpec, *, fig=None, axes=None, title=None):
    """A legend (categorical) or a colorbar (continuous) to the right of ``ax`` / ``axes``."""
    if spec.key is None:
        return None
    if spec.categorical:
        handles = spec.legend_handles()
        if not handles:
            return None
        ncol = 1 if len(handles) <= 14 else 2
        if fig is not None and axes is not None:
            # "outside" makes constrained layout leave room for the legend inside the figure
            return fig.legend(handles=handles, loc="outside right center", frameon=False,
                              title=title or spec.key, ncol=ncol, fontsize="small")
        return ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                         title=title or spec.key, ncol=ncol, fontsize="small")
    target = axes if axes is not None else ax
    f = fig if fig is not None else ax.figure
    cb = f.colorbar(spec.scalar_mappable(), ax=target, shrink=0.7, pad=0.02)
    cb.set_label(title or spec.key)
    return cb
