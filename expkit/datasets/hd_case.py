"""A format-faithful Visium HD output rasterised from the real cells of a Xenium section.

No Visium HD slide is at hand, so :func:`rasterised_visium_hd` builds one whose cells are known: the
Xenium mouse brain cells (``cell_feature_matrix.h5``: real per-cell counts of 248 genes;
``cells.csv.gz``: centroids in microns and nucleus areas) are laid on a 2 um bin grid.

Geometry (microns, the Xenium frame; full-resolution pixel = (micron - image origin) / microns_per_pixel,
axis-aligned):

- nucleus of cell i = the disk of area ``nucleus_area`` (radius r_i) at its centroid;
- ownership = the additively weighted Voronoi (Apollonius) diagram of the nuclei: a point p belongs to
  the cell with the smallest signed distance to its nucleus boundary, d_i(p) = |p - c_i| - r_i
  (negative inside). So a point inside one nucleus belongs to it, a point inside two overlapping
  nuclei to the one it lies deeper in, and a point outside every nucleus to the nucleus whose boundary
  is nearest; ties go to the lower cell index;
- the cell = its owned points with d_i <= ``expand_um`` (the nucleus expanded without merging);
  the nucleus = its owned points with d_i <= 0;
- bins: a square grid of ``bin_um`` bins rotated by ``rotation_deg`` with respect to the image, as a
  real slide is; a bin belongs to the cell (nucleus) owning its centre;
- counts: each cell's real integer counts are spread over its bins by a seeded multinomial (every
  transcript picks one of the cell's bins uniformly), so the true bins of a cell sum to its Xenium
  counts exactly; in-tissue bins of no cell get sparse background counts (Poisson(``background_rate``)
  transcripts per bin, genes in proportion to the genes' totals); cells left without a bin (a nucleus
  inside a larger one) lose their counts (counted in ``case.json``);
- tissue: bins within ``tissue_um`` of a cell centre (or owned by a cell) are ``in_tissue``.

Outputs under ``out/``: the Space Ranger folders ``outs/binned_outputs/square_002um/`` and
``outs/segmented_outputs/`` (GeoJSON of nuclei and cells), ``nuclei_labels.npy`` (+ ``.json``: its transform),
``truth.csv.gz``, ``cells.csv.gz``, ``case.json`` and ``README.md`` (exactly how the case was built).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError

__all__ = ["rasterised_visium_hd", "default_xenium"]

_ROOT = Path(__file__).resolve().parents[2]
_MAX_PAIRS = 4_000_000  # (point, cell) candidate pairs per block
_HIRES_MAX, _LOWRES_MAX = 6000, 600  # longest side of Space Ranger's hires / lowres images


def default_xenium() -> Path:
    """``$EXPKIT_SHARED_DATA/xenium_mouse_brain`` (default ``<repo>/../shared/data``)."""
    shared = Path(os.environ.get("EXPKIT_SHARED_DATA", _ROOT.parent / "shared" / "data"))
    return shared / "xenium_mouse_brain"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@dataclass
class _Cells:
    ids: np.ndarray       # Xenium cell ids (int64)
    xy: np.ndarray        # centroids (n, 2), microns
    r: np.ndarray         # nucleus radii, microns
    X: sp.csr_matrix      # real counts, cells x genes (int64)
    gene_ids: np.ndarray
    gene_names: np.ndarray


def _read_xenium(folder: Path, window) -> _Cells:
    h5, csv = folder / "cell_feature_matrix.h5", folder / "cells.csv.gz"
    for p in (h5, csv):
        if not p.is_file():
            raise InputError(f"Xenium folder {folder}: {p.name} not found (needs cell_feature_matrix.h5 "
                             f"and cells.csv.gz)")
    with h5py.File(h5, "r") as fh:
        g = fh["matrix"]
        X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=tuple(g["shape"][()]))
        dec = lambda a: np.array([v.decode() for v in a[()]], dtype=object)  # noqa: E731
        bcs, fid, fname, ftype = (dec(g["barcodes"]), dec(g["features/id"]), dec(g["features/name"]),
                                  dec(g["features/feature_type"]))
    gex = np.flatnonzero(ftype == "Gene Expression")
    X = X.T.tocsr()[:, gex].astype(np.int64)
    cells = pd.read_csv(csv, dtype={"cell_id": str}).set_index("cell_id")
    missing = bcs[~pd.Index(bcs).isin(cells.index)]
    if missing.size:
        raise InputError(f"Xenium folder {folder}: {missing.size} matrix cells absent from cells.csv.gz "
                         f"(e.g. {missing[0]!r})")
    cells = cells.loc[bcs]
    xy = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    area = cells["nucleus_area"].to_numpy(np.float64)
    if window is not None:
        x0, y0, x1, y1 = (float(v) for v in window)
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"window_um={tuple(window)} must be (x0, y0, x1, y1) with x1 > x0, y1 > y0")
        keep = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    else:
        keep = np.ones(len(xy), bool)
    keep &= np.isfinite(xy).all(axis=1) & np.isfinite(area) & (area > 0)
    if not keep.any():
        raise InputError(f"window_um={window}: no Xenium cell of {folder} has its centroid inside")
    ids = pd.to_numeric(pd.Series(bcs), errors="coerce").to_numpy()
    if np.isnan(ids).any() or (ids < 1).any():  # non-integer ids (newer exports) or 0: number from 1
        ids = np.arange(1, len(bcs) + 1, dtype=np.float64)
    return _Cells(ids[keep].astype(np.int64), xy[keep], np.sqrt(area[keep] / np.pi), X[keep],
                  fid[gex], fname[gex])


# --------------------------------------------------------------------------------------------
# grids and ownership
# --------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Points ``origin + R(angle) @ (col * step, row * step)``, rows x cols, microns."""
    origin: np.ndarray
    step: float
    angle: float
    shape: tuple

    def centres(self, rows, cols) -> np.ndarray:
        c, s = np.cos(self.angle) * self.step, np.sin(self.angle) * self.step
        out = np.empty((len(rows), 2))
        out[:, 0] = self.origin[0] + c * cols - s * rows
        out[:, 1] = self.origin[1] + s * cols + c * rows
        return out

    def fractional(self, xy) -> np.ndarray:
        """(row, col) of points, fractional."""
        c, s = np.cos(self.angle) / self.step, np.sin(self.angle) / self.step
        dx, dy = xy[:, 0] - self.origin[0], xy[:, 1] - self.origin[1]
        return np.stack([-s * dx + c * dy, c * dx + s * dy], axis=1)


