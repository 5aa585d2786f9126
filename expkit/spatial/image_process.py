"""Image processing written as new channels next to the source image: smoothing, grey, a user function.

:func:`image_process` reads channels of one image (``"hires/r,g,b"``), applies the operation band by
band (see :class:`expkit.kernels.image_ops.BandedImage`: each band is computed from its rows plus a
halo, so a whole-slide image is never loaded) and writes the result as a new image ``key_added`` with
the source image's transform, so that ``get_image(adata, "<key_added>/r", xrange=..., yrange=...)``
reads it aligned with the spots and with the source.

Where the result goes:

* an :class:`~expkit.io.images.ImageStore` (the sample's HDF5 file, given as ``image_store=`` by the
  Experiment, or named by ``uns['spatial'][sample]['image_store']``): the result is a lazy array passed
  to :meth:`ImageStore.write`, which pulls it band by band and writes a hidden dataset that it renames
  only once complete (atomic). The source is read from the same file while ``write`` holds it open for
  writing: HDF5 opens an already-open file again in read-only mode by sharing the open file (the
  other order, read-write over read-only, is what it refuses). Should a build of HDF5 refuse the
  read anyway, the result is computed into a temporary HDF5 file next to the store first and then
  copied in with ``store.write`` (set ``SINGLE_PASS = False`` to always do so). On any error the
  partial hidden dataset and the temporary file are removed: the store lists the same images as
  before.
* the AnnData's in-memory images (no store): the result is computed in memory (the source already is)
  and stored at the end as ``uns['spatial'][sample]['images'][key_added]``, with
  ``scalefactors['tissue_<key_added>_scalef']`` = the source's scale so it reads with the same
  transform. In-memory images name their channels by count (r,g,b for 3, r,g,b,a for 4, else
  0..c-1), so a grey image in memory reads as ``"grey/0"`` (in a store: ``"grey/grey"``); the names
  written are recorded in ``uns[key_added]['channels']``.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import numpy as np

from .._logging import logger
from ..errors import ExpkitError, FormatError, InputError, KeyNotFoundError
from ..io._window import _GROUP, _PYRAMID, _TMP_PREFIX
from ..io.images import ImageStore, image_sources
from ..kernels import image_ops as K
from ..kernels.device import resolve_device
from ._images import sample_name as _sample_name
from ._images import version as _version
from ._images import where as _where

__all__ = ["image_process"]

SINGLE_PASS = True  # read the source from the store while writing into it (else: via a temporary file)
_METHODS = ("smooth", "grey")


def _resolve(source, channels, sample) -> tuple[str, list[str]]:
    try:
        image, _, names = source.resolve(channels, None)
    except (KeyNotFoundError, InputError) as exc:
        if sample is not None and repr(sample) not in str(exc):
            raise type(exc)(f"{_where(sample)}: {exc} (images: {source.images()})") from exc
        raise
    return image, names


def _method(method, sigma, halo, device, n_channels: int, where: str):
    """(f, halo, label, output channel names or None = from the inputs) for ``method``."""
    if callable(method):
        label = getattr(method, "__qualname__", None) or type(method).__name__
        h = 0 if halo is None else halo
        try:
            h = int(h)
        except (TypeError, ValueError):
            raise InputError(f"halo must be a number of pixels >= 0, not {halo!r}") from None
        if h < 0:
            raise InputError(f"halo must be a number of pixels >= 0, not {halo!r}")
        return method, h, label, None
    if method == "smooth":
        s = K._check_sigma(sigma)
        radius = K.gaussian_radius(s)
        h = radius if halo is None else max(int(halo), radius)
        return (lambda b: K.gaussian(b, s, device=device)), h, "smooth", None
    if method == "grey":
        if n_channels not in (1, 3, 4):
            raise InputError(f"{where}: grey needs 1 channel or r,g,b(,a), got {n_channels} channels")
        return K.to_grey, 0, "grey", ["grey"]
    raise InputError(f"method must be one of {list(_METHODS)} or a function block -> block, not {method!r}")


def _out_dtype(dtype, src_dtype) -> np.dtype:
    if dtype is None:
        return np.dtype(src_dtype)
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise InputError(f"dtype must be uint8 or uint16 (what an image store holds), not {dtype!r}")
    return d


def _row_reader(source, names: list[str], t: np.ndarray, w: int, where: str) -> Callable[[int, int], np.ndarray]:
    """read(r0, r1): rows r0..r1-1, every column, of ``names``, through the source's windowed read."""
    if abs(t[0, 1]) > 1e-12 or abs(t[1, 0]) > 1e-12:
        raise InputError(f"{where}: image processing needs an axis-aligned image transform, got {t.tolist()}")
    sx, ox, sy, oy = t[0, 0], t[0, 2], t[1, 1], t[1, 2]
    # pixel centres col 0 and w-1 (rows r0 and r1-1) in full-resolution units; the read rounds back to them
    xr = ((0 - ox) / sx, (w - 1 - ox) / sx)

    def read(r0: int, r1: int) -> np.ndarray:
        yr = ((r0 - oy) / sy, (r1 - 1 - oy) / sy)
        return source.read(names, xrange=xr, yrange=yr).array

    return read


