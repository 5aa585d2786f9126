"""Spatial plots: tissue image channels under spots drawn at their true position and size."""
from __future__ import annotations

import math
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.collections import EllipseCollection

from ..errors import InputError, KeyNotFoundError
from ..io._window import _Source
from ..io.images import image_sources
from ._utils import ColorSpec, add_legend, fig_ax, get_basis, prepare_colors, sample_name

__all__ = ["plot_spatial", "plot_spatial_grid", "compose_channels", "EMBEDDING_DEFAULTS"]

#: Keys of ``plot_embeddings`` and their defaults.
EMBEDDING_DEFAULTS: dict[str, Any] = {
    "visible": True,     # draw the spots
    "basis": "spatial",  # obsm key of the coordinates (full-resolution pixels for "spatial")
    "color": None,       # obs column, var_name or gene symbol (var['gene']); None: one colour
    "ptsize": 1.0,       # spatial basis: multiplier of the true spot diameter; others: points^2
    "spot_diameter": None,  # data units; default scalefactors spot_diameter_fullres
    "palette": None,     # categorical colours (dict, list or colormap name)
    "cmap": None,        # continuous colormap (default viridis)
    "vmin": None,        # number, None (data min) or "p<q>" percentile
    "vmax": None,
    "alpha": 1.0,
    "edgecolor": "none",
    "linewidth": 0.0,
}

#: Colours of fluorescence channels when ``channel_colors`` is not given.
DEFAULT_CHANNEL_COLORS = ["#0000ff", "#00ff00", "#ff0000", "#ff00ff", "#00ffff", "#ffff00", "#ffffff"]


def _emb_opts(plot_embeddings) -> dict:
    opts = dict(EMBEDDING_DEFAULTS)
    if plot_embeddings is None:
        return opts
    if plot_embeddings is False:
        opts["visible"] = False
        return opts
    unknown = set(plot_embeddings) - set(EMBEDDING_DEFAULTS)
    if unknown:
        raise InputError(f"unknown plot_embeddings keys {sorted(unknown)}; known: {sorted(EMBEDDING_DEFAULTS)}")
    opts.update(plot_embeddings)
    return opts


def _spot_diameter(adata, xy: np.ndarray, opts: dict) -> float:
    if opts.get("spot_diameter") is not None:
        return float(opts["spot_diameter"])
    sp = adata.uns.get("spatial")
    if isinstance(sp, dict):
        entries = list(sp.values())
        name = sample_name(adata)
        if name in sp:
            entries = [sp[name]]
        for e in entries:
            sf = (e or {}).get("scalefactors") or {}
            if "spot_diameter_fullres" in sf:
                return float(sf["spot_diameter_fullres"])
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    nn = d[:, 1][d[:, 1] > 0]
    return float(0.8 * np.median(nn)) if nn.size else 1.0


def _store_for(image_store, adata, sample: str | None) -> _Source | None:
    """The image source of one sample: an explicit store (or {sample: store}), else uns images."""
    name = sample or sample_name(adata)
    if isinstance(image_store, Mapping):
        image_store = image_store.get(name)
    if image_store is not None:
        return image_sources(image_store)
    sp = adata.uns.get("spatial")
    if isinstance(sp, dict) and sp:
        key = name if name in sp else (next(iter(sp)) if len(sp) == 1 else None)
        if key is not None and ((sp[key] or {}).get("images") or (sp[key] or {}).get("image_store")):
            return image_sources(adata, key)
    return None


def _default_channels(src: _Source) -> str | None:
    meta = src._meta()
    if not meta:
        return None
    if any(all(c in m[1] for c in ("r", "g", "b")) for m in meta.values()):
        return "r,g,b"
    # the finest image, all its channels
    from ..io._window import _image_dpp

    name = min(meta, key=lambda k: _image_dpp(meta[k][2]))
    return f"{name}/" + ",".join(meta[name][1])


