"""Patches of an image centred on objects, read window by window through an image source, and their scaling.

The image is visited in square tiles (``tile`` image pixels a side, a loop over the non-empty tiles only); the
objects whose patch starts in a tile are cut out of one window read of that tile plus a patch margin, by
fancy indexing (no loop over objects). Pixels outside the image are zero.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError, KeyNotFoundError
from ..io.images import image_sources

__all__ = ["source_for", "resolve", "read_patches", "scale_limits", "apply_scale"]


def source_for(adata, image_store, sample, what: str):
    try:
        return image_sources(image_store if image_store is not None else adata, sample)
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"{what}, sample {sample!r}: {exc}") from exc


def resolve(source, channels: str, sample, what: str):
    """(image, channel spec ``image/c1,c2``, channel names) of ``channels`` in ``source``."""
    try:
        image, idx, names = source.resolve(channels, None)
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"{what}, sample {sample!r}: {exc} (images: {source.images()})") from exc
    if source.kind(image) == "labels":
        raise InputError(f"{what}, sample {sample!r}: {image!r} is a label image, not an intensity image")
    t = source.transform(image)
    if abs(t[0, 1]) > 1e-12 or abs(t[1, 0]) > 1e-12:
        raise InputError(f"{what}, sample {sample!r}: image {image!r} needs an axis-aligned transform")
    names = [str(c).split("/", 1)[-1] for c in names]
    return image, f"{image}/" + ",".join(names), names


def _data_range(i0: int, i1: int, scale: float, off: float):
    """The full-resolution range whose read returns image pixels i0..i1-1 exactly."""
    a, b = (i0 - 0.25 - off) / scale, (i1 - 0.75 - off) / scale
    return (min(a, b), max(a, b))


def _window(source, image, spec, t, r0, r1, c0, c1, n_ch, dtype):
    """Image pixels [r0, r1) x [c0, c1) (zeros outside the image)."""
    h, w = source.shape(image)[:2]
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if rr1 <= rr0 or cc1 <= cc0:
        return np.zeros((r1 - r0, c1 - c0, n_ch), dtype=dtype or np.float32)
    win = source.read(spec, xrange=_data_range(cc0, cc1, t[0, 0], t[0, 2]),
                      yrange=_data_range(rr0, rr1, t[1, 1], t[1, 2]))
    arr = np.asarray(win.array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[:2] != (rr1 - rr0, cc1 - cc0):
        raise InputError(f"image {image!r}: window rows {rr0}:{rr1}, cols {cc0}:{cc1} came back as {arr.shape}")
    out = np.zeros((r1 - r0, c1 - c0, n_ch), dtype=dtype or arr.dtype)
    out[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = arr
    return out


def read_patches(source, image: str, spec: str, n_ch: int, xy: np.ndarray, size, *, tile: int = 1024):
    """Patches ``(n, C, h, w)`` (the image's dtype) centred on the full-resolution points ``xy`` (n, 2)."""
    h, w = (int(v) for v in size)
    t = source.transform(image)
    col = np.rint(t[0, 0] * xy[:, 0] + t[0, 2]).astype(np.int64) - w // 2
    row = np.rint(t[1, 1] * xy[:, 1] + t[1, 2]).astype(np.int64) - h // 2
    out = None
    if xy.shape[0] == 0:
        return np.zeros((0, n_ch, h, w), np.float32)
    tr, tc = np.floor_divide(row, tile), np.floor_divide(col, tile)
    keys, inverse = np.unique(np.stack([tr, tc], 1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    dy, dx = np.arange(h), np.arange(w)
    for k, (kr, kc) in enumerate(keys):  # a loop over image tiles, not objects
        sel = np.nonzero(inverse == k)[0]
        r0, c0 = int(kr) * tile, int(kc) * tile
        win = _window(source, image, spec, t, r0, r0 + tile + h, c0, c0 + tile + w, n_ch,
                      None if out is None else out.dtype)
        if out is None:
            out = np.zeros((xy.shape[0], n_ch, h, w), dtype=win.dtype)
        rr = (row[sel] - r0)[:, None, None] + dy[None, :, None]
        cc = (col[sel] - c0)[:, None, None] + dx[None, None, :]
        out[sel] = np.moveaxis(win[rr, cc], -1, 1)
    return out


def scale_limits(patches: np.ndarray, percentile: float, max_values: int = 4_000_000) -> tuple[list, list]:
    """Per channel, the ``percentile`` and ``100 - percentile`` percentiles of the patch pixels (a regular
    subsample of at most ``max_values`` pixels per channel)."""
    n, c = patches.shape[:2]
    flat = np.moveaxis(patches, 1, 0).reshape(c, -1)
    step = max(1, flat.shape[1] // max_values)
    flat = flat[:, ::step].astype(np.float64)
    if flat.shape[1] == 0:
        return [0.0] * c, [1.0] * c
    lo = np.percentile(flat, percentile, axis=1)
    hi = np.percentile(flat, 100.0 - percentile, axis=1)
    return lo.tolist(), hi.tolist()


def apply_scale(patches: np.ndarray, lo, hi) -> np.ndarray:
    """``clip((x - lo) / (hi - lo), 0, 1)`` per channel, float32."""
    lo = np.asarray(lo, np.float32)[None, :, None, None]
    hi = np.asarray(hi, np.float32)[None, :, None, None]
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    return np.clip((patches.astype(np.float32) - lo) / span, 0.0, 1.0)
