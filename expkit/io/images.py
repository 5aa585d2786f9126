"""Tissue images: a chunked HDF5 store per sample, windowed reads in full-resolution coordinates.

One sample's images live in ONE HDF5 file (:class:`ImageStore`). Each image is a dataset
``/images/<name>`` of shape (y, x, c), dtype uint8 or uint16, chunked in 256 x 256 tiles and
compressed, with two attributes:

* ``channels``: the channel names, e.g. ``["r", "g", "b"]`` or ``["0"]``;
* ``transform``: a 3 x 3 affine matrix taking full-resolution pixel coordinates ``(x, y, 1)`` (the
  coordinates of ``obsm["spatial"]``) to this image's pixel coordinates ``(col, row, 1)``. Visium:
  ``diag(s, s, 1)`` with ``s = tissue_hires_scalef`` / ``tissue_lowres_scalef``.

Pixel convention (the one of ``plt.imshow`` and of scverse): the centre of pixel ``[row, col]`` is
at image coordinate ``(col, row)``, the pixel covers ``[col - 0.5, col + 0.5)``.

Channels are addressed ``"<image>/<channel>"`` (``"hires/r"``, ``"dapi/0"``); ``"<image>/r,g,b"``
names several channels of one image; a bare ``"r,g,b"`` (no image) lets :meth:`ImageStore.read`
pick, among the images holding those channels, the one best suited to the requested resolution
``dpp`` (data units, i.e. full-resolution pixels, per output pixel).

Large images (a side above 4096 px, or ``pyramid=True``) also get 2x, 4x, ... block-averaged
levels ``/pyramid/<name>/<factor>`` (same channels; not listed as images). A read picks, for the
requested ``dpp``, the coarsest level still at least as fine, then strides by the remaining factor.

Reads touch only the chunks of the requested window (h5py hyperslab selection); a strided read goes
tile by tile (a few chunks at a time) and subsamples in numpy, so a whole-slide overview costs
memory of the order of the output plus one tile, never the image.

File layout (format "expkit.images", version 1)::

    /images/<name>              (y, x, c) uint8|uint16, chunks (256, 256, c), gzip (default) or lzf
        attrs: channels (str array), transform (3x3 float64)
    /pyramid/<name>/<factor>    (ceil(y/f), ceil(x/f), c), attrs: factor, transform

Only axis-aligned transforms (scale, flip, translation; no rotation or shear) can be read as windows.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import FormatError, InputError, KeyNotFoundError

__all__ = [
    "ImageStore",
    "ImageWindow",
    "images_from_uns",
    "get_image",
    "parse_channels",
    "image_sources",
]

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

    array   : (y, x, c) uint8/uint16 pixels, c = number of requested channels, in their order
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


# --------------------------------------------------------------------------------------------
# the HDF5 store
# --------------------------------------------------------------------------------------------
class ImageStore(_Source):
    """The images of one sample in one chunked, compressed HDF5 file.

    >>> store = ImageStore("sample1.images.h5")
    >>> store.write("hires", rgb, channels=["r", "g", "b"], transform=scale_transform(0.15))
    >>> win = store.read("hires/r,g,b", xrange=(1000, 3000), yrange=(2000, 4000), dpp=4)
    >>> ax.imshow(win.array, extent=win.extent)

    The file is opened for each call and closed again (no handle is held), so a store object is
    cheap, picklable and safe to use while another process replaces the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cache: tuple[Any, dict] | None = None

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r})"

    def __reduce__(self):
        return (type(self), (self.path,))

    # -- file access (overridable, e.g. by tests counting bytes read) --
    def _open(self, mode: str = "r"):
        import h5py

        if mode == "r" and not self.path.exists():
            raise FormatError(f"image store {self.path} does not exist")
        try:
            return h5py.File(self.path, mode)
        except OSError as exc:
            raise FormatError(f"cannot open image store {self.path}: {exc}") from exc

    def _where(self) -> str:
        return f"image store {self.path}"

    def _meta(self):
        if not self.path.exists():
            return {}
        st = self.path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        meta, levels = {}, {}
        with self._open("r") as f:
            grp = f.get(_GROUP)
            pyr = f.get(_PYRAMID)
            if grp is not None:
                for name, ds in grp.items():
                    if name.startswith(_TMP_PREFIX):
                        continue
                    chans = [c.decode() if isinstance(c, bytes) else str(c) for c in ds.attrs["channels"]]
                    t = np.asarray(ds.attrs["transform"], dtype=np.float64)
                    meta[name] = (tuple(ds.shape), chans, t)
                    lv = [(f"{_GROUP}/{name}", 1, t)]
                    if pyr is not None and name in pyr:
                        for fac in sorted(pyr[name], key=int):
                            d = pyr[name][fac]
                            lv.append((f"{_PYRAMID}/{name}/{fac}", int(fac),
                                       np.asarray(d.attrs["transform"], dtype=np.float64)))
                    levels[name] = lv
        self._cache = (key, meta, levels)
        return meta

    def _levels(self, image: str):
        self._meta()
        return self._cache[2][image] if self._cache is not None else super()._levels(image)

    def levels(self, image: str) -> list[int]:
        """Downsampling factors stored for ``image`` (1 = the image itself)."""
        if image not in self._meta():
            raise KeyNotFoundError(f"no image {image!r} in {self._where()}; available: {self.images()}")
        return [lv[1] for lv in self._levels(image)]

    def _dataset(self, key: str):
        store = self
        path = key if "/" in key else f"{_GROUP}/{key}"

        class _Ctx:
            def __enter__(self_inner):
                self_inner.f = store._open("r")
                return self_inner.f[path]

            def __exit__(self_inner, *exc):
                self_inner.f.close()
                return False

        return _Ctx()

    def __contains__(self, image: str) -> bool:
        return image in self._meta()

    def __len__(self) -> int:
        return len(self._meta())

    # -- writing --
    def write(self, name: str, array, *, channels: Sequence[str] | None = None,
              transform=None, overwrite: bool = False, compression: str | None = "gzip",
              compression_opts: int | None = 4, chunk: int = CHUNK, pyramid: bool | None = None) -> None:
        """Write image ``name`` (a (y, x, c) or (y, x) uint8/uint16 array-like).

        ``array`` may be any object with ``shape``, ``dtype`` and numpy slicing (an h5py or zarr
        dataset, a memmap, a lazy tile generator): it is copied in bands of ``chunk`` rows, so an
        image larger than memory can be written. ``channels`` default to ``r,g,b(,a)`` for 3/4
        channels, ``0..c-1`` otherwise; ``transform`` (3x3, full-resolution (x, y) -> image
        (col, row)) defaults to the identity (a full-resolution image).

        ``pyramid``: also store 2x, 4x, ... block-averaged levels (under ``/pyramid/<name>/<factor>``,
        down to a side of 512), used by :meth:`read` when ``dpp`` is coarse, so that an overview of a
        whole large image reads a small level instead of striding through the full image.
        None (default): only for images with a side above 4096 pixels.

        Atomicity: when the file does not exist yet, it is written as a temporary file in the same
        folder and moved into place with ``os.replace``, so a crash never leaves a partial store.
        When the file exists, the image is written as a hidden dataset ``.tmp-<name>`` and renamed
        to ``name`` (one HDF5 link operation) only once complete, so readers never see a partial
        image; leftovers of an interrupted write are ignored and removed by the next write.
        """
        if not isinstance(name, str) or not name or "/" in name or "," in name or name.startswith("."):
            raise InputError(f"image names must be non-empty, without '/', ',' or a leading '.': {name!r}")
        shape = tuple(int(s) for s in array.shape)
        if len(shape) == 2:
            shape = (*shape, 1)
            flat = True
        elif len(shape) == 3:
            flat = False
        else:
            raise InputError(f"image {name!r} must be (y, x) or (y, x, c), got shape {shape}")
        dtype = np.dtype(array.dtype)
        if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise InputError(f"image {name!r} must be uint8 or uint16, got {dtype} (see images_from_uns "
                             "for converting float images)")
        c = shape[2]
        if channels is None:
            channels = ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]
        channels = [str(x) for x in channels]
        if len(channels) != c or len(set(channels)) != c or any("," in x or "/" in x for x in channels):
            raise InputError(f"image {name!r}: {c} channels need {c} distinct names without ',' or '/', "
                             f"got {channels}")
        t = _check_transform(np.eye(3) if transform is None else transform)
        if pyramid is None:
            pyramid = max(shape[0], shape[1]) > PYRAMID_AUTO
        wargs = (shape, flat, dtype, channels, t, compression, compression_opts, chunk, pyramid)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + self.path.name, dir=self.path.parent)
            os.close(fd)
            try:
                import h5py

                with h5py.File(tmp, "w") as f:
                    f.attrs["format"] = "expkit.images"
                    f.attrs["format_version"] = 1
                    self._write_image(f, name, name, array, *wargs)
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            with self._open("a") as f:
                grp = f.require_group(_GROUP)
                pyr = f.require_group(_PYRAMID)
                for g in (grp, pyr):
                    for k in [k for k in g if k.startswith(_TMP_PREFIX)]:
                        del g[k]
                if name in grp and not overwrite:
                    raise InputError(f"image {name!r} already exists in {self._where()} (overwrite=True)")
                tmpname = _TMP_PREFIX + name
                self._write_image(f, tmpname, name, array, *wargs)
                if name in grp:
                    del grp[name]
                if name in pyr:
                    del pyr[name]
                grp.move(tmpname, name)
                if tmpname in pyr:
                    pyr.move(tmpname, name)
        self._cache = None

    @staticmethod
    def _write_image(f, dsname, name, array, shape, flat, dtype, channels, t, compression, compression_opts,
                     chunk, pyramid):
        """The image in bands of ``chunk`` rows; pyramid levels up to factor ``chunk`` are made from
        each band as it passes (no read-back), deeper ones from the previous level."""
        kw = {}
        if compression:
            kw["compression"] = compression
            if compression == "gzip" and compression_opts is not None:
                kw["compression_opts"] = compression_opts
            kw["shuffle"] = dtype.itemsize > 1
        h, w, c = shape
        band = max(1, min(chunk, h))
        ds = f.require_group(_GROUP).create_dataset(dsname, shape=shape, dtype=dtype,
                                                    chunks=(band, max(1, min(chunk, w)), c), **kw)
        levels = []  # (factor, dataset)
        if pyramid:
            pgrp = f.require_group(_PYRAMID).require_group(dsname)
            fac, lh, lw = 1, h, w
            while max(lh, lw) // 2 >= PYRAMID_MIN:
                fac, lh, lw = fac * 2, -(-lh // 2), -(-lw // 2)
                d = pgrp.create_dataset(str(fac), shape=(lh, lw, c), dtype=dtype,
                                        chunks=(min(chunk, lh), min(chunk, lw), c), **kw)
                d.attrs["factor"] = fac
                d.attrs["transform"] = level_transform(t, fac)
                levels.append((fac, d))
        streamed = [(fac, d) for fac, d in levels if fac <= band and band % fac == 0]
        # level rows are buffered up to whole chunk rows: a partial chunk write would make HDF5
        # decompress, patch and recompress that chunk once per band
        pending: list[list[np.ndarray]] = [[] for _ in streamed]
        written = [0 for _ in streamed]

        def flush(i: int, final: bool = False) -> None:
            d = streamed[i][1]
            rows = sum(p.shape[0] for p in pending[i])
            if rows and (final or rows >= d.chunks[0]):
                block = np.concatenate(pending[i], axis=0) if len(pending[i]) > 1 else pending[i][0]
                d[written[i]:written[i] + rows] = block
                written[i] += rows
                pending[i].clear()

        for r0 in range(0, h, band):
            block = np.asarray(array[r0:r0 + band])
            if flat:
                block = block[:, :, None]
            if block.shape[1:] != (w, c):
                raise InputError(f"image {name!r}: rows {r0}.. came back with shape {block.shape}, "
                                 f"expected (rows, {w}, {c})")
            block = block.astype(dtype, copy=False)
            ds[r0:r0 + block.shape[0]] = block
            cur = block
            for i in range(len(streamed)):
                cur = _down2(cur)
                pending[i].append(cur)
                flush(i)
        for i in range(len(streamed)):
            flush(i, final=True)
        prev = streamed[-1][1] if streamed else ds
        for fac, d in levels[len(streamed):]:
            _downsample_dataset(prev, d, chunk)
            prev = d
        ds.attrs["channels"] = np.array(channels, dtype=object)
        ds.attrs["transform"] = t
        return ds

    def delete(self, name: str) -> None:
        """Remove image ``name`` (the file keeps its size until repacked)."""
        with self._open("a") as f:
            grp = f.require_group(_GROUP)
            if name not in grp:
                raise KeyNotFoundError(f"no image {name!r} in {self._where()}; available: {self.images()}")
            del grp[name]
            if _PYRAMID in f and name in f[_PYRAMID]:
                del f[_PYRAMID][name]
        self._cache = None

    def fill_from_uns(self, adata, sample: str | None = None, *, overwrite: bool = False) -> list[str]:
        """Write every image of ``adata.uns['spatial'][sample]`` into this store; returns the names."""
        names = []
        for name, array, chans, t in images_from_uns(adata, sample):
            if name in self and not overwrite:
                continue
            self.write(name, array, channels=chans, transform=t, overwrite=overwrite)
            names.append(name)
        return names


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


def _downsample_dataset(src, dst, chunk: int) -> None:
    """dst = 2x block means of src, tile by tile (memory: one tile)."""
    tile_c = chunk * 8
    for r0 in range(0, int(dst.shape[0]), chunk):
        for c0 in range(0, int(dst.shape[1]), tile_c):
            out = _down2(np.asarray(src[2 * r0:2 * (r0 + chunk), 2 * c0:2 * (c0 + tile_c)]))
            dst[r0:r0 + out.shape[0], c0:c0 + out.shape[1]] = out


# --------------------------------------------------------------------------------------------
# in-memory images of an AnnData (scverse uns layout)
# --------------------------------------------------------------------------------------------
def _uns_sample(adata, sample: str | None) -> tuple[str, dict]:
    spatial = adata.uns.get("spatial") if hasattr(adata, "uns") else None
    if not isinstance(spatial, dict) or not spatial:
        raise KeyNotFoundError("the AnnData has no uns['spatial'] images"
                               + (f" (sample {sample!r})" if sample else ""))
    if sample is None:
        if len(spatial) == 1:
            sample = next(iter(spatial))
        else:
            obs_sample = None
            if "sample" in adata.obs and adata.obs["sample"].nunique() == 1:
                obs_sample = str(adata.obs["sample"].iloc[0])
            if obs_sample in spatial:
                sample = obs_sample
            else:
                raise InputError(f"uns['spatial'] holds several samples {sorted(spatial)}; pass sample=")
    if sample not in spatial:
        raise KeyNotFoundError(f"no sample {sample!r} in uns['spatial']; available: {sorted(spatial)}")
    return sample, spatial[sample]


def _to_uint(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype in (np.uint8, np.uint16):
        return a
    if np.issubdtype(a.dtype, np.floating):
        hi = float(np.nanmax(a)) if a.size else 1.0
        if hi <= 1.0 + 1e-6:  # matplotlib.image.imread gives floats in [0, 1]
            return np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
        return np.clip(np.rint(np.nan_to_num(a)), 0, 65535).astype(np.uint16)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        hi = int(a.max()) if a.size else 0
        return a.astype(np.uint8 if hi <= 255 else np.uint16)
    raise InputError(f"cannot store an image of dtype {a.dtype}")


def _uns_scale(name: str, scalefactors: dict) -> float:
    for key in (f"tissue_{name}_scalef", f"{name}_scalef", f"tissue_{name}_scalefactor"):
        if key in scalefactors:
            return float(scalefactors[key])
    return 1.0


def images_from_uns(adata, sample: str | None = None) -> list[tuple[str, np.ndarray, list[str], np.ndarray]]:
    """The images of ``adata.uns['spatial'][sample]`` as (name, array, channels, transform).

    Arrays come back as (y, x, c) uint8/uint16 (float images in [0, 1] become uint8); channels are
    r,g,b(,a) for 3/4 channels, else 0..c-1; the transform scales by the scalefactor
    ``tissue_<name>_scalef`` (``hires``/``lowres``), identity when there is none.
    """
    sample, entry = _uns_sample(adata, sample)
    images = entry.get("images") or {}
    sf = entry.get("scalefactors") or {}
    out = []
    for name in sorted(images):
        a = _to_uint(images[name])
        if a.ndim == 2:
            a = a[:, :, None]
        c = a.shape[2]
        chans = ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]
        out.append((name, a, chans, scale_transform(_uns_scale(name, sf))))
    return out


class _UnsImages(_Source):
    def __init__(self, adata, sample: str | None = None):
        self.sample, entry = _uns_sample(adata, sample)
        self._m = {}
        self._arrays = {}
        sf = entry.get("scalefactors") or {}
        for name, img in (entry.get("images") or {}).items():
            a = np.asarray(img)
            if a.ndim == 2:
                a = a[:, :, None]
            c = a.shape[2]
            chans = ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]
            self._arrays[name] = a
            self._m[name] = (a.shape, chans, scale_transform(_uns_scale(name, sf)))

    def _meta(self):
        return self._m

    def _where(self) -> str:
        return f"uns['spatial'][{self.sample!r}]['images']"

    def _dataset(self, image: str):
        return _NullCtx(self._arrays[image])

    def read(self, channels, xrange=None, yrange=None, dpp=None) -> ImageWindow:
        win = super().read(channels, xrange, yrange, dpp)
        win.array = _to_uint(win.array)
        return win