def compose_channels(array: np.ndarray, names: list[str], channel_colors=None) -> tuple[np.ndarray, bool]:
    """(y, x, c) uint8/uint16 channels -> an RGB float image in [0, 1] (or (y, x) grey, flag True).

    Without ``channel_colors``: 3 channels r,g,b(,a) are shown as they are, a label image (channel
    ``label`` or uint32) with one colour per object (:func:`label_colors`), 1 channel in grey, other
    counts with :data:`DEFAULT_CHANNEL_COLORS`. With ``channel_colors`` (a dict channel -> colour
    or a list aligned with the channels; keys may be "<image>/<channel>" or bare channel names) each
    channel, scaled to [0, 1] (uint8: /255; uint16: by its 99.8th percentile), is tinted by its colour
    and the tints are added (clipped to 1), on black: the usual fluorescence overlay.
    """
    a = np.asarray(array)
    c = a.shape[2]
    bare = [n.rpartition("/")[2] for n in names]
    if c == 1 and channel_colors is None and (bare[0] == "label" or a.dtype == np.uint32):
        return label_colors(a[:, :, 0]), False

    def scaled(x: np.ndarray) -> np.ndarray:
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        hi = float(np.percentile(x, 99.8)) if x.size else 1.0
        return np.clip(x.astype(np.float32) / max(hi, 1.0), 0.0, 1.0)

    if channel_colors is None:
        if c in (3, 4) and bare[:3] == ["r", "g", "b"]:
            rgb = a[:, :, :3]
            return (rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 65535.0)), False
        if c == 1:
            return scaled(a[:, :, 0]), True
        channel_colors = {n: DEFAULT_CHANNEL_COLORS[i % len(DEFAULT_CHANNEL_COLORS)] for i, n in enumerate(names)}
    if isinstance(channel_colors, Mapping):
        cols = []
        for full, b in zip(names, bare):
            col = channel_colors.get(full, channel_colors.get(b))
            if col is None:
                raise KeyNotFoundError(f"channel_colors has no colour for channel {full!r}; "
                                       f"given: {list(channel_colors)}")
            cols.append(col)
    else:
        cols = list(channel_colors)
        if len(cols) != c:
            raise InputError(f"channel_colors lists {len(cols)} colours for {c} channels {names}")
    out = np.zeros((*a.shape[:2], 3), dtype=np.float32)
    for i, col in enumerate(cols):
        out += scaled(a[:, :, i])[:, :, None] * np.asarray(mcolors.to_rgb(col), dtype=np.float32)
    return np.clip(out, 0.0, 1.0), False


def label_colors(labels: np.ndarray) -> np.ndarray:
    """A label image (0 = background) as RGBA in [0, 1]: each object a bright colour from its label (hues
    spaced by the golden ratio, so neighbouring labels differ), the background transparent."""
    lab = np.asarray(labels).astype(np.int64)
    hue = (lab * 0.6180339887) % 1.0
    hsv = np.stack([hue, np.full(hue.shape, 0.75), np.full(hue.shape, 0.95)], axis=-1)
    rgba = np.concatenate([mcolors.hsv_to_rgb(hsv), (lab > 0)[..., None].astype(np.float64)], axis=-1)
    return rgba.astype(np.float32)


def _expand_image_name(src: _Source, chans):
    """A bare image name (``"segmentation"``) stands for all of that image's channels."""
    if isinstance(chans, str) and "/" not in chans and "," not in chans and chans in src.images() \
            and chans not in [c.rpartition("/")[2] for c in src.channels()]:
        return f"{chans}/" + ",".join(c.rpartition("/")[2] for c in src.channels() if c.split("/")[0] == chans)
    return chans


def _panel_dpp(ax, xr, yr) -> float:
    fig = ax.figure
    pos = ax.get_position()
    w_px = max(1.0, pos.width * fig.get_figwidth() * fig.dpi)
    h_px = max(1.0, pos.height * fig.get_figheight() * fig.dpi)
    return max((xr[1] - xr[0]) / w_px, (yr[1] - yr[0]) / h_px)


def _view(xy: np.ndarray, diameter: float, xrange, yrange, src: _Source | None):
    if xrange is not None and yrange is not None:
        return tuple(map(float, sorted(xrange))), tuple(map(float, sorted(yrange)))
    if len(xy):
        finite = xy[np.all(np.isfinite(xy), axis=1)]
    else:
        finite = xy
    if len(finite):
        lo, hi = finite.min(axis=0), finite.max(axis=0)
        pad = max(0.04 * float(max(hi - lo)), diameter)
        x = (float(lo[0] - pad), float(hi[0] + pad))
        y = (float(lo[1] - pad), float(hi[1] + pad))
    elif src is not None and src.images():
        # no spots: the whole (finest) image
        from ..io._window import _image_dpp

        meta = src._meta()
        name = min(meta, key=lambda k: _image_dpp(meta[k][2]))
        h, w = meta[name][0][:2]
        t = np.linalg.inv(meta[name][2])
        corners = t @ np.array([[-0.5, w - 0.5], [-0.5, h - 0.5], [1, 1]])
        x = (float(corners[0].min()), float(corners[0].max()))
        y = (float(corners[1].min()), float(corners[1].max()))
    else:
        x, y = (0.0, 1.0), (0.0, 1.0)
    if xrange is not None:
        x = tuple(map(float, sorted(xrange)))
    if yrange is not None:
        y = tuple(map(float, sorted(yrange)))
    return x, y