def _candidates(grid: _Grid, xy, reach):
    """All (cell, row, col) with the grid point within ``reach`` grid-aligned box of the cell."""
    fr = grid.fractional(xy)
    rho = reach / grid.step
    lo = np.maximum(np.ceil(fr - rho[:, None]), 0).astype(np.int64)
    hi = np.minimum(np.floor(fr + rho[:, None]), np.array(grid.shape) - 1).astype(np.int64)
    n = np.maximum(hi - lo + 1, 0)
    counts = n[:, 0] * n[:, 1]
    ci = np.repeat(np.arange(len(xy)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = lo[ci, 0] + local // np.maximum(n[ci, 1], 1)
    cols = lo[ci, 1] + local % np.maximum(n[ci, 1], 1)
    return ci, rows, cols


def _blocks(xy, reach, step):
    """Index ranges of the cells such that each block has about ``_MAX_PAIRS`` candidates or fewer."""
    per = (2 * reach / step + 2) ** 2
    block = (np.cumsum(per) // _MAX_PAIRS).astype(np.int64)
    bounds = np.r_[0, np.flatnonzero(np.diff(block)) + 1, len(xy)]
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _owners(grid: _Grid, xy, r, extra: float):
    """For every grid point: the owning cell (index, -1 none) among points with d_i <= ``extra``, and
    its signed distance to the nucleus boundary (inf none). Exact: every candidate in reach is scored."""
    npts = grid.shape[0] * grid.shape[1]
    best = np.full(npts, np.inf, np.float64)
    owner = np.full(npts, -1, np.int64)
    for a, b in _blocks(xy, r + extra, grid.step):
        ci, rows, cols = _candidates(grid, xy[a:b], r[a:b] + extra)
        ci = ci + a
        d = np.hypot(*(grid.centres(rows, cols) - xy[ci]).T) - r[ci]
        ok = d <= extra
        ci, d, flat = ci[ok], d[ok], (rows * grid.shape[1] + cols)[ok]
        order = np.lexsort((d, flat))  # per point, the smallest distance first (stable: lower cell)
        flat, d, ci = flat[order], d[order], ci[order]
        first = np.r_[True, flat[1:] != flat[:-1]]
        flat, d, ci = flat[first], d[first], ci[first]
        better = d < best[flat]
        best[flat[better]], owner[flat[better]] = d[better], ci[better]
    return owner, best


def _bin_grid(cells: _Cells, window, bin_um, angle, margin) -> _Grid:
    if window is None:
        lo, hi = cells.xy.min(axis=0), cells.xy.max(axis=0)
    else:
        lo, hi = np.array(window[:2], float), np.array(window[2:], float)
    lo, hi = lo - margin, hi + margin
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]])
    probe = _Grid(lo, bin_um, angle, (1, 1))
    fr = probe.fractional(corners)
    r0, c0 = np.floor(fr.min(axis=0)).astype(int)
    r1, c1 = np.ceil(fr.max(axis=0)).astype(int)
    origin = probe.centres(np.array([r0]), np.array([c0]))[0]
    return _Grid(origin, bin_um, angle, (r1 - r0 + 1, c1 - c0 + 1))