def _discard_partial(store: ImageStore, key: str) -> None:
    """Remove what an interrupted ``store.write(key, ...)`` leaves (its hidden ``.tmp-<key>`` entries)."""
    import h5py

    if not store.path.exists():
        return
    try:
        with h5py.File(store.path, "a") as f:
            for g in (_GROUP, _PYRAMID):
                if g in f and _TMP_PREFIX + key in f[g]:
                    del f[g][_TMP_PREFIX + key]
    except OSError:  # pragma: no cover - the next write removes leftovers anyway
        logger.warning(f"could not remove the partial image {key!r} from {store.path}")
    store._cache = None


class _SameFileRefused(ExpkitError):
    pass


def _write_store(store: ImageStore, key: str, make: Callable[[Callable], K.BandedImage], read, chans, t,
                 overwrite: bool) -> str:
    """Write ``make(read)`` as image ``key``; returns how ("single pass" or "temporary file")."""
    state = {"writing": False}

    def guarded(r0, r1):
        try:
            return read(r0, r1)
        except FormatError as exc:
            if state["writing"]:
                raise _SameFileRefused(str(exc)) from exc
            raise

    try:
        if SINGLE_PASS:
            arr = make(guarded)
            state["writing"] = True
            try:
                store.write(key, arr, channels=_arr_channels(arr, chans), transform=t, overwrite=overwrite)
                return "single pass"
            except _SameFileRefused as exc:
                logger.info(f"{store.path}: reading while writing refused ({exc}); using a temporary file")
                _discard_partial(store, key)
        return _write_via_tempfile(store, key, make(read), chans, t, overwrite)
    except BaseException:
        _discard_partial(store, key)
        raise


def _arr_channels(arr: K.BandedImage, chans: list[str]) -> list[str]:
    """Output channel names: the input names when the count matches, else 0..c-1."""
    return chans if arr.shape[2] == len(chans) else [str(i) for i in range(arr.shape[2])]