def _draw_panel(ax, adata, spec: ColorSpec, i: int, *, opts: dict, channels, channel_colors, image_store,
                xrange, yrange, sample, interpolation, image_alpha):
    basis = opts["basis"]
    xy = get_basis(adata, basis) if opts["visible"] or (xrange is None or yrange is None) else np.zeros((0, 2))
    spatial = basis == "spatial"
    diameter = _spot_diameter(adata, xy, opts) * float(opts["ptsize"] if opts["ptsize"] is not None else 1.0) \
        if spatial else 0.0
    src = None
    if spatial and channels is not False:
        src = _store_for(image_store, adata, sample)
        if channels is not None and src is None:
            raise KeyNotFoundError(f"sample {sample or sample_name(adata)!r}: channels {channels!r} requested "
                                   "but the sample has no images (uns['spatial'] or image_store)")
    xr, yr = _view(xy, diameter, xrange, yrange, src)
    ax.set_xlim(*xr)
    ax.set_ylim(yr[1], yr[0])  # y grows downwards, as in images
    ax.set_aspect("equal", adjustable="box")
    window = None
    if src is not None:
        chans = _expand_image_name(src, channels) if channels is not None else _default_channels(src)
        if chans is not None:
            dpp = _panel_dpp(ax, xr, yr)
            window = src.read(chans, xrange=xr, yrange=yr, dpp=dpp)
            if window.array.size:
                img, grey = compose_channels(window.array, window.channels, channel_colors)
                ax.imshow(img, extent=window.extent, origin="upper", interpolation=interpolation,
                          cmap="gray" if grey else None, vmin=0 if grey else None, vmax=1 if grey else None,
                          alpha=image_alpha, zorder=0)
                # imshow resets limits to the image; restore the view
                ax.set_xlim(*xr)
                ax.set_ylim(yr[1], yr[0])
    if opts["visible"] and len(xy):
        fc = spec.facecolors(i)
        miss = spec.missing(i)
        order = np.concatenate([np.flatnonzero(miss), np.flatnonzero(~miss)])  # missing ones underneath
        if spatial:
            coll = EllipseCollection(
                widths=np.full(len(order), diameter), heights=np.full(len(order), diameter),
                angles=np.zeros(len(order)), units="xy", offsets=xy[order], offset_transform=ax.transData,
                facecolors=fc[order], edgecolors=opts["edgecolor"], linewidths=opts["linewidth"],
                alpha=opts["alpha"], zorder=2)
            ax.add_collection(coll, autolim=False)
        else:
            s = opts["ptsize"] if opts["ptsize"] not in (None, 1.0) else max(1.0, min(60.0, 1.2e5 / max(len(xy), 1)))
            ax.scatter(xy[order, 0], xy[order, 1], c=fc[order], s=s, linewidths=0, alpha=opts["alpha"], zorder=2)
    ax.set_xticks([])
    ax.set_yticks([])
    return window