def _tissue(grid: _Grid, cells: _Cells, owner, tissue_um: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    rows, cols = np.divmod(np.arange(grid.shape[0] * grid.shape[1]), grid.shape[1])
    d, _ = cKDTree(cells.xy).query(grid.centres(rows, cols), k=1, distance_upper_bound=tissue_um)
    return np.isfinite(d) | (owner >= 0)


# --------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------
def _counts(cells: _Cells, bin_owner, rng, background_rate: float):
    """Bins x genes counts (CSR over the given bins): each cell's transcripts spread uniformly over
    its bins, Poisson background on bins of no cell. Returns (X, n_cells_without_bins, lost counts)."""
    nb = len(bin_owner)
    assigned = np.flatnonzero(bin_owner >= 0)
    order = assigned[np.argsort(bin_owner[assigned], kind="stable")]  # bins grouped by cell
    per_cell = np.bincount(bin_owner[assigned], minlength=len(cells.ids))
    start = np.cumsum(per_cell) - per_cell
    coo = cells.X.tocoo()
    has = per_cell[coo.row] > 0
    tx_cell = np.repeat(coo.row[has], coo.data[has])
    tx_gene = np.repeat(coo.col[has], coo.data[has])
    pick = np.floor(rng.random(len(tx_cell)) * per_cell[tx_cell]).astype(np.int64)
    tx_bin = order[start[tx_cell] + pick]
    empty = np.flatnonzero(bin_owner < 0)
    n_bg = rng.poisson(background_rate, size=len(empty))
    share = np.asarray(cells.X.sum(axis=0), dtype=np.float64).ravel()
    share = share / share.sum() if share.sum() > 0 else np.full(len(share), 1.0 / len(share))
    bg_bin = np.repeat(empty, n_bg)
    bg_gene = rng.choice(len(share), size=len(bg_bin), p=share)
    rows, cols = np.r_[tx_bin, bg_bin], np.r_[tx_gene, bg_gene]
    X = sp.coo_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(nb, len(share))).tocsr()
    X.sum_duplicates()
    lost = int(coo.data[~has].sum())
    return X, int((per_cell == 0).sum()), lost


# --------------------------------------------------------------------------------------------
# polygons (exact Apollonius boundaries along rays from each centre)
# --------------------------------------------------------------------------------------------
def _ray_limits(cells: _Cells, extra: float, n_vertices: int) -> np.ndarray:
    """(n_cells, n_vertices): how far along each ray from its centre a cell keeps owning the plane."""
    from scipy.spatial import cKDTree

    n, r, xy = len(cells.ids), cells.r, cells.xy
    theta = 2 * np.pi * np.arange(n_vertices) / n_vertices
    u = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    limit = np.full((n, n_vertices), np.inf)
    pairs = cKDTree(xy).query_pairs(2 * r.max() + 2 * extra, output_type="ndarray")
    if len(pairs):
        pairs = np.r_[pairs, pairs[:, ::-1]]
        i, j = pairs[:, 0], pairs[:, 1]
        D = xy[j] - xy[i]
        dist = np.hypot(D[:, 0], D[:, 1])
        near = dist <= r[i] + r[j] + 2 * extra
        i, j, D, dist = i[near], j[near], D[near], dist[near]
        s = (r[j] - r[i])[:, None]
        den = 2 * (s + D @ u.T)  # along ray t from c_i: d_i = t - r_i, d_j = |t u - D| - r_j
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(den > 0, ((dist ** 2)[:, None] - s ** 2) / den, np.inf)
        t = np.where((dist[:, None] <= s), 0.0, np.maximum(t, 0.0))  # i's disk inside j's: no land
        np.minimum.at(limit, (np.repeat(i, n_vertices), np.tile(np.arange(n_vertices), len(i))),
                      t.ravel())
    return np.minimum(limit, (r + extra)[:, None]), u


