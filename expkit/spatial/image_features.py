"""Per-spot image features: colour summaries, colour histograms and GLCM texture of a crop around each spot.

The features are those of :mod:`expkit.kernels.image_features` (``flavor="expkit"``, the default: see there
for the definitions, the crop geometry and the reflection padding of crops that leave the image) or of
:mod:`expkit.kernels.squidpy_features` (``flavor="squidpy"``: squidpy's ``calculate_image_features``
definitions, crop geometry, zero padding and column names). This module reads the image around the spots
tile by tile, so a whole-slide image is never read at once.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels import image_features as K
from ..kernels import squidpy_features as SQ
from ..kernels.device import resolve_device
from ._images import sample_name as _sample_name
from ._images import version as _version
from ._images import where as _where

__all__ = ["image_features"]

TILE = 2048  # output pixels per side of one window read (memory: about TILE^2 x channels values)
DISTANCES = (1, 2)


def _resolve(source, channels, sample):
    """(image, channel names "<image>/<c>", image dpp) with errors naming the sample and what is stored."""
    try:
        image, _, names = source.resolve(channels, None)
    except KeyNotFoundError as exc:
        if sample is not None and repr(sample) not in str(exc):
            raise KeyNotFoundError(f"{_where(sample)}: {exc} (images: {source.images()})") from exc
        raise
    t = source.transform(image)
    return image, names, float(1.0 / np.sqrt(abs(np.linalg.det(t[:2, :2]))))


def _diameter(adata, diameter, sample) -> float:
    if diameter is not None:
        d = float(diameter)
        if not np.isfinite(d) or d <= 0:
            raise InputError(f"diameter must be a positive number of full-resolution pixels, not {diameter!r}")
        return d
    entry = (adata.uns.get("spatial") or {}).get(sample) if sample is not None else None
    sf = entry.get("scalefactors") if isinstance(entry, dict) else None
    if isinstance(sf, dict) and "spot_diameter_fullres" in sf:
        return float(sf["spot_diameter_fullres"])
    raise InputError(f"{_where(sample)}: no uns['spatial'][{sample!r}]['scalefactors']['spot_diameter_fullres'] "
                     "(a Visium spot size): pass diameter= (the crop side in full-resolution pixels)")


def _check_args(adata, features, spot_scale, scale, bins, levels, sample, flavor="expkit"):
    if flavor not in ("expkit", "squidpy"):
        raise InputError(f"flavor must be 'expkit' or 'squidpy', not {flavor!r}")
    feats = K.check_families(features) if flavor == "expkit" else SQ.check_sq_families(features)
    scales = [spot_scale] if np.isscalar(spot_scale) else list(spot_scale)
    try:
        scales = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise InputError(f"spot_scale must be positive numbers, not {spot_scale!r}") from None
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales) or len(set(scales)) != len(scales):
        raise InputError(f"spot_scale must be distinct positive numbers, not {spot_scale!r}")
    if not (np.isfinite(float(scale)) and float(scale) > 0):
        raise InputError(f"scale must be positive (1 = the image's native resolution), not {scale!r}")
    if int(bins) < 1 or int(levels) < 2:
        raise InputError(f"need bins >= 1 and levels >= 2, got bins={bins}, levels={levels}")
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"{_where(sample)}: obsm['spatial'] (spot centres) is missing; "
                               f"obsm holds {list(adata.obsm.keys())}")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.all(np.isfinite(xy[:, :2])):
        raise InputError(f"{_where(sample)}: obsm['spatial'] must hold finite (x, y) per spot")
    return feats, scales, xy[:, :2]


def _tiles(xy: np.ndarray, size: float) -> list[np.ndarray]:
    """Spot indices grouped by a square grid of ``size`` full-resolution units."""
    keys = np.floor(xy / size).astype(np.int64)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    bounds = np.flatnonzero(np.diff(inv[order], prepend=-1, append=inv.max() + 1))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _read_labels(source, win, seg, image, sample, xrange, yrange, dpp):
    """The label window read like the intensity window ``win`` (the label image must share its grid)."""
    name = f"{seg}/label"
    try:
        limg, _, _ = source.resolve(name, None)
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"{_where(sample)}: the 'segmentation' family needs label channel {name!r} "
                               f"(segmentation_key={seg!r}); images: {source.channels()}") from exc
    if not (np.allclose(source.transform(limg), source.transform(image), rtol=1e-12, atol=1e-12)
            and tuple(source.shape(limg)[:2]) == tuple(source.shape(image)[:2])):
        raise InputError(f"{_where(sample)}: label image {limg!r} is not on the pixel grid of image {image!r} "
                         f"(shapes {source.shape(limg)[:2]} vs {source.shape(image)[:2]}); read channels of the "
                         "segmented image")
    lw = source.read(name, xrange=xrange, yrange=yrange, dpp=dpp)
    if lw.array.shape[:2] != win.array.shape[:2]:
        raise InputError(f"{_where(sample)}: label window {lw.array.shape[:2]} does not match the image "
                         f"window {win.array.shape[:2]}")
    return lw.array[:, :, 0]


def _tile_features(win, xy, ctx, labels):
    """Features (flavor "expkit") of the spots ``xy`` from one window, all crop scales side by side."""
    left, right, bottom, top = win.extent
    h, w = win.array.shape[:2]
    col = (xy[:, 0] - left) * w / (right - left) - 0.5
    row = (xy[:, 1] - top) * h / (bottom - top) - 0.5
    blocks, names, outside = [], [], np.zeros(len(xy), dtype=bool)
    for side, tag in zip(ctx["sides"], ctx["tags"]):
        x, nm, out = K.crop_features(win.array, np.column_stack([col, row]), side, channel_names=win.channels,
                                     grey_name=ctx["grey"], prefix=tag, device=ctx["device"], labels=labels,
                                     labels_name=f"{ctx['seg']}/label", **ctx["kw"])
        blocks.append(x)
        names += nm
        outside |= out
    return np.concatenate(blocks, axis=1), names, outside


def _sq_tile_features(win, xy, ctx, labels):
    """Features (flavor "squidpy") of the spots ``xy`` from one native-resolution window: centre pixels
    ``int(x * scale)`` in the whole image, crops zero-padded beyond the image, flagged when they leave it."""
    sx, ox, sy, oy = ctx["affine"]
    cx, cy = np.trunc(xy[:, 0] * sx + ox).astype(np.int64), np.trunc(xy[:, 1] * sy + oy).astype(np.int64)
    h_img, w_img = ctx["shape"]
    c0 = int(np.floor(win.extent[0] * sx + ox + 0.5 + 0.5))  # window pixel 0 covers [c0 - 0.5, c0 + 0.5)
    r0 = int(np.floor(win.extent[3] * sy + oy + 0.5 + 0.5))
    blocks, names, outside = [], [], np.zeros(len(xy), dtype=bool)
    for rad, tag in zip(ctx["sides"], ctx["tags"]):
        x, nm, _ = SQ.squidpy_crop_features(win.array, np.column_stack([cx - c0, cy - r0]), rad,
                                            labels=labels, prefix=tag, device=ctx["device"], **ctx["kw"])
        blocks.append(x)
        names += nm
        outside |= (cy - rad < 0) | (cx - rad < 0) | (cy + rad >= h_img) | (cx + rad >= w_img)
    x = np.concatenate(blocks, axis=1)
    x[(cx < 0) | (cy < 0) | (cx > w_img) | (cy > h_img)] = np.nan  # squidpy refuses these centres
    return x, names, outside


def _features_by_tile(adata, xy, ctx, sample, image_store):
    """Read the image per tile of spots (bounded memory) and compute the features of the tile's spots.
    Spots whose window holds no pixel (beyond the image) get NaN features and the outside flag."""
    from ..io.images import get_image, image_sources

    source = image_sources(image_store if image_store is not None else adata, sample)
    x = outside = names = None
    margin, dpp = ctx["margin"], ctx["dpp"]
    tile_fn = _sq_tile_features if ctx["flavor"] == "squidpy" else _tile_features
    for idx in _tiles(xy, TILE * ctx["out_dpp"]):
        lo, hi = xy[idx].min(0) - margin, xy[idx].max(0) + margin
        xr, yr = (lo[0], hi[0]), (lo[1], hi[1])
        win = get_image(adata, ctx["chans"], xrange=xr, yrange=yr, dpp=dpp, sample=sample, image_store=image_store)
        left, right = win.extent[:2]
        empty = win.array.shape[0] == 0 or win.array.shape[1] == 0
        px = 1.0 / win.dpp if empty else win.array.shape[1] / (right - left)  # image pixels per unit
        if ctx["sides"] is None:
            ctx["sides"] = [max(3, int(np.floor(ctx["diam"] * s * px + 0.5))) for s in ctx["scales"]]
        if empty:
            continue
        labels = None
        if "segmentation" in ctx["kw"]["features"]:
            labels = _read_labels(source, win, ctx["seg"], ctx["image"], ctx["sname"], xr, yr, dpp)
        xt, nt, ot = tile_fn(win, xy[idx], ctx, labels)
        if x is None:
            names = nt
            x = np.full((len(xy), len(nt)), np.nan, dtype=np.float64 if ctx["flavor"] == "squidpy" else np.float32)
            outside = np.ones(len(xy), dtype=bool)
        x[idx], outside[idx] = xt, ot
    return x, names, outside


def _squidpy_setup(source, image, diam, scales, scale, sname) -> dict:
    """The squidpy flavor's geometry: native resolution, a uniform scale, radii per spot_scale."""
    where = _where(sname)
    if float(scale) != 1.0:
        raise InputError(f"{where}: flavor='squidpy' reads the image at its native resolution (scale=1), "
                         f"not scale={scale!r}")
    t = source.transform(image)
    sx, sy = float(t[0, 0]), float(t[1, 1])
    if abs(t[0, 1]) > 0 or abs(t[1, 0]) > 0 or sx <= 0 or sx != sy:
        raise InputError(f"{where}: flavor='squidpy' needs an image scaled equally along x and y (squidpy's "
                         f"single scale); image {image!r} has transform {t[:2].tolist()}")
    radii = [SQ.squidpy_radius(diam * sx, s) for s in scales]
    return {"affine": (sx, float(t[0, 2]), sy, float(t[1, 2])), "shape": tuple(source.shape(image)[:2]),
            "sides": radii}


