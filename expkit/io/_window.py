"""Windowed reading of (y, x, c) images in full-resolution coordinates (used by :mod:`expkit.io.images`).

Channel specs, affine transforms, the choice of resolution for a requested ``dpp`` and pyramid levels, and
reads that touch only the chunks of a window. See :mod:`expkit.io.images` for the conventions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, KeyNotFoundError

_GROUP = "images"
_PYRAMID = "pyramid"
PYRAMID_AUTO = 4096  # images with a side above this get pyramid levels by default
PYRAMID_MIN = 512  # the coarsest level keeps a side of at least this
_TMP_PREFIX = ".tmp-"
CHUNK = 256

# --------------------------------------------------------------------------------------------
# results and channel specs
# --------------------------------------------------------------------------------------------
@dataclass
class ImageWindow:
    """The result of a windowed read.

    array   : (y, x, c) uint8/uint16 pixels (uint32 object ids for a label image), c = number of requested
              channels, in their order
    extent  : (left, right, bottom, top) in full-resolution coordinates, ready for
              ``ax.imshow(array, extent=extent)`` on an axis whose y grows downwards
              (``bottom`` > ``top``: row 0 is at the smaller y)
    image   : the name of the image it was read from
    channels: the requested channels, "<image>/<channel>"
    dpp     : full-resolution units per output pixel along x (image dpp x read stride)
    """

    array: np.ndarray
    extent: tuple[float, float, float, float]
    image: str
    channels: list[str]
    dpp: float
    level: int = 1  # pyramid level factor read (1: the image itself)

    @property
    def xrange(self) -> tuple[float, float]:
        return (min(self.extent[0], self.extent[1]), max(self.extent[0], self.extent[1]))

    @property
    def yrange(self) -> tuple[float, float]:
        return (min(self.extent[2], self.extent[3]), max(self.extent[2], self.extent[3]))

    def __iter__(self):  # allows ``array, extent = store.read(...)``
        yield self.array
        yield self.extent


def parse_channels(channels: str | Sequence[str]) -> list[tuple[str | None, str]]:
    """``"hires/r,g,b"`` or ``["hires/r", "hires/g"]`` or ``"r,g,b"`` -> [(image or None, channel)]."""
    if isinstance(channels, str):
        channels = [channels]
    out: list[tuple[str | None, str]] = []
    for spec in channels:
        if not isinstance(spec, str) or not spec:
            raise InputError(f"image channels must be strings like 'hires/r', not {spec!r}")
        image, sep, names = spec.rpartition("/")
        for name in names.split(","):
            name = name.strip()
            if not name:
                raise InputError(f"empty channel name in {spec!r}")
            out.append((image if sep else None, name))
    return out


def _check_transform(transform: Any) -> np.ndarray:
    t = np.asarray(transform, dtype=np.float64)
    if t.shape == (2, 3):
        t = np.vstack([t, [0.0, 0.0, 1.0]])
    if t.shape != (3, 3) or not np.allclose(t[2], [0.0, 0.0, 1.0]):
        raise InputError(f"an image transform must be a 3x3 affine matrix, got {t.tolist()}")
    if abs(np.linalg.det(t[:2, :2])) < 1e-12:
        raise InputError(f"an image transform must be invertible, got {t.tolist()}")
    return t


def scale_transform(scale: float) -> np.ndarray:
    """The transform of an image that is the full-resolution image scaled by ``scale``."""
    return np.diag([float(scale), float(scale), 1.0])


# --------------------------------------------------------------------------------------------
# windowed reading on any (y, x, c) array-like (numpy array or h5py dataset)
# --------------------------------------------------------------------------------------------
def _image_dpp(transform: np.ndarray) -> float:
    """Full-resolution units per image pixel (geometric mean of the two axes)."""
    return float(1.0 / np.sqrt(abs(np.linalg.det(transform[:2, :2]))))


def _axis_range(lo: float, hi: float, scale: float, offset: float, n: int) -> tuple[int, int]:
    """Pixel index range [i0, i1) of the pixels overlapping the data interval [lo, hi]."""
    a, b = sorted((lo * scale + offset, hi * scale + offset))
    i0 = int(np.floor(a + 0.5))
    i1 = int(np.ceil(b + 0.5))
    return max(0, min(n, i0)), max(0, min(n, i1))


def _read_window(data, transform: np.ndarray, ch_idx: list[int], xrange, yrange, dpp):
    t = transform
    if abs(t[0, 1]) > 1e-12 or abs(t[1, 0]) > 1e-12:
        raise InputError("windowed reads need an axis-aligned image transform (no rotation/shear)")
    sx, ox, sy, oy = t[0, 0], t[0, 2], t[1, 1], t[1, 2]
    h, w = int(data.shape[0]), int(data.shape[1])
    if xrange is None:
        c0, c1 = 0, w
    else:
        c0, c1 = _axis_range(float(xrange[0]), float(xrange[1]), sx, ox, w)
    if yrange is None:
        r0, r1 = 0, h
    else:
        r0, r1 = _axis_range(float(yrange[0]), float(yrange[1]), sy, oy, h)
    img_dpp = _image_dpp(t)
    step = 1
    if dpp is not None and dpp > 0:
        step = max(1, int(np.floor(float(dpp) / img_dpp + 1e-9)))
    nr = max(0, -(-(r1 - r0) // step))
    nc = max(0, -(-(c1 - c0) // step))
    if nr == 0 or nc == 0:
        arr = np.zeros((nr, nc, len(ch_idx)), dtype=data.dtype)
    else:
        # sample the centre pixel of each step x step block
        off_r = min((step - 1) // 2, r1 - r0 - 1) if step > 1 else 0
        off_c = min((step - 1) // 2, c1 - c0 - 1) if step > 1 else 0
        nchan = int(data.shape[2])
        if len(ch_idx) == nchan and ch_idx == list(range(nchan)):
            csel, cpick = slice(0, nchan), None
        elif all(b == a + 1 for a, b in zip(ch_idx, ch_idx[1:])):
            csel, cpick = slice(ch_idx[0], ch_idx[-1] + 1), None
        else:
            lo, hi = min(ch_idx), max(ch_idx)
            csel, cpick = slice(lo, hi + 1), [c - lo for c in ch_idx]
        if step == 1 or isinstance(data, np.ndarray):
            arr = np.asarray(data[slice(r0 + off_r, r1, step), slice(c0 + off_c, c1, step), csel])
        else:
            arr = _strided_read(data, np.arange(r0 + off_r, r1, step), np.arange(c0 + off_c, c1, step), csel)
        if cpick is not None:
            arr = arr[:, :, cpick]
        nr, nc = arr.shape[0], arr.shape[1]
    # covered area in image coordinates, then back to full resolution
    u0, u1 = c0 - 0.5, c0 + nc * step - 0.5
    v0, v1 = r0 - 0.5, r0 + nr * step - 0.5
    x0, x1 = (u0 - ox) / sx, (u1 - ox) / sx
    y0, y1 = (v0 - oy) / sy, (v1 - oy) / sy
    # imshow extent (left, right, bottom, top): row 0 at "top"
    extent = (float(x0), float(x1), float(y1), float(y0))
    return np.ascontiguousarray(arr), extent, img_dpp * step


def _strided_read(data, rows: np.ndarray, cols: np.ndarray, csel: slice) -> np.ndarray:
    """``data[rows][:, cols][:, :, csel]`` for sorted, evenly spaced ``rows``/``cols`` of a chunked
    dataset, tile by tile: HDF5 strided selections are slow, so each tile of whole chunks holding
    wanted pixels is read contiguously and subsampled in numpy (transient memory: one tile)."""
    chunks = getattr(data, "chunks", None) or (CHUNK, CHUNK)
    tile_r = int(chunks[0])
    tile_c = int(chunks[1]) * max(1, 2048 // int(chunks[1]))
    nch = len(range(*csel.indices(int(data.shape[2]))))
    out = np.empty((len(rows), len(cols), nch), dtype=data.dtype)
    rgroups = np.flatnonzero(np.diff(rows // tile_r, prepend=-1))
    cgroups = np.flatnonzero(np.diff(cols // tile_c, prepend=-1))
    for gi, a in enumerate(rgroups):
        b = rgroups[gi + 1] if gi + 1 < len(rgroups) else len(rows)
        rs = rows[a:b]
        for gj, c in enumerate(cgroups):
            d = cgroups[gj + 1] if gj + 1 < len(cgroups) else len(cols)
            cs = cols[c:d]
            slab = data[int(rs[0]):int(rs[-1]) + 1, int(cs[0]):int(cs[-1]) + 1, csel]
            out[a:b, c:d] = slab[rs - rs[0]][:, cs - cs[0]]
    return out


class _Source:
    """Shared channel resolution and image choice (ImageStore and in-memory uns images)."""

    def _meta(self) -> dict[str, tuple[tuple[int, ...], list[str], np.ndarray]]:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    def images(self) -> list[str]:
        """Names of the images held."""
        return sorted(self._meta())

    def _kinds(self) -> dict[str, str]:
        return {}

    def kind(self, image: str) -> str:
        """``"labels"`` for a label image (uint32 object ids, 0 = background), else ``"image"``."""
        meta = self._meta()
        if image not in meta:
            raise KeyNotFoundError(f"no image {image!r} in {self._where()}; available: {sorted(meta)}")
        return self._kinds().get(image, "image")

    def channels(self) -> list[str]:
        """Every channel, ``"<image>/<channel>"``."""
        meta = self._meta()
        return [f"{name}/{c}" for name in sorted(meta) for c in meta[name][1]]

    def transform(self, image: str) -> np.ndarray:
        """The 3x3 affine from full-resolution (x, y) to this image's pixel (col, row)."""
        meta = self._meta()
        if image not in meta:
            raise KeyNotFoundError(f"no image {image!r} in {self._where()}; available: {sorted(meta)}")
        return meta[image][2].copy()

    def shape(self, image: str) -> tuple[int, ...]:
        meta = self._meta()
        if image not in meta:
            raise KeyNotFoundError(f"no image {image!r} in {self._where()}; available: {sorted(meta)}")
        return tuple(meta[image][0])

    def resolve(self, channels, dpp: float | None = None) -> tuple[str, list[int], list[str]]:
        """Pick the image and channel indices for a channel spec (see module doc)."""
        meta = self._meta()
        parsed = parse_channels(channels)
        images = {img for img, _ in parsed}
        available = self.channels()
        if None in images and len(images) > 1:
            raise InputError(f"channels {channels!r} mix image-qualified and bare names")
        if None in images:
            names = [c for _, c in parsed]
            candidates = [img for img, m in meta.items() if all(c in m[1] for c in names)]
            if not candidates:
                raise KeyNotFoundError(
                    f"no image in {self._where()} holds channels {names}; available: {available}")
            image = _choose_by_dpp({img: _image_dpp(meta[img][2]) for img in candidates}, dpp)
        else:
            if len(images) > 1:
                raise InputError(
                    f"channels {channels!r} come from several images {sorted(images)}; "
                    "read (and plot) one image at a time")
            image = images.pop()
            if image not in meta:
                raise KeyNotFoundError(
                    f"no image {image!r} in {self._where()} (channels {channels!r}); "
                    f"available: {available}")
        chans = meta[image][1]
        idx = []
        for _, c in parsed:
            if c not in chans:
                raise KeyNotFoundError(
                    f"no channel {image}/{c} in {self._where()}; available: {available}")
            idx.append(chans.index(c))
        return image, idx, [f"{image}/{chans[i]}" for i in idx]

    def _dataset(self, key: str):  # context manager yielding the (y, x, c) array-like
        raise NotImplementedError

    def _levels(self, image: str) -> list[tuple[str, int, np.ndarray]]:
        """(dataset key, factor, transform) of the image and its pyramid levels, finest first."""
        return [(image, 1, self._meta()[image][2])]

    def read(self, channels, xrange=None, yrange=None, dpp: float | None = None) -> ImageWindow:
        """Read ``channels`` over the full-resolution window ``xrange`` x ``yrange``.

        ``xrange``/``yrange``: (min, max) in full-resolution pixels (None: the whole image).
        ``dpp``: wanted data units per output pixel; picks the image (for bare channel names) and
        a read stride (when the image is at least twice finer). The returned window covers the
        requested one (clipped to the image) to the nearest pixel; its exact ``extent`` is returned.
        """
        image, idx, names = self.resolve(channels, dpp)
        levels = self._levels(image)
        key, factor, t = levels[0]
        if len(levels) > 1 and dpp is not None:
            pick = _choose_by_dpp({lv[0]: _image_dpp(lv[2]) for lv in levels}, dpp)
            key, factor, t = next(lv for lv in levels if lv[0] == pick)
        with self._dataset(key) as data:
            arr, extent, out_dpp = _read_window(data, t, idx, xrange, yrange, dpp)
        return ImageWindow(arr, extent, image, names, out_dpp, factor)