def _write_via_tempfile(store: ImageStore, key: str, arr: K.BandedImage, chans, t, overwrite: bool) -> str:
    import h5py

    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{key}-", suffix=".h5", dir=store.path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("image", shape=arr.shape, dtype=arr.dtype, compression="lzf",
                                  chunks=(min(arr.band, arr.shape[0]), min(256, arr.shape[1]), arr.shape[2]))
            for r0 in range(0, arr.shape[0], arr.band):
                ds[r0:r0 + arr.band] = arr[r0:r0 + arr.band]
        with h5py.File(tmp, "r") as f:
            store.write(key, f["image"], channels=_arr_channels(arr, chans), transform=t, overwrite=overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return "temporary file"


def _write_uns(adata, sample: str, key: str, arr: K.BandedImage, t: np.ndarray) -> None:
    entry = adata.uns["spatial"][sample]
    out = arr.to_array()  # the source is in memory already; nothing is stored before it is complete
    entry.setdefault("images", {})[key] = out
    entry.setdefault("scalefactors", {})[f"tissue_{key}_scalef"] = float(t[0, 0])


def _uns_channels(c: int) -> list[str]:
    return ["r", "g", "b"] if c == 3 else ["r", "g", "b", "a"] if c == 4 else [str(i) for i in range(c)]


def _check_target(source, sample, key, image, overwrite) -> None:
    if not isinstance(key, str) or not key or "/" in key or "," in key or key.startswith("."):
        raise InputError(f"key_added must be a non-empty image name without '/', ',' or a leading '.': {key!r}")
    if key == image:
        raise InputError(f"{_where(sample)}: key_added {key!r} is the source image; pick another name")
    if key in source.images() and not overwrite:
        raise InputError(f"{_where(sample)}: image {key!r} already exists in {source._where()} (overwrite=True)")
    if not isinstance(source, ImageStore):
        t = source.transform(image)
        if abs(t[0, 0] - t[1, 1]) > 1e-12 * max(1.0, abs(t[0, 0])) or np.any(t[:2, 2] != 0):
            raise InputError(f"{_where(sample)}: in-memory images carry a single scale factor; put the images "
                             "in an ImageStore (ImageStore(path).fill_from_uns(adata)) to process this one")


def image_process(adata, *, channels="hires/r,g,b", method: str | Callable = "smooth", sigma: float = 1.0,
                  halo: int | None = None, key_added: str | None = None, dtype=None, band: int = K.BAND,
                  overwrite: bool = False, sample: str | None = None, image_store=None,
                  use_gpu: bool = False) -> dict:
    """Process image ``channels`` of a sample and store the result as image ``key_added``.

    method   : ``"smooth"`` (Gaussian of ``sigma`` image pixels per channel, reflect border, truncated at
               4 sigma: :func:`expkit.kernels.image_ops.gaussian`), ``"grey"`` (BT.601 luminance of
               r,g,b: one channel ``grey``), or a function ``block -> block`` taking a (rows, cols, c)
               block in the source dtype and returning (rows, cols) or (rows, cols, c_out) values.
    halo     : pixels the function looks away from each output pixel. For a callable: None = 0, a
               pointwise function; a function with a spatial footprint MUST give it, else band edges
               differ from the whole-image result. For smooth: at least ``int(4 sigma + 0.5)``.
    key_added: the new image (default: the method name, ``"processed"`` for a callable); its channels are
               ``<key_added>/<input channel>`` (``smooth/r, smooth/g, smooth/b``; ``grey/grey``), or
               ``0..c_out-1`` when a callable changes the channel count.
    dtype    : uint8 or uint16 (default: the source's); values are rounded and clipped to its range.
    band     : output rows computed at a time (memory: about ``band + 2 halo`` rows of the source).
    image_store: the sample's ImageStore (or a path), given by the Experiment; else the AnnData's store
               or its in-memory uns images (see module doc).

    ``adata`` may also be an ImageStore (or a path to one): the image is written, nothing is recorded.
    Records ``uns[key_added] = {"params", "version", "image", "source_image", "channels", "target"}``
    and returns ``{"image", "channels", "source_image", "shape", "seconds", "target"}``.
    """
    t0 = time.perf_counter()
    source = image_sources(image_store if image_store is not None else adata, sample)
    sname = _sample_name(adata, sample, source)
    where = _where(sname)
    image, names = _resolve(source, channels, sname)
    label_default = method if isinstance(method, str) else "processed"
    key = label_default if key_added is None else key_added
    device = resolve_device(use_gpu)
    f, h, label, fixed = _method(method, sigma, halo, device, len(names), where)
    _check_target(source, sname, key, image, overwrite)
    t = source.transform(image)
    shape = source.shape(image)
    read = _row_reader(source, names, t, shape[1], where)
    odtype = _out_dtype(dtype, read(0, 1).dtype)
    try:
        band = int(band)
    except (TypeError, ValueError):
        raise InputError(f"band must be a number of rows >= 1, not {band!r}") from None
    in_names = fixed or [n.rpartition("/")[2] for n in names]

    def make(rd):
        return K.BandedImage(rd, (shape[0], shape[1], len(names)), f, halo=h, band=band, dtype=odtype, name=label)

    if isinstance(source, ImageStore):
        how = _write_store(source, key, make, read, in_names, t, overwrite)
        written = [c for c in source.channels() if c.startswith(key + "/")]
        target = str(source.path)
    else:
        arr = make(read)
        _write_uns(adata, source.sample, key, arr, t)
        written, how, target = [f"{key}/{c}" for c in _uns_channels(arr.shape[2])], "in memory", "uns"
    params = {"channels": names, "method": label, "halo": int(h), "dtype": str(odtype), "band": band,
              "overwrite": bool(overwrite), "use_gpu": bool(use_gpu)}
    if method == "smooth":
        params["sigma"] = float(sigma)
    if sname is not None:
        params["sample"] = sname
    if hasattr(adata, "uns"):  # adata may also be an ImageStore (nothing to record in)
        adata.uns[key] = {"params": params, "version": _version(), "image": key, "source_image": image,
                          "channels": written, "target": target, "write": how}
    secs = time.perf_counter() - t0
    logger.info(f"{where}: {label} of {image} ({shape[0]} x {shape[1]}) -> {key} in {secs:.1f} s ({how})")
    return {"image": key, "channels": written, "source_image": image, "shape": tuple(int(s) for s in shape[:2]),
            "seconds": secs, "target": target}
