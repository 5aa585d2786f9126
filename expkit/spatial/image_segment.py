"""Nuclei segmentation of a tissue image into a label image and a per-object table.

:func:`image_segment` reads one channel (or, with ``hematoxylin=True``, the RGB channels of an H&E image,
deconvolved into the hematoxylin concentration) window by window, segments it with the kernels of
:mod:`expkit.kernels.segment` (a distance-transform watershed, or the connected components of the
thresholded mask) tile by tile, and writes

* the label image (uint32 object ids, 0 = background) as image ``key_added``, channel ``label``, with
  the transform of the source image: into the sample's :class:`~expkit.io.images.ImageStore` when the
  source image lives in one (written band by band, atomically), else into
  ``uns['spatial'][sample]['images'][key_added]`` (with its scalefactor
  ``tissue_<key_added>_scalef``), where :func:`~expkit.io.images.get_image` finds it either way;
* ``uns[key_added]``: ``params``, ``version``, ``objects`` (a DataFrame: ``label``, ``x``, ``y``
  (centroid, full-resolution pixels), ``area`` (full-resolution pixels^2), ``area_px`` (image
  pixels), ``intensity.<channel>`` (mean per object)), ``image``, ``threshold``, ``n_objects``.

The threshold is global: Otsu over the histogram of the whole image accumulated tile by tile (one bin
per integer value of a uint8/uint16 channel; 1024 bins over the attainable range for hematoxylin), so a
tiled run and a one-tile run segment the same mask. Memory: one tile window plus one band of label rows.

No object found (an empty mask or no marker): a warning, and the outputs are still written (a label
image of zeros and an empty table), replacing an earlier run. On an error nothing is written.
:func:`objects_to_adata` turns the table into a cell-level AnnData.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from .._logging import logger
from ..errors import InputError, KeyNotFoundError
from ..io.images import ImageStore, image_sources
from ..kernels import segment as K
from ._images import sample_name as _sample_name
from ._images import version as _version
from ._images import where as _where

__all__ = ["image_segment", "objects_to_adata"]

METHODS = ("watershed", "threshold")
HEMA_BINS = 1024


def _source(adata, image_store, sample):
    try:
        return image_sources(image_store if image_store is not None else adata, sample)
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"image_segment, {_where(sample)}: {exc}") from exc


def _resolve(source, channel, intensity_channels, hema: bool, sample):
    """(image, segmented channel indices, intensity channel indices, all channel names of the image)."""
    try:
        image, idx, names = source.resolve(channel, None)
        if intensity_channels is None:
            inten = list(idx)
        else:
            spec = intensity_channels if not isinstance(intensity_channels, str) else [intensity_channels]
            spec = [c if "/" in c else f"{image}/{c}" for c in spec]
            img2, inten, _ = source.resolve(spec, None)
            if img2 != image:
                raise InputError(f"intensity_channels {intensity_channels!r} must come from image {image!r}")
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"image_segment, {_where(sample)}: {exc} (images: {source.images()})") from exc
    if source.kind(image) == "labels":
        raise InputError(f"image_segment, {_where(sample)}: {image!r} is a label image, not an intensity image")
    if hema and len(idx) != 3:
        raise InputError(f"image_segment, {_where(sample)}: hematoxylin=True needs the three RGB channels of an "
                         f"H&E image (e.g. '{image}/r,g,b'), got {names}")
    if not hema and len(idx) != 1:
        raise InputError(f"image_segment, {_where(sample)}: segment one channel (e.g. '{names[0]}'), got {names} "
                         "(hematoxylin=True for an RGB H&E image)")
    return image, idx, inten, list(source._meta()[image][1])


class _Reader:
    """Windows of the image in image pixels [r0, r1) x [c0, c1) through ``source.read`` (full-resolution
    ranges), the last one cached (a one-tile image is read once for the threshold and the segmentation)."""

    def __init__(self, source, image, chans, idx, inten, hema: bool):
        self.source, self.image, self.hema = source, image, hema
        used = sorted(set(idx) | set(inten))
        self.spec = f"{image}/" + ",".join(chans[i] for i in used)
        self.pos = {c: used.index(c) for c in used}
        self.idx, self.inten = [self.pos[i] for i in idx], [self.pos[i] for i in inten]
        t = source.transform(image)
        if abs(t[0, 1]) > 1e-12 or abs(t[1, 0]) > 1e-12:
            raise InputError(f"image {image!r}: segmentation needs an axis-aligned transform")
        self.t, self._last = t, None

    def _range(self, i0, i1, scale, off):
        a, b = (i0 - 0.25 - off) / scale, (i1 - 0.75 - off) / scale  # pixels i0..i1-1 exactly
        return (min(a, b), max(a, b))

    def raw(self, r0, r1, c0, c1):
        key = (r0, r1, c0, c1)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        t = self.t
        win = self.source.read(self.spec, xrange=self._range(c0, c1, t[0, 0], t[0, 2]),
                               yrange=self._range(r0, r1, t[1, 1], t[1, 2]))
        arr = win.array
        if arr.shape[:2] != (r1 - r0, c1 - c0):
            raise InputError(f"image {self.image!r}: window {key} came back with shape {arr.shape}")
        seg = K.hematoxylin(arr[:, :, self.idx]) if self.hema else arr[:, :, self.idx[0]]
        self._last = (key, (seg, arr))
        return seg, arr

    def __call__(self, r0, r1, c0, c1):
        seg, arr = self.raw(r0, r1, c0, c1)
        inten = arr[:, :, self.inten].astype(np.float32)
        if self.hema:
            inten = np.concatenate([inten, seg[:, :, None]], axis=2)
        return seg, inten


def _threshold(reader: _Reader, shape, tile: int, dtype) -> float:
    """Otsu over the whole image's histogram, accumulated core tile by core tile."""
    h, w = shape
    if reader.hema:
        lo, hi = K.hematoxylin_range(dtype)
        edges = np.linspace(lo, hi, HEMA_BINS + 1)
    else:
        edges = np.arange((256 if np.dtype(dtype) == np.uint8 else 65536) + 1) - 0.5
    counts = np.zeros(edges.size - 1, np.int64)
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            seg, _ = reader.raw(r0, min(h, r0 + tile), c0, min(w, c0 + tile))
            if reader.hema:
                counts += np.histogram(seg, bins=edges)[0]
            else:
                counts += np.bincount(seg.ravel(), minlength=counts.size)
    return K.otsu_from_histogram(counts, edges)


