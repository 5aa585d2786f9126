"""Tissue images: a chunked HDF5 store per sample, windowed reads in full-resolution coordinates.

One sample's images live in ONE HDF5 file (:class:`ImageStore`). Each image is a dataset
``/images/<name>`` of shape (y, x, c), dtype uint8 or uint16, chunked in 256 x 256 tiles and
compressed, with two attributes:

* ``channels``: the channel names, e.g. ``["r", "g", "b"]`` or ``["0"]``;
* ``kind`` (label images only): ``"labels"``, see below;
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
levels ``/pyramid/<name>/<factor>`` (same channels; not listed as images).

Label images (``write(..., labels=True)``, e.g. a nuclei segmentation) hold uint32 object ids, 0 the
background, one channel (default name ``label``), attribute ``kind = "labels"``. Their pyramid levels
take the top-left pixel of each 2 x 2 block instead of averaging, and strided reads (like every read)
take pixels, so any read returns only ids that exist. In memory (``uns['spatial'][s]['images']``) a
uint32 array is a label image (channel ``label``), never rescaled. A read picks, for the
requested ``dpp``, the coarsest level still at least as fine, then strides by the remaining factor.

Reads touch only the chunks of the requested window (h5py hyperslab selection); a strided read goes
tile by tile (a few chunks at a time) and subsamples in numpy, so a whole-slide overview costs
memory of the order of the output plus one tile, never the image.

File layout (format "expkit.images", version 1)::

    /images/<name>              (y, x, c) uint8|uint16 (uint32, c = 1 for labels), chunks (256, 256, c),
                                gzip (default) or lzf
        attrs: channels (str array), transform (3x3 float64), kind ("labels", label images only)
    /pyramid/<name>/<factor>    (ceil(y/f), ceil(x/f), c), attrs: factor, transform

Only axis-aligned transforms (scale, flip, translation; no rotation or shear) can be read as windows.
"""
from __future__ import annotations

import os
import tempfile
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

from ._window import (_GROUP, _PYRAMID, _TMP_PREFIX, CHUNK, PYRAMID_AUTO, PYRAMID_MIN,  # noqa: F401
                      ImageWindow, _check_transform, _down2, _downsample_dataset, _NullCtx, _Source, _take2,
                      level_transform, parse_channels, scale_transform)


def _check_write(name: str, array, channels, labels: bool):
    """(shape (y, x, c), flat, stored dtype, channel names) of an image to write, or an InputError."""
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
    c = shape[2]
    if labels:
        if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_) or c != 1:
            raise InputError(f"label image {name!r} must be one channel of integer ids, got {dtype} "
                             f"with {c} channels")
        dtype = np.dtype(np.uint32)
        channels = ["label"] if channels is None else channels
    elif dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise InputError(f"image {name!r} must be uint8 or uint16, got {dtype} (see images_from_uns "
                         "for converting float images; labels=True for a label image)")
    if channels is None:
        channels = ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]
    channels = [str(x) for x in channels]
    if len(channels) != c or len(set(channels)) != c or any("," in x or "/" in x for x in channels):
        raise InputError(f"image {name!r}: {c} channels need {c} distinct names without ',' or '/', "
                         f"got {channels}")
    return shape, flat, dtype, channels


