"""Per-spot image features: colour summaries, colour histograms and GLCM texture of a crop around each spot.

The features are those of :mod:`expkit.kernels.image_features` (see there for the definitions, the crop
geometry and the reflection padding of crops that leave the image); this module reads the image around
the spots tile by tile, so a whole-slide image is never read at once.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..kernels import image_features as K
from ..kernels.device import resolve_device

__all__ = ["image_features"]

TILE = 2048  # output pixels per side of one window read (memory: about TILE^2 x channels values)
DISTANCES = (1, 2)


def _version() -> str:
    from .. import __version__

    return __version__


def _sample_name(adata, sample, source) -> str | None:
    if sample is not None:
        return str(sample)
    if getattr(source, "sample", None) is not None:
        return str(source.sample)
    spatial = adata.uns.get("spatial")
    if isinstance(spatial, dict) and len(spatial) == 1:
        return str(next(iter(spatial)))
    if "sample" in adata.obs and adata.obs["sample"].nunique() == 1:
        return str(adata.obs["sample"].iloc[0])
    return None


def _where(sample: str | None) -> str:
    return f"sample {sample!r}" if sample is not None else "the AnnData"


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


def _check_args(adata, features, spot_scale, scale, bins, levels, sample):
    feats = K.check_families(features)
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


def _tile_features(win, xy, sides, tags, kw, grey, device):
    """Features of the spots ``xy`` from one window, all crop scales side by side."""
    left, right, bottom, top = win.extent
    h, w = win.array.shape[:2]
    col = (xy[:, 0] - left) * w / (right - left) - 0.5
    row = (xy[:, 1] - top) * h / (bottom - top) - 0.5
    blocks, names, outside = [], [], np.zeros(len(xy), dtype=bool)
    for side, tag in zip(sides, tags):
        x, nm, out = K.crop_features(win.array, np.column_stack([col, row]), side, channel_names=win.channels,
                                     grey_name=grey, prefix=tag, device=device, **kw)
        blocks.append(x)
        names += nm
        outside |= out
    return np.concatenate(blocks, axis=1), names, outside


def _features_by_tile(adata, xy, chans, dpp, margin, out_dpp, diam, scales, tags, kw, grey, device, sample,
                      image_store):
    """Read the image per tile of spots (bounded memory) and compute the features of the tile's spots.
    Spots whose window holds no pixel (beyond the image) get NaN features and the outside flag."""
    from ..io.images import get_image

    x = outside = names = sides = None
    for idx in _tiles(xy, TILE * out_dpp):
        lo, hi = xy[idx].min(0) - margin, xy[idx].max(0) + margin
        win = get_image(adata, chans, xrange=(lo[0], hi[0]), yrange=(lo[1], hi[1]), dpp=dpp, sample=sample,
                        image_store=image_store)
        left, right = win.extent[:2]
        empty = win.array.shape[0] == 0 or win.array.shape[1] == 0
        px = 1.0 / win.dpp if empty else win.array.shape[1] / (right - left)  # image pixels per unit
        if sides is None:
            sides = [max(3, int(np.floor(diam * s * px + 0.5))) for s in scales]
        if empty:
            continue
        xt, nt, ot = _tile_features(win, xy[idx], sides, tags, kw, grey, device)
        if x is None:
            names = nt
            x = np.full((len(xy), len(nt)), np.nan, dtype=np.float32)
            outside = np.ones(len(xy), dtype=bool)
        x[idx], outside[idx] = xt, ot
    return x, names, outside, sides


def image_features(adata, *, channels: str | Sequence[str] = "r,g,b", features=K.FAMILIES,
                   spot_scale: float | Sequence[float] = (1.0,), diameter: float | None = None, scale: float = 1.0,
                   bins: int = 10, levels: int = 8, sample: str | None = None, image_store=None,
                   key_added: str = "img.features", use_gpu: bool = False) -> dict:
    """Image features of a square crop around each spot: colour summary, colour histogram, GLCM texture.

    ``channels``: image channels (``"r,g,b"`` picks the finest image holding them, ``"lowres/r,g,b"`` names
    the image); ``features``: any of ``"summary"`` (per channel mean, std, quantiles 0.1/0.5/0.9),
    ``"histogram"`` (per channel fractions in ``bins`` equal bins over the dtype's range) and ``"texture"``
    (contrast, dissimilarity, homogeneity, correlation, ASM of the symmetric GLCM of the luminance quantised
    to ``levels`` grey levels, at distances 1 and 2, averaged over 4 angles); see
    :mod:`expkit.kernels.image_features`. ``diameter``: the crop side at ``spot_scale`` 1, in full-resolution
    pixels (default: the Visium ``spot_diameter_fullres``); one crop per ``spot_scale`` (side = diameter x
    spot_scale converted to image pixels, at least 3), whose names get a ``"s<scale>:"`` prefix when there
    are several. ``scale``: resolution relative to the chosen image's native one (0.5: half; the image is
    never upsampled). Crops leaving the image are filled by reflection and flagged.

    Writes ``obsm[key_added]`` (float32 spots x features), ``obs[key_added + ".outside"]`` and
    ``uns[key_added] = {"params", "columns", "n_outside", "version"}``. Returns
    ``{"n_features", "n_outside", "time"}``.
    """
    from ..io.images import image_sources

    t0 = time.perf_counter()
    source = image_sources(image_store if image_store is not None else adata, sample)
    sname = _sample_name(adata, sample, source)
    feats, scales, xy = _check_args(adata, features, spot_scale, scale, bins, levels, sname)
    image, chans, img_dpp = _resolve(source, channels, sname)
    diam = _diameter(adata, diameter, sname)
    dpp = img_dpp / float(scale)
    out_dpp = max(dpp, img_dpp)  # bound on the read's full-resolution units per pixel
    margin = max(diam * max(scales) / 2.0, 1.5 * out_dpp) + 4.0 * out_dpp
    tags = [f"s{s:g}:" for s in scales] if len(scales) > 1 else [""]
    grey = chans[0] if len(chans) == 1 else image
    kw = dict(features=feats, bins=int(bins), levels=int(levels), distances=DISTANCES)
    x, names, outside, sides = _features_by_tile(adata, xy, chans, dpp, margin, out_dpp, diam, scales, tags, kw,
                                                 grey, resolve_device(use_gpu), sample, image_store)
    if x is None:
        raise InputError(f"{_where(sname)}: no spot of obsm['spatial'] lies on image {image!r}")
    n_out = int(outside.sum())
    if n_out:
        logger.warning(f"image_features: {n_out} of {len(xy)} spot crops of {_where(sname)} reach outside "
                       f"image {image!r}; their pixels are mirrored (flagged in obs['{key_added}.outside'])")
    params = {"channels": list(chans), "image": image, "features": list(feats), "spot_scale": scales,
              "diameter": diam, "scale": float(scale), "dpp": float(dpp), "crop_side": [int(s) for s in sides],
              "bins": int(bins), "levels": int(levels), "distances": list(DISTANCES), "padding": "reflect",
              "sample": sname if sname is not None else ""}
    if image_store is not None:
        params["image_store"] = str(getattr(image_store, "path", image_store))
    adata.obsm[key_added] = x
    adata.obs[f"{key_added}.outside"] = outside
    adata.uns[key_added] = {"params": params, "columns": list(names), "n_outside": n_out, "version": _version()}
    return {"n_features": len(names), "n_outside": n_out, "time": time.perf_counter() - t0}