def _geojson(path: Path, cells: _Cells, radii, u, origin, mpp) -> int:
    keep = (radii > 1e-9).any(axis=1)
    ring = cells.xy[keep, None, :] + radii[keep, :, None] * u[None]
    ring = np.concatenate([ring, ring[:, :1]], axis=1)  # closed rings
    px = np.round((ring - origin) / mpp, 3).tolist()
    ids = cells.ids[keep].tolist()
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [v]},
              "properties": {"cell_id": c}} for v, c in zip(px, ids)]
    with open(path, "w", encoding="utf-8") as fh:  # dumps: the C encoder (dump is pure Python)
        fh.write(json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":")))
    return int(keep.sum())


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def _render(cells: _Cells, bins: _Grid, tissue, origin, size_px, scalef, mpp, expand, rng) -> np.ndarray:
    """An H&E-like RGB rendering: nuclei dark purple, cells pink, tissue pale, background white."""
    h = mpp / scalef
    shape = (max(1, int(round(size_px[1] * scalef))), max(1, int(round(size_px[0] * scalef))))
    g = _Grid(origin + h / 2, h, 0.0, shape)
    cel, key = _owners(g, cells.xy, cells.r, expand)
    rows, cols = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
    rc = np.round(bins.fractional(g.centres(rows, cols))).astype(np.int64)
    inside = (rc >= 0).all(axis=1) & (rc[:, 0] < bins.shape[0]) & (rc[:, 1] < bins.shape[1])
    in_t = np.zeros(len(rows), bool)
    in_t[inside] = tissue[rc[inside, 0] * bins.shape[1] + rc[inside, 1]]
    palette = np.array([[246, 244, 246], [236, 206, 222], [222, 160, 196], [96, 58, 138]], np.float32)
    cls = np.where(key <= 0, 3, np.where(cel >= 0, 2, np.where(in_t, 1, 0)))
    img = palette[cls] * (1 + 0.04 * rng.standard_normal(len(cls), dtype=np.float32))[:, None]
    return np.clip(img, 0, 255).astype(np.uint8).reshape(shape + (3,))


def _save_png(path: Path, img) -> None:
    import matplotlib.image as mpimg  # lazy: the datasets layer imports no plotting at load

    mpimg.imsave(path, img, pil_kwargs={"compress_level": 1})


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def _write_h5(path: Path, X: sp.csr_matrix, barcodes, cells: _Cells, sample: str) -> None:
    """Cell Ranger HDF5: ``matrix/`` CSC genes x bins (= the CSR bins x genes arrays)."""
    n = len(cells.gene_ids)
    z = dict(compression="gzip", compression_opts=4)
    with h5py.File(path, "w") as fh:
        fh.attrs["filetype"] = "matrix"
        fh.attrs["version"] = 2
        fh.attrs["library_ids"] = np.array([sample], dtype="S")
        fh.attrs["chemistry_description"] = "Visium HD v1 (rasterised from Xenium cells)"
        fh.attrs["software_version"] = "expkit.datasets.hd_case"
        g = fh.create_group("matrix")
        g.create_dataset("data", data=X.data.astype(np.int32), **z)
        g.create_dataset("indices", data=X.indices.astype(np.int64), **z)
        g.create_dataset("indptr", data=X.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([n, X.shape[0]], np.int32))
        g.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"), **z)
        f = g.create_group("features")
        f.create_dataset("id", data=np.asarray(cells.gene_ids, dtype="S"))
        f.create_dataset("name", data=np.asarray(cells.gene_names, dtype="S"))
        f.create_dataset("feature_type", data=np.array(["Gene Expression"] * n, dtype="S"))
        f.create_dataset("genome", data=np.array(["mm10"] * n, dtype="S"))
        f.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


def _text(v: np.ndarray) -> np.ndarray:
    """Decimal text (bytes) of a column: integers and non-negative 4-decimal floats through digit tables
    (a gather; numpy's own number formatting is ~15x slower), else numpy's formatting."""
    if v.dtype.kind == "S":
        return v
    if v.dtype.kind in "iu" and v.size and 0 <= v.min() and v.max() < 2_000_000:
        return np.array([str(i) for i in range(int(v.max()) + 1)], dtype="S")[v]  # a table, per value
    if v.dtype.kind == "f" and v.size and np.isfinite(v).all() and 0 <= v.min() and v.max() < 2_000_000:
        ip = np.floor(v).astype(np.int64)
        fp = np.round((v - ip) * 1e4).astype(np.int64)
        ip, fp = np.where(fp >= 10000, ip + 1, ip), np.where(fp >= 10000, 0, fp)
        frac = np.array([f"{i:04d}" for i in range(10000)], dtype="S")
        return np.char.add(np.char.add(_text(ip), b"."), frac[fp])
    return v.astype("S")