def _checked_dataset(ds, name: str) -> tuple[list[str], np.ndarray]:
    """(channels, transform) of a stored image, checked: a 3-D uint8/16/32 dataset, one channel name per plane,
    a finite invertible affine transform, and no more declared than ~2000x the stored bytes (a damaged header
    must not make a read allocate terabytes)."""
    if not hasattr(ds, "shape") or len(ds.shape) != 3:
        raise ValueError(f"image {name!r} is not a (y, x, c) dataset")
    if np.dtype(ds.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"image {name!r} has dtype {ds.dtype}, not uint8/16/32")
    chans = [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(ds.attrs["channels"])]
    if len(chans) != ds.shape[2]:
        raise ValueError(f"image {name!r} has {ds.shape[2]} planes but {len(chans)} channel names")
    t = _check_transform(ds.attrs["transform"])
    if not np.isfinite(t).all():
        raise ValueError(f"image {name!r} has a non-finite transform")
    declared = int(np.prod(ds.shape, dtype=np.int64)) * np.dtype(ds.dtype).itemsize
    if declared > 2**28 and declared > 2000 * max(int(ds.id.get_storage_size()), 1):
        raise ValueError(f"image {name!r} declares {declared / 2**30:.1f} GiB but stores "
                         f"{ds.id.get_storage_size() / 2**20:.1f} MiB")
    return chans, t


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
        meta, levels, kinds = {}, {}, {}
        with self._open("r") as f:
            try:
                grp, pyr = f.get(_GROUP), f.get(_PYRAMID)
                for name, ds in (grp.items() if grp is not None else []):
                    if name.startswith(_TMP_PREFIX):
                        continue
                    chans, t = _checked_dataset(ds, name)
                    meta[name] = (tuple(ds.shape), chans, t)
                    kind = ds.attrs.get("kind", "image")
                    kinds[name] = kind.decode() if isinstance(kind, bytes) else str(kind)
                    lv = [(f"{_GROUP}/{name}", 1, t)]
                    if pyr is not None and name in pyr:
                        for fac in sorted(pyr[name], key=int):
                            d = pyr[name][fac]
                            lv.append((f"{_PYRAMID}/{name}/{fac}", int(fac), _check_transform(d.attrs["transform"])))
                    levels[name] = lv
            except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError, InputError) as exc:
                raise FormatError(f"image store {self.path} is damaged or not an expkit image store: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._cache = (key, meta, levels, kinds)
        return meta

    def _kinds(self) -> dict[str, str]:
        self._meta()
        return self._cache[3] if self._cache is not None else {}

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

    def read(self, channels, xrange=None, yrange=None, dpp: float | None = None) -> ImageWindow:
        try:
            return super().read(channels, xrange=xrange, yrange=yrange, dpp=dpp)
        except OSError as exc:  # a damaged chunk (h5py raises OSError from its filters)
            raise FormatError(f"image store {self.path}: cannot read {channels!r}: {exc}") from exc

    def __len__(self) -> int:
        return len(self._meta())

    # -- writing --
    def write(self, name: str, array, *, channels: Sequence[str] | None = None,
              transform=None, overwrite: bool = False, compression: str | None = "gzip",
              compression_opts: int | None = 4, chunk: int = CHUNK, pyramid: bool | None = None,
              labels: bool = False) -> None:
        """Write image ``name`` (a (y, x, c) or (y, x) uint8/uint16 array-like).

        ``labels=True``: a label image (a (y, x) or (y, x, 1) array of non-negative integer object ids
        below 2**32, any integer dtype), stored as uint32 with ``kind = "labels"``, channel ``label``
        by default; its pyramid levels take pixels (top-left of each block), never averages.

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
        shape, flat, dtype, channels = _check_write(name, array, channels, labels)
        t = _check_transform(np.eye(3) if transform is None else transform)
        if pyramid is None:
            pyramid = max(shape[0], shape[1]) > PYRAMID_AUTO
        wargs = (shape, flat, dtype, channels, t, compression, compression_opts, chunk, pyramid, labels)

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
                     chunk, pyramid, labels=False):
        """The image in bands of ``chunk`` rows; pyramid levels up to factor ``chunk`` are made from
        each band as it passes (no read-back), deeper ones from the previous level (label images:
        the top-left pixel of each block instead of its mean)."""
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
                if labels:
                    d.attrs["kind"] = "labels"
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
            if labels:
                block = _label_block(block, name, r0)
            block = block.astype(dtype, copy=False)
            ds[r0:r0 + block.shape[0]] = block
            cur = block
            for i in range(len(streamed)):
                cur = _take2(cur) if labels else _down2(cur)
                pending[i].append(cur)
                flush(i)
        for i in range(len(streamed)):
            flush(i, final=True)
        prev = streamed[-1][1] if streamed else ds
        for fac, d in levels[len(streamed):]:
            _downsample_dataset(prev, d, chunk, nearest=labels)
            prev = d
        ds.attrs["channels"] = np.array(channels, dtype=object)
        ds.attrs["transform"] = t
        if labels:
            ds.attrs["kind"] = "labels"
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
            self.write(name, array, channels=chans, transform=t, overwrite=overwrite,
                       labels=array.dtype == np.uint32)
            names.append(name)
        return names


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


def _label_block(block: np.ndarray, name: str, r0: int) -> np.ndarray:
    """A band of a label image checked to hold ids in [0, 2**32)."""
    if block.dtype == np.bool_ or block.dtype == np.uint32 or block.size == 0:
        return block
    lo, hi = int(block.min()), int(block.max())
    if lo < 0 or hi >= 2 ** 32:
        raise InputError(f"label image {name!r}: ids must be in [0, 2**32), rows {r0}.. hold {lo}..{hi}")
    return block


def _uns_channels(a: np.ndarray) -> list[str]:
    c = a.shape[2]
    if a.dtype == np.uint32 and c == 1:
        return ["label"]
    return ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]


def _to_uint(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype in (np.uint8, np.uint16, np.uint32):  # uint32: a label image, ids kept as they are
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

    Arrays come back as (y, x, c) uint8/uint16 (float images in [0, 1] become uint8), uint32 for a
    label image (kept as is, channel ``label``); channels are r,g,b(,a) for 3/4 channels, else 0..c-1; the transform scales by the scalefactor
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
        chans = _uns_channels(a)
        out.append((name, a, chans, scale_transform(_uns_scale(name, sf))))
    return out


class _UnsImages(_Source):
    def __init__(self, adata, sample: str | None = None):
        self.sample, entry = _uns_sample(adata, sample)
        self._m = {}
        self._k = {}
        self._arrays = {}
        sf = entry.get("scalefactors") or {}
        for name, img in (entry.get("images") or {}).items():
            a = np.asarray(img)
            if a.ndim == 2:
                a = a[:, :, None]
            chans = _uns_channels(a)
            if chans == ["label"]:
                self._k[name] = "labels"
            self._arrays[name] = a
            self._m[name] = (a.shape, chans, scale_transform(_uns_scale(name, sf)))

    def _meta(self):
        return self._m

    def _kinds(self) -> dict[str, str]:
        return self._k

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