def _choose_by_dpp(dpps: dict[str, float], dpp: float | None) -> str:
    """Coarsest image at least as fine as ``dpp``; the finest when none is (or dpp is None)."""
    finest = min(dpps, key=lambda k: (dpps[k], k))
    if dpp is None:
        return finest
    fine_enough = [k for k, v in dpps.items() if v <= float(dpp) * (1 + 1e-6)]
    if not fine_enough:
        return finest
    return max(fine_enough, key=lambda k: (dpps[k], k))


class _NullCtx:
    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        return self.obj

    def __exit__(self, *exc):
        return False


def level_transform(t: np.ndarray, factor: int) -> np.ndarray:
    """Transform of a level block-averaging ``factor`` x ``factor`` pixels of an image with transform
    ``t``: level pixel k covers image pixels [f k, f k + f), centred at image coordinate f k + (f-1)/2."""
    f = float(factor)
    d = np.array([[1 / f, 0.0, -(f - 1) / (2 * f)], [0.0, 1 / f, -(f - 1) / (2 * f)], [0.0, 0.0, 1.0]])
    return d @ t


def _down2(block: np.ndarray) -> np.ndarray:
    """2x2 block means (rounded), the last row/column repeated when odd."""
    if block.shape[0] % 2:
        block = np.concatenate([block, block[-1:]], axis=0)
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    acc = block[0::2, 0::2].astype(np.uint32)
    acc += block[1::2, 0::2]
    acc += block[0::2, 1::2]
    acc += block[1::2, 1::2]
    acc += 2
    acc >>= 2
    return acc.astype(block.dtype)


def _take2(block: np.ndarray) -> np.ndarray:
    """The top-left pixel of each 2x2 block (label images: object ids are taken, never averaged)."""
    return np.ascontiguousarray(block[0::2, 0::2])


def _downsample_dataset(src, dst, chunk: int, nearest: bool = False) -> None:
    """dst = 2x block means of src (``nearest``: the top-left pixel of each block), tile by tile
    (memory: one tile)."""
    tile_c = chunk * 8
    down = _take2 if nearest else _down2
    for r0 in range(0, int(dst.shape[0]), chunk):
        for c0 in range(0, int(dst.shape[1]), tile_c):
            out = down(np.asarray(src[2 * r0:2 * (r0 + chunk), 2 * c0:2 * (c0 + tile_c)]))
            dst[r0:r0 + out.shape[0], c0:c0 + out.shape[1]] = out