def _write_csv(path: Path, columns: dict) -> None:
    """A CSV (gzip level 1 for ``.gz``) of equal-length columns, written as one bytes block."""
    import gzip

    line = None
    for v in columns.values():
        t = _text(np.asarray(v))
        line = t if line is None else np.char.add(np.char.add(line, b","), t)
    body = ",".join(columns).encode() + b"\n" + b"\n".join(line.tolist()) + b"\n"
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as fh:
            fh.write(body)
    else:
        path.write_bytes(body)


def _barcodes(grid: _Grid, bin_um: int) -> np.ndarray:
    rows, cols = np.divmod(np.arange(grid.shape[0] * grid.shape[1]), grid.shape[1])
    rs = np.array([f"s_{bin_um:03d}um_{k:05d}_" for k in range(grid.shape[0])], dtype="S")  # per row
    cs = np.array([f"{k:05d}-1" for k in range(grid.shape[1])], dtype="S")
    return np.char.add(rs[rows], cs[cols])


def _write_positions(spatial: Path, grid: _Grid, barcodes, tissue, origin, mpp, parquet) -> bool:
    rows, cols = np.divmod(np.arange(grid.shape[0] * grid.shape[1]), grid.shape[1])
    px = np.round((grid.centres(rows, cols) - origin) / mpp, 4)
    cols_ = {"barcode": barcodes, "in_tissue": tissue.astype(np.int64), "array_row": rows, "array_col": cols,
             "pxl_row_in_fullres": px[:, 1], "pxl_col_in_fullres": px[:, 0]}
    _write_csv(spatial / "tissue_positions.csv", cols_)
    if parquet is None:
        try:
            import pyarrow  # noqa: F401
            parquet = True
        except ImportError:
            parquet = False
    if parquet:
        cols_["barcode"] = barcodes.astype(str)
        pd.DataFrame(cols_).to_parquet(spatial / "tissue_positions.parquet", index=False)
    return bool(parquet)