def _check_args(method, tile, overlap, footprint, min_area, key_added):
    if method not in METHODS:
        raise InputError(f"image_segment: method must be one of {METHODS}, not {method!r}")
    for name, v, lo in (("tile", tile, 16), ("overlap", overlap, 0), ("footprint", footprint, 1),
                        ("min_area", min_area, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise InputError(f"image_segment: {name} must be an integer >= {lo}, not {v!r}")
    if not isinstance(key_added, str) or not key_added or "/" in key_added or "," in key_added:
        raise InputError(f"image_segment: key_added must be a name without '/' or ',', not {key_added!r}")


def _table(tab: dict, t: np.ndarray, names: list[str]) -> pd.DataFrame:
    inv = np.linalg.inv(t)
    uv = np.stack([tab["col"], tab["row"], np.ones_like(tab["col"])])
    xy = inv @ uv
    px_area = 1.0 / abs(np.linalg.det(t[:2, :2]))  # full-resolution pixels^2 per image pixel
    df = pd.DataFrame({"label": tab["label"].astype(np.int64), "x": xy[0], "y": xy[1],
                       "area": tab["area"] * px_area, "area_px": tab["area"].astype(np.int64)})
    mean = tab["mean"]
    for k, name in enumerate(names):
        df[f"intensity.{name}"] = mean[:, k] if mean.shape[1] > k else np.zeros(len(df))
    df.index = pd.Index(df["label"].astype(str).to_numpy())
    return df


def _write_labels(adata, source, sample, image, key_added, labels, t) -> None:
    """The label image into the source's store, or into uns (atomic either way)."""
    if key_added == image:
        raise InputError(f"image_segment: key_added {key_added!r} is the segmented image itself")
    if key_added in source.images() and source.kind(key_added) != "labels":
        raise InputError(f"image_segment, {_where(sample)}: image {key_added!r} exists and is not a label image; "
                         "choose another key_added")
    if isinstance(source, ImageStore):
        source.write(key_added, labels, channels=["label"], transform=t, labels=True, overwrite=True)
        return
    if abs(t[0, 0] - t[1, 1]) > 1e-12 * abs(t[0, 0]) or abs(t[0, 2]) > 1e-12 or abs(t[1, 2]) > 1e-12:
        raise InputError(f"image_segment: in-memory images need a pure scale transform, {image!r} has {t.tolist()}")
    arr = labels.to_array()
    entry = adata.uns["spatial"][source.sample]
    entry.setdefault("images", {})[key_added] = arr
    entry.setdefault("scalefactors", {})[f"tissue_{key_added}_scalef"] = float(t[0, 0])


def image_segment(adata, *, channel="hires/dapi", method: str = "watershed", thresh: float | None = None,
                  geq: bool = True, hematoxylin: bool = False, footprint: int = 5, min_area: int = 0,
                  intensity_channels=None, tile: int = 2048, overlap: int = 64, sample: str | None = None,
                  image_store=None, key_added: str = "segmentation") -> dict:
    """Segment nuclei in image ``channel`` of a sample; writes a label image and ``uns[key_added]`` (module doc).

    ``channel``: one channel (``"hires/dapi"``), or with ``hematoxylin=True`` the RGB channels of an H&E
    image (``"hires/r,g,b"``), segmented on the hematoxylin concentration (Ruifrok & Johnston).
    ``method``: ``"watershed"`` (distance-transform watershed, :func:`expkit.kernels.segment.watershed_nuclei`)
    or ``"threshold"`` (connected components of the mask). ``thresh``: None = Otsu of the whole image;
    ``geq``: foreground ``>= thresh`` (bright nuclei, e.g. DAPI or hematoxylin), False: ``< thresh``
    (dark nuclei of a grey H&E channel). ``footprint``: local-maximum window of the watershed markers;
    ``min_area``: drop objects under that many image pixels. ``intensity_channels``: channels of the same
    image averaged per object (default: the segmented ones; the hematoxylin value is added with
    ``hematoxylin=True``). ``tile``/``overlap``: image pixels per tile side and margin; objects larger than
    the margin can be cut at tile edges. ``image_store``: the sample's store (given by an Experiment),
    default ``uns['spatial'][sample]['image_store']`` or the in-memory uns images.
    Returns ``{"n_objects", "threshold", "image", "sample", "seconds"}``.
    """
    t0 = time.perf_counter()
    _check_args(method, tile, overlap, footprint, min_area, key_added)
    source = _source(adata, image_store, sample)
    sample = _sample_name(adata, sample, source)
    image, idx, inten, chans = _resolve(source, channel, intensity_channels, bool(hematoxylin), sample)
    h, w = source.shape(image)[:2]
    tr = source.transform(image)
    reader = _Reader(source, image, chans, idx, inten, bool(hematoxylin))
    dtype = reader.raw(0, min(h, 1), 0, min(w, 1))[1].dtype
    thr = float(thresh) if thresh is not None else _threshold(reader, (h, w), int(tile), dtype)
    if method == "watershed":
        def seg(img, border):
            return K.watershed_nuclei(img, thr, geq, footprint=int(footprint), exclude_border=border,
                                      min_area=int(min_area))
    else:
        def seg(img, border):
            return K.threshold_objects(img, thr, geq, min_area=int(min_area))
    labels = K.segment_tiled(reader, (h, w), seg, tile=int(tile), overlap=int(overlap))
    _write_labels(adata, source, sample, image, key_added, labels, tr)
    names = [chans[i] for i in inten] + (["hematoxylin"] if hematoxylin else [])
    objects = _table(labels.table(), tr, names)
    if len(objects) == 0:
        msg = (f"image_segment, {_where(sample)}: no object found in {image!r} with threshold {thr:.6g} "
               f"({'>=' if geq else '<'}); wrote an empty label image {key_added!r}")
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    params = {"channel": channel if isinstance(channel, str) else ",".join(channel), "image": image,
              "method": method, "thresh": "otsu" if thresh is None else float(thresh), "geq": bool(geq),
              "hematoxylin": bool(hematoxylin), "footprint": int(footprint), "min_area": int(min_area),
              "intensity_channels": [f"{image}/{n}" for n in names if n != "hematoxylin"],
              "tile": int(tile), "overlap": int(overlap)}
    if sample is not None:
        params["sample"] = sample
    adata.uns[key_added] = {"params": params, "version": _version(), "objects": objects, "image": key_added,
                            "threshold": thr, "n_objects": int(len(objects))}
    secs = time.perf_counter() - t0
    logger.info("image_segment: %d objects in %s (%d x %d px) in %.2f s", len(objects), image, h, w, secs)
    return {"n_objects": int(len(objects)), "threshold": thr, "image": key_added, "sample": sample or "",
            "seconds": secs}


def objects_to_adata(adata, key: str = "segmentation", sample: str | None = None):
    """The object table of ``image_segment(..., key_added=key)`` as a cell-level AnnData.

    obs: the table (``label``, ``x``, ``y``, ``area``, ``area_px``, intensities) with ``sample`` and
    ``barcode`` (``obj<label>``), obs_names ``<sample>:obj<label>``; ``X``: the mean intensities (float32
    CSR, one variable per channel); ``obsm['spatial']``: (x, y) full-resolution pixels;
    ``uns['spatial'][sample]``: the source sample's images, scalefactors and image store path.
    """
    import anndata as ad
    import scipy.sparse as sp

    entry = adata.uns.get(key) if hasattr(adata, "uns") else None
    if not isinstance(entry, dict) or not isinstance(entry.get("objects"), pd.DataFrame):
        raise KeyNotFoundError(f"objects_to_adata: no uns[{key!r}]['objects'] (run image_segment with "
                               f"key_added={key!r}); uns keys: {sorted(adata.uns)}")
    df = entry["objects"]
    spatial = adata.uns.get("spatial") or {}
    name = sample or entry["params"].get("sample") or (next(iter(spatial)) if len(spatial) == 1 else "sample")
    icols = [c for c in df.columns if c.startswith("intensity.")]
    obs = df.drop(columns=icols).copy()
    obs.insert(0, "barcode", [f"obj{int(v)}" for v in df["label"]])
    obs.insert(0, "sample", name)
    obs.index = [f"{name}:{b}" for b in obs["barcode"]]
    X = sp.csr_matrix(df[icols].to_numpy(np.float32)) if icols else sp.csr_matrix((len(df), 0), dtype=np.float32)
    var = pd.DataFrame({"gene": [c.split(".", 1)[1] for c in icols]}, index=[c.split(".", 1)[1] for c in icols])
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["spatial"] = df[["x", "y"]].to_numpy(np.float64)
    src = spatial.get(name) if isinstance(spatial, dict) else None
    if isinstance(src, dict):
        copy = {k: dict(v) if isinstance(v, dict) else v for k, v in src.items()}
        copy.setdefault("metadata", {})["segmentation"] = key
        out.uns["spatial"] = {name: copy}
    out.uns[key] = {"params": dict(entry["params"]), "version": entry.get("version", _version())}
    return out