def image_features(adata, *, channels: str | Sequence[str] = "r,g,b", features=K.FAMILIES,
                   spot_scale: float | Sequence[float] = (1.0,), diameter: float | None = None, scale: float = 1.0,
                   bins: int = 10, levels: int = 8, flavor: str = "expkit", segmentation_key: str = "segmentation",
                   mask_circle: bool = False, sample: str | None = None, image_store=None,
                   key_added: str = "img.features", use_gpu: bool = False) -> dict:
    """Image features of a square crop around each spot: colour summary, colour histogram, GLCM texture,
    segmented objects.

    ``channels``: image channels (``"r,g,b"`` picks the finest image holding them, ``"lowres/r,g,b"`` names
    the image); ``features``: any of ``"summary"`` (per channel mean, std, quantiles 0.1/0.5/0.9),
    ``"histogram"`` (per channel fractions in ``bins`` equal bins over the dtype's range), ``"texture"``
    (contrast, dissimilarity, homogeneity, correlation, ASM of the symmetric GLCM of the luminance quantised
    to ``levels`` grey levels, at distances 1 and 2, averaged over 4 angles) and ``"segmentation"`` (objects
    of the label channel ``"<segmentation_key>/label"``, on the grid of the intensity image: count, covered
    fraction, mean/std area, mean intensity per channel under them); see
    :mod:`expkit.kernels.image_features`. ``diameter``: the crop side at ``spot_scale`` 1, in full-resolution
    pixels (default: the Visium ``spot_diameter_fullres``); one crop per ``spot_scale`` (side = diameter x
    spot_scale converted to image pixels, at least 3), whose names get a ``"s<scale>:"`` prefix when there
    are several. ``scale``: resolution relative to the chosen image's native one (0.5: half; the image is
    never upsampled). Crops leaving the image are filled by reflection and flagged.

    ``flavor="squidpy"``: squidpy 1.8's ``calculate_image_features`` exactly (see
    :mod:`expkit.kernels.squidpy_features`): crops of ``2 r + 1`` pixels with ``r = round(d // 2 x
    spot_scale)`` around ``int(x * scale)``, zero padding, optional ``mask_circle``, per-channel summary
    (quantiles 0.9/0.5/0.1, mean, std), histogram counts over each crop's range, 256-level GLCM texture per
    channel and angle at distance 1, squidpy's segmentation statistics, and squidpy's column names
    (``summary_ch-0_mean``; stored as float64). ``levels`` does not apply; ``scale`` must be 1.

    Writes ``obsm[key_added]`` (float32 spots x features; float64 for flavor "squidpy"),
    ``obs[key_added + ".outside"]`` and ``uns[key_added] = {"params", "columns", "n_outside", "version"}``.
    Returns ``{"n_features", "n_outside", "time"}``.
    """
    from ..io.images import image_sources

    t0 = time.perf_counter()
    source = image_sources(image_store if image_store is not None else adata, sample)
    sname = _sample_name(adata, sample, source)
    feats, scales, xy = _check_args(adata, features, spot_scale, scale, bins, levels, sname, flavor)
    image, chans, img_dpp = _resolve(source, channels, sname)
    diam = _diameter(adata, diameter, sname)
    dpp = img_dpp / float(scale)
    out_dpp = max(dpp, img_dpp)  # bound on the read's full-resolution units per pixel
    ctx = {"flavor": flavor, "chans": chans, "image": image, "sname": sname, "diam": diam, "scales": scales,
           "dpp": dpp, "out_dpp": out_dpp, "seg": str(segmentation_key), "device": resolve_device(use_gpu),
           "margin": max(diam * max(scales) / 2.0, 1.5 * out_dpp) + 4.0 * out_dpp, "sides": None,
           "tags": [f"s{s:g}:" for s in scales] if len(scales) > 1 else [""],
           "grey": chans[0] if len(chans) == 1 else image}
    if flavor == "squidpy":
        ctx.update(_squidpy_setup(source, image, diam, scales, scale, sname))
        ctx["kw"] = dict(features=feats, bins=int(bins), mask_circle=bool(mask_circle))
    else:
        ctx["kw"] = dict(features=feats, bins=int(bins), levels=int(levels), distances=DISTANCES)
    x, names, outside = _features_by_tile(adata, xy, ctx, sample, image_store)
    if x is None:
        raise InputError(f"{_where(sname)}: no spot of obsm['spatial'] lies on image {image!r}")
    n_out = int(outside.sum())
    if n_out:
        fill = "set to 0 (squidpy's padding)" if flavor == "squidpy" else "mirrored"
        logger.warning(f"image_features: {n_out} of {len(xy)} spot crops of {_where(sname)} reach outside "
                       f"image {image!r}; their pixels are {fill} (flagged in obs['{key_added}.outside'])")
    params = _params(ctx, feats, scale, bins, levels, mask_circle, flavor)
    if image_store is not None:
        params["image_store"] = str(getattr(image_store, "path", image_store))
    adata.obsm[key_added] = x
    adata.obs[f"{key_added}.outside"] = outside
    adata.uns[key_added] = {"params": params, "columns": list(names), "n_outside": n_out, "version": _version()}
    return {"n_features": len(names), "n_outside": n_out, "time": time.perf_counter() - t0}


def _params(ctx, feats, scale, bins, levels, mask_circle, flavor) -> dict:
    p = {"channels": list(ctx["chans"]), "image": ctx["image"], "features": list(feats), "spot_scale": ctx["scales"],
         "diameter": ctx["diam"], "scale": float(scale), "dpp": float(ctx["dpp"]), "bins": int(bins),
         "flavor": flavor, "sample": ctx["sname"] if ctx["sname"] is not None else ""}
    if flavor == "squidpy":
        p.update({"radius": [int(r) for r in ctx["sides"]], "crop_side": [2 * int(r) + 1 for r in ctx["sides"]],
                  "padding": "zero", "mask_circle": bool(mask_circle), "distances": [1]})
    else:
        p.update({"crop_side": [int(s) for s in ctx["sides"]], "levels": int(levels), "distances": list(DISTANCES),
                  "padding": "reflect"})
    if "segmentation" in feats:
        p["segmentation_key"] = ctx["seg"]
    return p