def _write_labels(out: Path, cells: _Cells, origin, size_px, mpp, label_um) -> dict:
    s = mpp / label_um
    shape = (int(np.ceil(size_px[1] * s)), int(np.ceil(size_px[0] * s)))
    g = _Grid(origin + label_um / 2, label_um, 0.0, shape)
    owner, _ = _owners(g, cells.xy, cells.r, 0.0)
    lab = np.where(owner >= 0, cells.ids[np.maximum(owner, 0)], 0).astype(np.uint32).reshape(shape)
    np.save(out / "nuclei_labels.npy", lab)
    meta = {"file": "nuclei_labels.npy", "dtype": "uint32", "shape": list(shape), "background": 0,
            "microns_per_label_pixel": label_um, "labels_scalef": s,
            "affine_fullres_to_label": [[s, 0.0, 0.0], [0.0, s, 0.0]],
            "convention": "label pixel (row, col) = floor(full-res (y, x) * labels_scalef) (pixel corners "
                          "at integer label coordinates, as bin2cell's insert_labels); label value = Xenium "
                          "cell_id; a pixel holds the nucleus owning its centre",
            "transform_pixel_centres": [[s, 0.0, -0.5], [0.0, s, -0.5], [0.0, 0.0, 1.0]],
            "transform_pixel_centres_note": "the same image for tools whose pixel [row, col] is centred at "
                                            "image coordinate (col, row) (expkit's ImageStore)"}
    with open(out / "nuclei_labels.json", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    return meta


def _write_tables(out: Path, cells: _Cells, owner_t, key_t, barcodes_t, X, origin, mpp) -> pd.DataFrame:
    cid = np.where(owner_t >= 0, cells.ids[np.maximum(owner_t, 0)], 0)
    totals = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    _write_csv(out / "truth.csv.gz", {"barcode": barcodes_t, "cell_id": cid, "counts": totals,
                                      "in_nucleus": (key_t <= 0).astype(np.int64)})
    n_bins = np.bincount(owner_t[owner_t >= 0], minlength=len(cells.ids))
    n_nuc = np.bincount(owner_t[(owner_t >= 0) & (key_t <= 0)], minlength=len(cells.ids))
    px = (cells.xy - origin) / mpp
    per_cell = pd.DataFrame({"cell_id": cells.ids, "x_um": cells.xy[:, 0], "y_um": cells.xy[:, 1],
                             "x_fullres": px[:, 0], "y_fullres": px[:, 1], "nucleus_radius_um": cells.r,
                             "n_bins": n_bins, "n_nucleus_bins": n_nuc,
                             "counts": np.asarray(cells.X.sum(axis=1)).ravel().astype(np.int64)})
    per_cell.to_csv(out / "cells.csv.gz", index=False, compression={"method": "gzip", "compresslevel": 1})
    return per_cell


def _check_args(bin_um, expand_um, mpp, label_um, background_rate, tissue_um, n_vertices):
    if bin_um not in (2, 8, 16):
        raise InputError(f"bin_um={bin_um!r}: Visium HD bins are 2, 8 or 16 um")
    for name, v in (("expand_um", expand_um), ("background_rate", background_rate)):
        if not np.isfinite(v) or v < 0:
            raise InputError(f"{name}={v!r} must be a finite number >= 0")
    for name, v in (("microns_per_pixel", mpp), ("label_um", label_um), ("tissue_um", tissue_um)):
        if not np.isfinite(v) or v <= 0:
            raise InputError(f"{name}={v!r} must be a positive number")
    if int(n_vertices) < 8:
        raise InputError(f"n_vertices={n_vertices!r} must be at least 8")


def _image_frame(bins: _Grid, bin_um, mpp):
    """The full-resolution image: its origin (microns) and size (W, H pixels), covering every bin."""
    rows, cols = np.divmod(np.arange(bins.shape[0] * bins.shape[1]), bins.shape[1])
    centres = bins.centres(rows, cols)
    pad = bin_um + 5.0
    origin = centres.min(axis=0) - pad
    return origin, np.ceil((centres.max(axis=0) + pad - origin) / mpp).astype(np.int64)


def _write_images(spatial: Path, cells, bins, tissue, origin, size_px, mpp, bin_um, expand, rng) -> None:
    """scalefactors_json.json (Space Ranger's Visium HD keys) and the hires / lowres renderings."""
    hires = min(0.5, _HIRES_MAX / size_px.max())
    lowres = min(1.0, _LOWRES_MAX / size_px.max())
    sf = {"spot_diameter_fullres": bin_um / mpp, "bin_size_um": float(bin_um), "microns_per_pixel": mpp,
          "regist_target_img_scalef": hires, "tissue_lowres_scalef": lowres,
          "fiducial_diameter_fullres": 100.0 / mpp, "tissue_hires_scalef": hires}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf, indent=4), encoding="utf-8")
    for name, scalef in (("hires", hires), ("lowres", lowres)):
        _save_png(spatial / f"tissue_{name}_image.png",
                  _render(cells, bins, tissue, origin, size_px, scalef, mpp, expand, rng))


def _write_segmentations(seg: Path, cells, expand, n_vertices, origin, mpp) -> tuple:
    limits, u = _ray_limits(cells, expand, n_vertices)
    n_cell = _geojson(seg / "cell_segmentations.geojson", cells, limits, u, origin, mpp)
    n_nuc = _geojson(seg / "nucleus_segmentations.geojson", cells, np.minimum(limits, cells.r[:, None]), u,
                     origin, mpp)
    return n_cell, n_nuc


