"""Cell / nucleus polygons for :func:`~expkit.spatial.bins_to_cells.bins_to_cells`: readers for Space Ranger
GeoJSON, Xenium / CosMx boundary tables and plain (cell_id, x, y) tables, and the coordinate-space check.

Polygons are held as flat vertex arrays ``x, y`` (full-resolution pixels once converted), ring offsets and
integer ids: the form :func:`expkit.kernels.bins_cells.rasterise_polygons` fills.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, ReaderError

UNITS = ("auto", "pixel", "um")
# boundary tables: (id column, x column, y column, unit, extra id column)
TABLE_LAYOUTS = (("cell_id", "vertex_x", "vertex_y", "um", None),       # Xenium cell/nucleus_boundaries
                 ("cellID", "x_global_px", "y_global_px", "pixel", "fov"),  # CosMx *-polygons.csv
                 ("cell_id", "x", "y", "pixel", None))                   # a plain table


@dataclass
class Polygons:
    x: np.ndarray        # vertices, concatenated rings
    y: np.ndarray
    offsets: np.ndarray  # (n + 1,) ring k = vertices offsets[k]:offsets[k+1]
    ids: np.ndarray      # (n,) uint32 labels > 0 (1..n)
    names: np.ndarray    # (n,) the cell ids as given (str)
    unit: str            # "pixel" | "um" (of x, y as read)
    source: str

    def bbox(self) -> tuple[float, float, float, float]:
        return float(self.x.min()), float(self.y.min()), float(self.x.max()), float(self.y.max())

    def poly_bbox(self) -> np.ndarray:
        """(n, 4) x0, y0, x1, y1 of every polygon."""
        s = self.offsets[:-1]
        return np.stack([np.minimum.reduceat(self.x, s), np.minimum.reduceat(self.y, s),
                         np.maximum.reduceat(self.x, s), np.maximum.reduceat(self.y, s)], axis=1)

    def scaled(self, factor: float) -> "Polygons":
        return Polygons(self.x * factor, self.y * factor, self.offsets, self.ids, self.names, "pixel", self.source)

    def renamed(self, names: np.ndarray) -> "Polygons":
        """The same polygons with the given ids (made unique by a ``_<k>`` suffix when they repeat)."""
        names = np.asarray(names).astype(str)
        if pd.Index(names).has_duplicates:
            names = np.char.add(np.char.add(names, "_"), np.arange(names.size).astype(str))
        return Polygons(self.x, self.y, self.offsets, self.ids, names, self.unit, self.source)

    def take(self, keep: np.ndarray) -> "Polygons":
        """The polygons ``keep`` (indices), with their vertices."""
        lengths = np.diff(self.offsets)[keep]
        starts = self.offsets[:-1][keep]
        idx = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return Polygons(self.x[idx], self.y[idx], np.r_[0, np.cumsum(lengths)], self.ids[keep], self.names[keep],
                        self.unit, self.source)


def _from_groups(ids_given, x, y, unit: str, source: str) -> Polygons:
    """Vertices listed cell after cell (each cell's vertices contiguous) -> Polygons."""
    ids_given = np.asarray(ids_given)
    if ids_given.size == 0:
        raise InputError(f"{source}: no polygon vertices")
    change = np.r_[True, ids_given[1:] != ids_given[:-1]]
    starts = np.flatnonzero(change)
    names = ids_given[starts].astype(str)
    if len(set(names)) != names.size:
        raise InputError(f"{source}: the vertices of a cell must be contiguous (cell "
                         f"{pd.Index(names)[pd.Index(names).duplicated()][0]!r} appears in several runs)")
    offsets = np.r_[starts, ids_given.size].astype(np.int64)
    if (np.diff(offsets) < 3).any():
        bad = names[np.diff(offsets) < 3][:5].tolist()
        raise InputError(f"{source}: polygons need at least 3 vertices; cells {bad} have fewer")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError(f"{source}: polygon vertices with NaN / infinite coordinates")
    return Polygons(x, y, offsets, np.arange(1, names.size + 1, dtype=np.uint32), names, unit, source)


def _read_geojson(path: Path) -> Polygons:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ReaderError(f"{str(path)!r}: not a readable GeoJSON file ({exc})") from exc
    feats = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(feats, list):
        raise ReaderError(f"{str(path)!r}: expected a GeoJSON FeatureCollection with 'features'")
    rings, names = [], []
    for i, f in enumerate(feats):  # parsing: one Python object per feature is what json gives
        geom = (f or {}).get("geometry") or {}
        coords = geom.get("coordinates")
        if geom.get("type") == "MultiPolygon" and coords:
            coords = max(coords, key=lambda p: len(p[0]))  # the largest part's exterior ring
        elif geom.get("type") != "Polygon" or not coords:
            continue
        props = f.get("properties") or {}
        rings.append(np.asarray(coords[0], dtype=np.float64).reshape(-1, 2))
        names.append(str(props.get("cell_id", props.get("id", f.get("id", i + 1)))))
    if not rings:
        raise ReaderError(f"{str(path)!r}: no Polygon / MultiPolygon feature")
    lengths = np.array([len(r) for r in rings])
    xy = np.concatenate(rings)
    return _from_groups(np.repeat(np.arange(len(rings)), lengths), xy[:, 0], xy[:, 1], "pixel",
                        str(path)).renamed(np.asarray(names))


def _read_table(df: pd.DataFrame, source: str) -> Polygons:
    for id_col, x_col, y_col, unit, extra in TABLE_LAYOUTS:
        if {id_col, x_col, y_col} <= set(df.columns):
            ids = df[id_col].astype(str).to_numpy()
            if extra is not None and extra in df.columns:
                ids = (df[extra].astype(str) + "_" + df[id_col].astype(str)).to_numpy()
            return _from_groups(ids, df[x_col].to_numpy(), df[y_col].to_numpy(), unit, source)
    raise InputError(f"{source}: a polygon table needs columns (cell_id, vertex_x, vertex_y) [Xenium], "
                     f"(fov, cellID, x_global_px, y_global_px) [CosMx] or (cell_id, x, y); found {list(df.columns)}")


def read_polygons(polygons, unit: str = "auto") -> Polygons:
    """Polygons from a GeoJSON file (Space Ranger ``segmented_outputs``), a boundary table file (.csv, .csv.gz,
    .parquet: Xenium ``cell_boundaries``, CosMx ``*-polygons.csv``) or a DataFrame; ``unit`` overrides the
    layout's unit (GeoJSON and CosMx: pixels, Xenium: microns)."""
    if unit not in UNITS:
        raise InputError(f"bins_to_cells: polygons_unit must be one of {UNITS}, not {unit!r}")
    if isinstance(polygons, Polygons):
        poly = polygons
    elif isinstance(polygons, pd.DataFrame):
        poly = _read_table(polygons, "polygons DataFrame")
    else:
        path = Path(polygons)
        if not path.is_file():
            raise InputError(f"bins_to_cells: polygons file {str(path)!r} does not exist")
        name = path.name.lower()
        if name.endswith((".geojson", ".json", ".geojson.gz", ".json.gz")):
            poly = _read_geojson(path)
        elif name.endswith(".parquet"):
            try:
                df = pd.read_parquet(path)
            except ImportError as exc:
                raise InputError(f"{str(path)!r}: reading parquet needs pyarrow (pip install expkit[parquet])") from exc
            poly = _read_table(df, str(path))
        else:
            try:
                df = pd.read_csv(path)
            except Exception as exc:
                raise ReaderError(f"{str(path)!r}: not a readable polygon table ({exc})") from exc
            poly = _read_table(df, str(path))
    if unit != "auto":
        poly.unit = unit
    return poly


def _overlap(a, b) -> float:
    """Share of box ``a``'s area inside box ``b`` (boxes x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max((a[2] - a[0]) * (a[3] - a[1]), 1e-12)
    return w * h / area


def _iou(a, b) -> float:
    inter = _overlap(a, b) * max((a[2] - a[0]) * (a[3] - a[1]), 1e-12)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-12)


def _candidates(mpp, scalefactors) -> dict[str, float]:
    """The usual coordinate mix-ups: name -> the factor that would bring the polygons to full-resolution pixels."""
    out = {}
    if mpp:
        out["microns (pass polygons_unit='um': pixels = microns / microns_per_pixel)"] = 1.0 / mpp
        out["pixels although given as microns (pass polygons_unit='pixel')"] = mpp
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        if scalefactors.get(k):
            img = k.split("_")[1]
            out[f"{img}-image pixels (divide the coordinates by {k} = {scalefactors[k]:.6g})"] = 1.0 / scalefactors[k]
            out[f"pixels scaled by {k} twice (multiply by {k} = {scalefactors[k]:.6g})"] = scalefactors[k]
    return out


def to_pixels(poly: Polygons, bins_box, mpp: float | None, scalefactors: dict, sample) -> Polygons:
    """The polygons in full-resolution pixels, refused when their extent does not fit the bins' (less than half
    of the polygons' extent over the bins, or a usual mix-up of units fitting at least twice as well), with the
    transform that would make them fit."""
    if poly.unit == "um":
        if not mpp:
            raise InputError(f"bins_to_cells, sample {sample!r}: polygons in microns need 'microns_per_pixel' in "
                             f"the sample's scalefactors")
        poly = poly.scaled(1.0 / mpp)
    box = poly.bbox()
    inside, iou = _overlap(box, bins_box), _iou(box, bins_box)
    fits = {name: _iou(tuple(v * f for v in box), bins_box) for name, f in _candidates(mpp, scalefactors).items()}
    best = max(fits, key=fits.get) if fits else None
    better = best is not None and fits[best] >= 0.5 and fits[best] > 2 * iou
    if inside >= 0.5 and not better:
        return poly
    hint = (f"; they look like {best}, which would make them overlap the bins {fits[best]:.0%}" if better else
            "; no usual transform (microns <-> pixels, hires / lowres scale) makes them fit")
    raise InputError(f"bins_to_cells, sample {sample!r}: the polygons ({poly.source}) span x {box[0]:.6g}..{box[2]:.6g},"
                     f" y {box[1]:.6g}..{box[3]:.6g} but the bins span x {bins_box[0]:.6g}..{bins_box[2]:.6g}, "
                     f"y {bins_box[1]:.6g}..{bins_box[3]:.6g} full-resolution pixels (overlap {iou:.0%}){hint}")