def image_sources(adata_or_store, sample: str | None = None) -> _Source:
    """An ImageStore (or a path to one) as is; for an AnnData, the store named by
    ``uns['spatial'][sample]['image_store']`` (a path, set by the Experiment when it holds the
    sample's images on disk) when that file exists, else its in-memory uns images wrapped alike."""
    if isinstance(adata_or_store, _Source):
        return adata_or_store
    if isinstance(adata_or_store, (str, os.PathLike)):
        return ImageStore(adata_or_store)
    if hasattr(adata_or_store, "uns"):
        sample, entry = _uns_sample(adata_or_store, sample)
        path = entry.get("image_store")
        if isinstance(path, (str, os.PathLike)) and str(path) and Path(path).is_file():
            return ImageStore(path)
        return _UnsImages(adata_or_store, sample)
    raise InputError(f"expected an AnnData, an ImageStore or a path, got {type(adata_or_store).__name__}")


def get_image(adata_or_store, channels, *, xrange=None, yrange=None, dpp: float | None = None,
              sample: str | None = None, image_store=None) -> ImageWindow:
    """Read image ``channels`` over a full-resolution window from an ImageStore or an AnnData.

    ``adata_or_store``: an :class:`ImageStore`, a path to one, or an AnnData whose
    ``uns['spatial'][sample]`` holds images in memory (``sample`` may be omitted when there is one).
    ``image_store`` (given by an Experiment for its samples) takes precedence: only the window's chunks
    of the stored image are read.
    Returns an :class:`ImageWindow` (``array, extent = get_image(...)`` also works).
    """
    source = image_sources(image_store if image_store is not None else adata_or_store, sample)
    return source.read(channels, xrange=xrange, yrange=yrange, dpp=dpp)