def rasterised_visium_hd(out, *, xenium=None, window_um=None, bin_um: int = 2, expand_um: float = 2.0,
                         microns_per_pixel: float = 0.2738, rotation_deg: float = 0.3,
                         label_um: float = 0.5, background_rate: float = 0.2, tissue_um: float = 20.0,
                         n_vertices: int = 48, sample: str = "xenium_hd", parquet=None,
                         seed: int = 0) -> dict:
    """Write a Space Ranger-faithful Visium HD output whose cells are known (see the module docstring).

    Parameters
    ----------
    out
        Folder to write (created; existing files of the same names are replaced).
    xenium
        The Xenium folder (``cell_feature_matrix.h5``, ``cells.csv.gz``); default
        :func:`default_xenium`.
    window_um
        ``(x0, y0, x1, y1)`` in Xenium microns: the cells whose centroid lies inside; None: all.
    bin_um, expand_um, microns_per_pixel, rotation_deg
        Bin size (2, 8 or 16), the expansion of the nuclei into cells, the full-resolution pixel size
        and the rotation of the bin grid against the image.
    label_um
        Microns per pixel of the nuclei label image (``labels_scalef = microns_per_pixel / label_um``).
    background_rate, tissue_um
        Mean background transcripts per in-tissue bin of no cell; bins within ``tissue_um`` of a
        cell centre are in tissue.
    n_vertices
        Vertices per GeoJSON polygon.
    sample
        Library id written into the matrix file.
    parquet
        Also write ``tissue_positions.parquet`` (None: when pyarrow is importable).
    seed
        Seeds the multinomial, the background and the image noise: same seed, identical files.

    Returns
    -------
    dict
        Paths (``outs``, ``square``, ``labels``, ``truth``, ``cells``, ``nucleus_geojson``,
        ``cell_geojson``), ``labels_scalef``, the parameters and counts of the case (as in
        ``case.json``).
    """
    _check_args(bin_um, expand_um, microns_per_pixel, label_um, background_rate, tissue_um, n_vertices)
    folder = Path(xenium) if xenium is not None else default_xenium()
    if not folder.is_dir():
        raise InputError(f"Xenium folder {folder} not found (set EXPKIT_SHARED_DATA or pass xenium=)")
    cells = _read_xenium(folder, window_um)
    mpp, rng, out, expand = float(microns_per_pixel), np.random.default_rng(seed), Path(out), float(expand_um)
    bins = _bin_grid(cells, window_um, float(bin_um), np.deg2rad(rotation_deg), cells.r.max() + expand + 2 * bin_um)
    owner, key = _owners(bins, cells.xy, cells.r, expand)
    tissue = _tissue(bins, cells, owner, float(tissue_um))
    origin, size_px = _image_frame(bins, bin_um, mpp)
    in_t = np.flatnonzero(tissue)
    X, n_empty, lost = _counts(cells, owner[in_t], rng, float(background_rate))
    barcodes = _barcodes(bins, int(bin_um))
    square = out / "outs" / "binned_outputs" / f"square_{int(bin_um):03d}um"
    seg = out / "outs" / "segmented_outputs"
    for d in (square / "spatial", seg):
        d.mkdir(parents=True, exist_ok=True)
    _write_h5(square / "filtered_feature_bc_matrix.h5", X, barcodes[in_t], cells, sample)
    wrote_parquet = _write_positions(square / "spatial", bins, barcodes, tissue, origin, mpp, parquet)
    per_cell = _write_tables(out, cells, owner[in_t], key[in_t], barcodes[in_t], X, origin, mpp)
    del barcodes
    _write_images(square / "spatial", cells, bins, tissue, origin, size_px, mpp, bin_um, expand, rng)
    n_poly = _write_segmentations(seg, cells, expand, int(n_vertices), origin, mpp)
    labels = _write_labels(out, cells, origin, size_px, mpp, float(label_um))
    info = {"sample": sample, "xenium": str(folder), "window_um": None if window_um is None else
            [float(v) for v in window_um], "bin_um": int(bin_um), "expand_um": expand, "microns_per_pixel": mpp,
            "rotation_deg": float(rotation_deg), "label_um": float(label_um),
            "background_rate": float(background_rate), "tissue_um": float(tissue_um),
            "n_vertices": int(n_vertices), "seed": int(seed), "parquet": wrote_parquet,
            "image_origin_um": origin.tolist(), "fullres_size_px": size_px.tolist(),
            "grid_shape": [int(v) for v in bins.shape], "n_bins_grid": int(tissue.size),
            "n_bins_in_tissue": int(in_t.size), "n_bins_in_cells": int((owner[in_t] >= 0).sum()),
            "n_cells": int(len(cells.ids)), "n_cells_without_bins": n_empty, "counts_lost_with_them": lost,
            "n_cell_polygons": n_poly[0], "n_nucleus_polygons": n_poly[1],
            "counts_in_cells": int(per_cell["counts"][per_cell["n_bins"] > 0].sum()),
            "counts_total": int(X.sum()), "labels_scalef": labels["labels_scalef"], "labels_shape": labels["shape"]}
    (out / "case.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    _write_readme(out, info)
    paths = {"outs": out / "outs", "square": square, "labels": out / "nuclei_labels.npy",
             "truth": out / "truth.csv.gz", "cells": out / "cells.csv.gz",
             "nucleus_geojson": seg / "nucleus_segmentations.geojson", "cell_geojson": seg / "cell_segmentations.geojson"}
    return {**paths, **info}


def _write_readme(out: Path, info: dict) -> None:
    w = info["window_um"]
    text = f"""# Rasterised Visium HD case (expkit.datasets.hd_case.rasterised_visium_hd)

Built from the real 10x Xenium mouse brain cells in `{info['xenium']}` (Bioconductor SpatialExperiment
test data, GPL-3): `cell_feature_matrix.h5` (real integer counts of the 248 "Gene Expression" features
per cell) and `cells.csv.gz` (x_centroid, y_centroid in microns, nucleus_area). Cells: the
{info['n_cells']:,} cells whose centroid lies in {'the whole section' if w is None else f'the window x in [{w[0]}, {w[2]}), y in [{w[1]}, {w[3]}) um'}.
Parameters: {json.dumps({k: info[k] for k in ('bin_um', 'expand_um', 'microns_per_pixel', 'rotation_deg', 'label_um', 'background_rate', 'tissue_um', 'n_vertices', 'seed')})}.

## Geometry (microns, Xenium frame)
- Full-resolution pixel (x, y) = (micron - image origin {[round(v, 3) for v in info['image_origin_um']]}) /
  microns_per_pixel; the image is {info['fullres_size_px'][0]} x {info['fullres_size_px'][1]} px (virtual: only the
  hires/lowres renderings are written).
- Nucleus of a cell: the disk of area `nucleus_area` at its centroid.
- A point p belongs to the cell with the smallest signed distance to its nucleus boundary,
  d_i(p) = |p - c_i| - r_i (the additively weighted Voronoi diagram of the nuclei): inside a nucleus
  it belongs to that nucleus (inside two overlapping nuclei: the one it lies deeper in), outside every
  nucleus to the nucleus whose boundary is nearest. Exact ties go to the lower cell index. The cell is
  its points with d_i <= expand_um (nuclei expanded without merging); the nucleus its points with d_i <= 0.
- Bins: a {info['bin_um']} um square grid of {info['grid_shape'][0]} x {info['grid_shape'][1]} bins rotated by
  {info['rotation_deg']} degrees against the image; a bin belongs to the cell owning its centre.
  In tissue: bins within tissue_um of a cell centre, or in a cell ({info['n_bins_in_tissue']:,} of
  {info['n_bins_grid']:,}; {info['n_bins_in_cells']:,} in cells).
- Counts: every transcript of a cell (its Xenium counts) picks one of the cell's bins uniformly
  (a seeded multinomial), so the true bins of a cell sum exactly to its Xenium counts. In-tissue bins
  of no cell get Poisson(background_rate) transcripts with genes drawn in proportion to the genes'
  totals. {info['n_cells_without_bins']} cells own no bin (a nucleus inside a larger one); their
  {info['counts_lost_with_them']} counts are not in the matrix.

## Files
- `outs/binned_outputs/square_{info['bin_um']:03d}um/filtered_feature_bc_matrix.h5`: Cell Ranger HDF5 (in-tissue
  bins, barcodes `s_{info['bin_um']:03d}um_<row:05d>_<col:05d>-1`); `spatial/tissue_positions.csv`{' and .parquet' if info['parquet'] else ''}
  (every grid bin: barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres),
  `scalefactors_json.json`, `tissue_hires_image.png`, `tissue_lowres_image.png` (a rendering: nuclei
  dark purple, cells pink, other tissue pale pink, background white, 4 % noise).
- `outs/segmented_outputs/{{nucleus,cell}}_segmentations.geojson`: FeatureCollection of Polygon features,
  properties {{"cell_id": <Xenium id>}}, full-resolution (x, y) pixels; each ring samples the exact region
  boundary along {info['n_vertices']} rays from the centre (the regions are star-shaped from it). Cells
  with no region have no feature.
- `nuclei_labels.npy`: uint32 label image (Xenium cell id, 0 background) of shape {info['labels_shape']},
  {info['label_um']} um per pixel: label pixel (row, col) = floor(full-res (y, x) * {info['labels_scalef']:.6g})
  (pure scale, `nuclei_labels.json`); a pixel holds the nucleus owning its centre.
- `truth.csv.gz`: per in-tissue bin (matrix order) barcode, cell_id (0: no cell), counts, in_nucleus.
- `cells.csv.gz`: per cell id, centroid (um and full-res px), nucleus radius, n_bins, n_nucleus_bins,
  counts (Xenium total).
- `case.json`: the parameters and counts above.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