def plot_spatial(adata, *, channels=None, channel_colors=None, image_store=None, plot_embeddings=None,
                 layer: str | None = None, xrange=None, yrange=None, figsize=None, title=None, dpi=None,
                 ax=None, sample: str | None = None, legend: bool = True, interpolation: str = "antialiased",
                 image_alpha: float = 1.0, ncols: int | None = None):
    """Tissue image channels with the spots on top, in full-resolution coordinates.

    adata          : one sample's AnnData, or a dict {sample: AnnData} (-> :func:`plot_spatial_grid`,
                     one panel per sample sharing the colour scale and palette).
    channels       : image channels, e.g. ``"lowres/r,g,b"``, ``"hires/r"``, ``["if/dapi", "if/cd31"]``
                     or bare ``"r,g,b"`` (the image best matching the panel's resolution is used);
                     None: RGB when the sample has an RGB image, else every channel of its finest
                     image; False: no image.
    channel_colors : {channel: colour} or a list, to overlay fluorescence channels (see
                     :func:`compose_channels`).
    image_store    : an :class:`~expkit.io.images.ImageStore` (or its path, or {sample: store});
                     default: the store at ``adata.uns['spatial'][sample]['image_store']`` (a path)
                     when set and present, else the in-memory images of ``uns['spatial'][sample]``.
    plot_embeddings: dict of spot options, defaults in :data:`EMBEDDING_DEFAULTS` (``visible``,
                     ``basis``, ``color``, ``ptsize``, ``spot_diameter``, ``palette``, ``cmap``,
                     ``vmin``, ``vmax``, ``alpha``); False hides the spots.
    layer          : layer for gene colours (None: X).
    xrange, yrange : the view, full-resolution (min, max); only that window of the image is read.
    Returns the Figure. Spots are circles of the true diameter (``spot_diameter_fullres``) in data
    units; the y axis grows downwards like the image.
    """
    if isinstance(adata, Mapping):
        return plot_spatial_grid(adata, channels=channels, channel_colors=channel_colors, image_store=image_store,
                                 plot_embeddings=plot_embeddings, layer=layer, xrange=xrange, yrange=yrange,
                                 figsize=figsize, title=title, dpi=dpi, legend=legend, ncols=ncols,
                                 interpolation=interpolation, image_alpha=image_alpha)
    opts = _emb_opts(plot_embeddings)
    spec = prepare_colors([adata], opts["color"] if opts["visible"] else None, layer=layer,
                          palette=opts["palette"], cmap=opts["cmap"], vmin=opts["vmin"], vmax=opts["vmax"])
    fig, ax = fig_ax(ax, figsize, dpi)
    _draw_panel(ax, adata, spec, 0, opts=opts, channels=channels, channel_colors=channel_colors,
                image_store=image_store, xrange=xrange, yrange=yrange, sample=sample,
                interpolation=interpolation, image_alpha=image_alpha)
    name = sample or sample_name(adata)
    ax.set_title(title if title is not None else (name if spec.key is None else f"{name}: {spec.key}"))
    if legend:
        add_legend(ax, spec)
    return fig


def plot_spatial_grid(adatas: Mapping[str, Any], *, ncols: int | None = None, figsize=None, title=None,
                      dpi=None, legend: bool = True, xrange=None, yrange=None, image_store=None,
                      plot_embeddings=None, layer=None, channels=None, channel_colors=None,
                      interpolation: str = "antialiased", image_alpha: float = 1.0, panel_size: float = 4.0):
    """One :func:`plot_spatial` panel per sample, sharing colour scale, palette and one legend.

    ``adatas``: {sample: AnnData}; ``image_store``: one store per sample as {sample: store} (or
    None for the in-memory images); ``xrange``/``yrange``: one window for all, or {sample: range}.
    ``title``: a figure title (panel titles are the sample names).
    """
    if not adatas:
        raise InputError("plot_spatial_grid needs at least one sample")
    names = list(adatas)
    ads = [adatas[n] for n in names]
    opts = _emb_opts(plot_embeddings)
    spec = prepare_colors(ads, opts["color"] if opts["visible"] else None, layer=layer,
                          palette=opts["palette"], cmap=opts["cmap"], vmin=opts["vmin"], vmax=opts["vmax"])
    n = len(ads)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    aspect = 1.0
    if figsize is None and opts["basis"] == "spatial":
        xr0, yr0 = (xrange, yrange) if not isinstance(xrange, Mapping) else (None, None)
        try:
            v = _view(get_basis(ads[0], "spatial"), 0.0, xr0, yr0, None)
            aspect = float(np.clip((v[0][1] - v[0][0]) / max(v[1][1] - v[1][0], 1e-9), 0.3, 3.0))
        except Exception:
            aspect = 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (panel_size * aspect * ncols + 1.5, panel_size * nrows + 0.4),
                             dpi=dpi, squeeze=False, layout="constrained")
    flat = axes.ravel()
    for i, (name, ad) in enumerate(zip(names, ads)):
        xr = xrange.get(name) if isinstance(xrange, Mapping) else xrange
        yr = yrange.get(name) if isinstance(yrange, Mapping) else yrange
        store = image_store if (image_store is None or isinstance(image_store, Mapping)) else None
        if image_store is not None and not isinstance(image_store, Mapping):
            raise InputError("plot_spatial_grid: pass image_store as {sample: store}")
        _draw_panel(flat[i], ad, spec, i, opts=opts, channels=channels, channel_colors=channel_colors,
                    image_store=store, xrange=xr, yrange=yr, sample=name, interpolation=interpolation,
                    image_alpha=image_alpha)
        flat[i].set_title(str(name))
    for ax in flat[n:]:
        ax.set_visible(False)
    if title is not None:
        fig.suptitle(title)
    elif spec.key is not None:
        fig.suptitle(spec.key)
    if legend:
        add_legend(flat[0], spec, fig=fig, axes=list(flat[:n]))
    return fig
