"""Visium HD bins -> cells: assign each bin to a segmented cell and sum the bins of each cell.

:func:`bins_to_cells` takes the cells from

* a **label image** (uint32 object ids, 0 = background) of the sample: the nuclei of
  :func:`~expkit.spatial.image_segment.image_segment`, or one imported with ``ImageStore.write(...,
  labels=True)``; read window by window from the sample's image store (or ``uns['spatial'][sample]['images']``);
* or **polygons**: Space Ranger ``segmented_outputs`` GeoJSON (full-resolution pixels), Xenium
  ``cell_boundaries`` (microns), CosMx ``*-polygons.csv``, or a (cell_id, x, y) table; rasterised tile by
  tile at ``raster_um`` microns per pixel (even-odd rule on pixel centres).

Objects are first expanded by ``expand_um`` (each background pixel within that distance of an object takes
the label of the NEAREST object pixel, so touching cells are never merged: the rule of Space Ranger's
nucleus expansion). A bin belongs to the object under its centre. Cells with fewer than ``min_bins`` bins
are dropped. Counts are summed by one sparse product (cells x bins indicator @ bins x genes).

Bounded memory: the slide is cut into ``tile_um`` squares; each tile's label window is read (or rasterised)
with a margin of ``expand_um`` (SOPA's patches), expanded, and looked up for the bins whose centre lies in the
tile, so the result does not depend on the tiling (up to exact distance ties of the expansion). A memory
estimate refuses a run that cannot fit before anything is done.

Outputs: the bins AnnData gets ``obs[key_added]`` (the cell's barcode, categorical; NaN = no cell: the
provenance of every bin) and ``obs[f"{key_added}.how"]`` (``segmented`` inside an object, ``expanded``
inside its expansion, ``dropped`` in a cell under ``min_bins``, ``unassigned``); the function returns the
cell-level AnnData (see :func:`bins_to_cells`).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from .._logging import logger, progress
from ..errors import InputError, KeyNotFoundError, ResourceError
from ..io.images import image_sources
from ..kernels import bins_cells as K
from . import _polygons as P
from ._images import sample_name as _sample_name
from ._images import version as _version

__all__ = ["bins_to_cells"]

HOW = ["unassigned", "segmented", "expanded", "dropped"]


def _geometry(adata, sample):
    """Bin centres (full-resolution px), microns per pixel, bin size and the scale factors of the sample."""
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"bins_to_cells, sample {sample!r}: no obsm['spatial'] (bin centres); "
                               f"obsm keys: {list(adata.obsm)}")
    entry = (adata.uns.get("spatial") or {}).get(sample) or {}
    sf = dict(entry.get("scalefactors") or {})
    meta = entry.get("metadata") or {}
    bin_um = sf.get("bin_size_um", meta.get("bin_size_um"))
    if bin_um is None or not np.isfinite(float(bin_um)) or float(bin_um) <= 0:
        raise InputError(f"bins_to_cells, sample {sample!r}: the bin size is not known (no 'bin_size_um' in "
                         f"uns['spatial'][{sample!r}]['scalefactors'] or metadata): read the sample with "
                         f"read_visium_hd(..., bin_size=2) from its Space Ranger folder")
    mpp = sf.get("microns_per_pixel")
    if mpp is None or not np.isfinite(float(mpp)) or float(mpp) <= 0:
        raise InputError(f"bins_to_cells, sample {sample!r}: no 'microns_per_pixel' in the scalefactors; the "
                         f"expansion and cell areas need the pixel size")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    return {"xy": xy, "mpp": float(mpp), "bin_um": float(bin_um), "sf": sf, "entry": entry}


class _LabelSource:
    """Label windows of a label image: ``window(x0, x1, y0, y1, xy)`` (full-resolution pixels) -> (labels, col,
    row of the points ``xy`` in the window's pixels)."""

    def __init__(self, adata, name, image_store, sample, g):
        try:
            src = image_sources(image_store if image_store is not None else adata, sample)
            kind = src.kind(name)
        except KeyNotFoundError as exc:
            raise KeyNotFoundError(f"bins_to_cells, sample {sample!r}: no label image {name!r} ({exc}); run "
                                   f"image_segment(..., key_added={name!r}) or import one") from exc
        if kind != "labels":
            raise InputError(f"bins_to_cells, sample {sample!r}: image {name!r} is not a label image (uint32 "
                             f"object ids); pass segmentation=<the name of a label image>")
        t = src.transform(name)
        if abs(t[0, 1]) > 1e-12 or abs(t[1, 0]) > 1e-12 or t[0, 0] <= 0 or t[1, 1] <= 0:
            raise InputError(f"bins_to_cells, sample {sample!r}: label image {name!r} needs a positive axis-aligned "
                             f"transform, has {t.tolist()}")
        self.src, self.t, self.shape = src, t, src.shape(name)[:2]
        self.channel = next(c for c in src.channels() if c.startswith(name + "/"))
        self.px_um = g["mpp"] / float(np.sqrt(t[0, 0] * t[1, 1]))  # microns per label pixel
        self.frame_xy, self.unit_um = g["xy"], g["mpp"]  # tiles in full-resolution pixels
        self.source = f"label image {name!r}"

    def outside(self, xy) -> float:
        """Share of bins whose centre falls outside the label image."""
        c = xy[:, 0] * self.t[0, 0] + self.t[0, 2]
        r = xy[:, 1] * self.t[1, 1] + self.t[1, 2]
        h, w = self.shape
        return float(np.mean((c < -0.5) | (c >= w - 0.5) | (r < -0.5) | (r >= h - 0.5)))

    def window(self, x0, x1, y0, y1, xy):
        win = self.src.read(self.channel, xrange=(x0, x1), yrange=(y0, y1))
        lab = np.asarray(win.array)[:, :, 0]
        c0 = np.floor(win.extent[0] * self.t[0, 0] + self.t[0, 2] + 0.5)
        r0 = np.floor(win.extent[3] * self.t[1, 1] + self.t[1, 2] + 0.5)
        col = xy[:, 0] * self.t[0, 0] + self.t[0, 2] - c0
        row = xy[:, 1] * self.t[1, 1] + self.t[1, 2] - r0
        return lab, col, row


def _grid_frame(adata, g):
    """The bins' own grid frame (array col, row: one unit = one bin) and the map of full-resolution pixels into
    it (least squares over the bins: exact for a rigid grid); None without ``obsm['spatial.array']`` or when
    the grid does not fit (residual above a tenth of a bin)."""
    arr = adata.obsm.get("spatial.array")
    if arr is None or len(arr) < 3:
        return None
    grid = np.asarray(arr, dtype=np.float64)[:, ::-1]  # (col, row)
    step = max(1, len(grid) // 200_000)
    m = np.c_[grid[::step], np.ones(len(grid[::step]))]
    coef, *_ = np.linalg.lstsq(m, g["xy"][::step], rcond=None)  # grid -> pixels
    scale = float(np.sqrt(abs(np.linalg.det(coef[:2]))))
    resid = np.abs(m @ coef - g["xy"][::step]).max()
    if not np.isfinite(resid) or scale <= 0 or resid > 0.1 * scale:
        return None
    inv = np.linalg.inv(coef[:2])
    return grid, lambda x, y: (np.c_[x, y] - coef[2]) @ inv


class _PolygonSource:
    """Label windows rasterised from polygons. In the bins' grid frame (when the bins lie on a grid) with an
    odd number of raster pixels per bin, so every bin centre is a raster pixel centre and the inside test of a
    bin is exact; else in full-resolution pixels at ``raster_um``."""

    def __init__(self, poly: P.Polygons, raster_um, adata, g):
        frame = _grid_frame(adata, g)
        want = raster_um if raster_um is not None else min(0.5, g["bin_um"] / 4)
        if frame is not None:
            self.frame_xy, to_frame = frame
            self.unit_um = g["bin_um"]
            f = max(1, int(round(g["bin_um"] / want)))
            self.scale = float(f + 1 - f % 2)  # odd
            v = to_frame(poly.x, poly.y)
            poly = P.Polygons(v[:, 0], v[:, 1], poly.offsets, poly.ids, poly.names, "grid", poly.source)
        else:
            self.frame_xy, self.unit_um = g["xy"], g["mpp"]
            self.scale = g["mpp"] / want
        self.px_um = self.unit_um / self.scale
        self.poly, self.box = poly, poly.poly_bbox()
        self.source = f"polygons {poly.source}"

    def outside(self, xy) -> float:
        return 0.0

    def window(self, x0, x1, y0, y1, xy):
        b = self.box
        keep = np.flatnonzero((b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y1))
        u0, v0 = np.floor(x0 * self.scale), np.floor(y0 * self.scale)
        shape = (int(np.ceil(y1 * self.scale) - v0) + 2, int(np.ceil(x1 * self.scale) - u0) + 2)
        sub = self.poly.take(keep)
        lab = K.rasterise_polygons(sub.x * self.scale - u0, sub.y * self.scale - v0, sub.offsets, sub.ids, shape)
        return lab, xy[:, 0] * self.scale - u0, xy[:, 1] * self.scale - v0


def _tiles(xy, tile_px):
    """Bin indices grouped by tile: (order, starts, tile keys (ix, iy))."""
    lo = xy.min(axis=0)
    ij = np.floor((xy - lo) / tile_px).astype(np.int64)
    key = ij[:, 1] * (int(ij[:, 0].max()) + 1) + ij[:, 0]
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return order, np.r_[starts, k.size], lo, ij[order[starts]]


def _assign(source, g, expand_um, tile_um, sample):
    """(label, how) of every bin, tile by tile (tiles in the source's frame: pixels or bins)."""
    fxy = source.frame_xy
    tile = tile_um / source.unit_um
    halo = (expand_um + 2 * source.px_um) / source.unit_um
    order, bounds, lo, ij = _tiles(fxy, tile)
    label = np.zeros(fxy.shape[0], dtype=np.int64)
    how = np.zeros(fxy.shape[0], dtype=np.int8)
    dist_px = expand_um / source.px_um
    with progress(len(bounds) - 1, f"bins_to_cells {sample}: tiles") as advance:
        for t in range(len(bounds) - 1):  # a loop over tiles (hundreds at most), the work inside is vectorised
            idx = order[bounds[t]:bounds[t + 1]]
            x0, y0 = lo + ij[t] * tile
            lab, col, row = source.window(x0 - halo, x0 + tile + halo, y0 - halo, y0 + tile + halo, fxy[idx])
            expanded = K.expand_labels(lab, dist_px) if dist_px > 0 else lab
            label[idx], how[idx] = K.label_of_bins(lab, expanded, col, row)
            advance(f"tile {t + 1}")
    return label, how


def _memory_check(n_bins, nnz, tile_um, px_um, max_memory, sample):
    import torch

    from .svg import _available_memory

    tile = int(tile_um / px_um) + 64
    need = n_bins * 64 + nnz * 36 + tile * tile * 48
    budget = int(max_memory * 2**30) if max_memory is not None else int(0.8 * _available_memory(torch.device("cpu")))
    if need > budget:
        raise ResourceError(f"bins_to_cells, sample {sample!r}: {n_bins:,} bins ({nnz:,} non-zero counts, tiles of "
                            f"{tile:,}^2 label pixels) need about {need / 2**30:.2f} GiB, more than the "
                            f"{budget / 2**30:.2f} GiB available; use a smaller tile_um or max_memory")
    return need


def _check_args(segmentation, polygons, expand_um, min_bins, tile_um, raster_um, key_added):
    if (segmentation is None) == (polygons is None):
        raise InputError("bins_to_cells: pass exactly one of segmentation= (a label image) or polygons=")
    for name, v, lo in (("expand_um", expand_um, 0.0), ("tile_um", tile_um, 1e-9), ("raster_um", raster_um, 1e-9)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo):
            raise InputError(f"bins_to_cells: {name} must be a number >= {lo:g}, not {v!r}")
    if isinstance(min_bins, bool) or not isinstance(min_bins, (int, np.integer)) or min_bins < 1:
        raise InputError(f"bins_to_cells: min_bins must be an integer >= 1, not {min_bins!r}")
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"bins_to_cells: key_added must be a non-empty string, not {key_added!r}")


def _source(adata, g, segmentation, polygons, polygons_unit, raster_um, image_store, sample):
    if segmentation is not None:
        return _LabelSource(adata, str(segmentation), image_store, sample, g)
    poly = P.read_polygons(polygons, polygons_unit)
    xy = g["xy"]
    bins_box = (*xy.min(axis=0), *xy.max(axis=0))
    poly = P.to_pixels(poly, bins_box, g["mpp"], g["sf"], sample)
    return _PolygonSource(poly, raster_um, adata, g)


def _cells(adata, g, labels, counts, n_bins, n_seg, centroid, names, sample, info):
    """The cell-level AnnData (images shared with the bins sample: the same objects, nothing copied)."""
    import anndata as ad

    obs = pd.DataFrame({"barcode": names, "label": labels, "n_bins": n_bins, "n_bins_segmented": n_seg,
                        "area_um2": n_bins * g["bin_um"] ** 2}, index=pd.Index(names, name=None))
    cells = ad.AnnData(X=counts, obs=obs, var=adata.var.copy())
    cells.layers["counts"] = cells.X
    cells.obsm["spatial"] = centroid
    entry = g["entry"]
    diam = 2.0 * np.sqrt(np.median(n_bins) / np.pi) * g["bin_um"] / g["mpp"] if len(n_bins) else np.nan
    meta = {**(entry.get("metadata") or {}), "derived_from": str(sample), "level": "cell"}
    spatial = {"images": dict(entry.get("images") or {}), "metadata": meta,
               "scalefactors": {**g["sf"], "spot_diameter_fullres": float(diam)}}
    if entry.get("image_store"):
        spatial["image_store"] = entry["image_store"]
    cells.uns["spatial"] = {sample: spatial}
    cells.uns["spatial.unit"] = adata.uns.get("spatial.unit", "pixel")
    cells.uns["bins_to_cells"] = info
    return cells


def _write_bins(adata, key_added, bin_label, how, names, labels):
    """Provenance on the bins: the cell barcode of every bin (NaN = none) and how it got there."""
    code = np.full(bin_label.size, -1, dtype=np.int64)
    hit = bin_label > 0
    code[hit] = np.searchsorted(labels, bin_label[hit])
    adata.obs[key_added] = pd.Categorical.from_codes(code, categories=pd.Index(names))
    adata.obs[f"{key_added}.how"] = pd.Categorical.from_codes(how.astype(np.int64), categories=HOW)


def bins_to_cells(adata, *, segmentation: str | None = None, polygons=None, polygons_unit: str = "auto",
                  expand_um: float = 2.0, min_bins: int = 1, tile_um: float = 500.0, raster_um: float | None = None,
                  sample: str | None = None, image_store=None, max_memory: float | None = None,
                  key_added: str = "cell"):
    """Join the bins of a Visium HD sample into cells (module doc); returns the cell-level AnnData.

    Parameters
    ----------
    segmentation
        Name of a label image of the sample (e.g. ``"segmentation"`` written by ``image_segment``), read from
        ``image_store`` (given by an Experiment) or ``uns['spatial'][sample]['images']``.
    polygons
        Instead: a GeoJSON / boundary-table path or a DataFrame (see :func:`expkit.spatial._polygons.read_polygons`);
        ``polygons_unit``: "auto" (the layout's), "pixel" (full-resolution) or "um". Polygons whose extent does not
        fit the bins are refused, naming the transform that would make them fit.
    expand_um
        Expansion of the objects in microns (0: none), without merging touching cells.
    min_bins
        Cells with fewer bins are dropped (their bins become ``dropped``).
    tile_um, raster_um
        Tile side in microns; pixel size of the polygon raster (default min(0.5, bin size / 4) um).
    max_memory
        GiB the run may use (default 80 % of the free memory); a larger estimate is refused before any work.
    key_added
        The bins' ``obs`` column naming each bin's cell (and ``<key_added>.how``).

    Returns
    -------
    AnnData
        cells x genes: ``X`` = ``layers['counts']`` the summed bin counts (float32 CSR); ``obs``: ``barcode``,
        ``label`` (the object id), ``n_bins``, ``n_bins_segmented`` (inside the object before expansion),
        ``area_um2``; ``obsm['spatial']`` the mean bin centre (full-resolution pixels); ``uns['spatial'][sample]``
        the bins' scale factors and the same image objects (shared, not copied), ``metadata['derived_from']``;
        ``uns['bins_to_cells']``: params, shares of bins and counts assigned, the bins sample.
    """
    t0 = time.perf_counter()
    _check_args(segmentation, polygons, expand_um, min_bins, tile_um, raster_um, key_added)
    sample = _sample_name(adata, sample, image_store) or "sample"
    g = _geometry(adata, sample)
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    source = _source(adata, g, segmentation, polygons, polygons_unit, raster_um, image_store, sample)
    need = _memory_check(adata.n_obs, int(getattr(X, "nnz", np.prod(X.shape))), tile_um, source.px_um,
                         max_memory, sample)
    outside = source.outside(g["xy"])
    if outside >= 1.0:
        raise InputError(f"bins_to_cells, sample {sample!r}: no bin lies over the {source.source} (all "
                         f"{adata.n_obs:,} bin centres fall outside it): a segmentation of another image or "
                         f"another sample?")
    label, how = _assign(source, g, float(expand_um), float(tile_um), sample)
    labels, counts, n_bins, centroid, label_kept = K.aggregate(label, X, g["xy"], min_bins=int(min_bins))
    how[(label > 0) & (label_kept == 0)] = 3
    n_seg = np.bincount(np.searchsorted(labels, label_kept[how == 1]), minlength=labels.size) if labels.size \
        else np.zeros(0, dtype=np.int64)
    if segmentation is not None:
        names = np.char.add(np.char.add("cellid_", np.char.zfill(labels.astype(str), 9)), "-1")
    else:
        names = source.poly.names[labels.astype(np.int64) - 1] if labels.size else np.zeros(0, dtype=str)
    total = float(X.sum())
    share_counts = float(counts.sum()) / total if total > 0 else 0.0
    share_bins = float(np.mean(label_kept > 0))
    params = {"segmentation": segmentation, "polygons": None if polygons is None else source.poly.source,
              "polygons_unit": polygons_unit, "expand_um": float(expand_um), "min_bins": int(min_bins),
        "tile_um": float(tile_um), "raster_um": None if segmentation is not None else float(source.px_um)}
    info = {"params": params, "version": _version(), "bins_sample": str(sample), "bins_key": key_added,
            "n_bins": int(adata.n_obs), "n_cells": int(labels.size), "share_bins_assigned": share_bins,
            "share_counts_assigned": share_counts, "share_bins_outside_segmentation": outside,
            "bin_size_um": g["bin_um"], "memory_estimate_bytes": int(need)}
    if outside > 0:
        msg = (f"bins_to_cells, sample {sample!r}: {outside:.1%} of the bins lie outside the {source.source}; "
               f"{1 - share_bins:.1%} of all bins are unassigned")
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    cells = _cells(adata, g, labels, counts, n_bins, n_seg, centroid, names, sample, info)
    _write_bins(adata, key_added, label_kept, how, names, labels)
    info["seconds"] = time.perf_counter() - t0
    logger.info("bins_to_cells %s: %d cells from %d bins (%.1f%% of bins, %.1f%% of counts) in %.1f s", sample,
                labels.size, adata.n_obs, 100 * share_bins, 100 * share_counts, info["seconds"])
    return cells


bins_to_cells.derived_modality = "spatial-cell"
