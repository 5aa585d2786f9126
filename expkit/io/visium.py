"""10x Visium: a Space Ranger ``outs/`` folder (matrix + ``spatial/``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger
from ..errors import ReaderError
from ._checks import (check_finite, check_subset, examples, fail, first_line, open_text, read_parquet,
                      require_dir)
from .tenx import read_10x_h5, read_10x_mtx

__all__ = ["read_visium", "read_image"]

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                    "pxl_col_in_fullres"]
_MATRIX_NAMES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
_MTX_FOLDERS = ("filtered_feature_bc_matrix", "raw_feature_bc_matrix")


def _find_matrix(folder: Path, sample: str, matrix) -> Path:
    if matrix is not None:
        path = Path(matrix)
        if not path.is_absolute():
            path = folder / path
        if not path.exists():
            raise fail(sample, path, "count matrix not found")
        return path
    for name in _MATRIX_NAMES:
        if (folder / name).is_file():
            return folder / name
    h5s = sorted(p for p in folder.glob("*.h5") if p.is_file())
    if len(h5s) == 1:
        return h5s[0]
    if len(h5s) > 1:
        raise fail(sample, folder, f"several .h5 files ({', '.join(p.name for p in h5s)}): pass "
                                   f"matrix=<file name> to say which is the count matrix")
    for name in _MTX_FOLDERS:
        if (folder / name).is_dir():
            return folder / name
    raise fail(sample, folder, "no count matrix: expected filtered_feature_bc_matrix.h5, "
                               "raw_feature_bc_matrix.h5, a single *.h5 file or a "
                               "filtered_feature_bc_matrix/ folder")


def read_positions(spatial: Path, sample: str) -> tuple[pd.DataFrame, Path]:
    """The tissue positions table (Space Ranger 1: ``tissue_positions_list.csv`` without header,
    Space Ranger 2+: ``tissue_positions.csv`` with header, or ``tissue_positions.parquet``),
    indexed by barcode."""
    candidates = [spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv",
                  spatial / "tissue_positions.parquet"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise fail(sample, spatial / "tissue_positions_list.csv",
                   "tissue positions file not found (looked for tissue_positions.csv, "
                   "tissue_positions_list.csv and tissue_positions.parquet)")
    if path.suffix == ".parquet":
        df = read_parquet(path, sample, "tissue positions file")
        return _clean_positions(df, path, sample, has_header=True), path
    head = first_line(path, sample)
    has_header = head.split(",")[0].strip().strip('"') == "barcode"
    try:
        with open_text(path, sample) as fh:
            df = pd.read_csv(fh, header=0 if has_header else None, engine="c",
                             dtype={0: str} if not has_header else {"barcode": str})
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, "tissue positions file is empty") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed tissue positions file: {exc}") from exc
    return _clean_positions(df, path, sample, has_header), path


def _clean_positions(df: pd.DataFrame, path: Path, sample: str, has_header: bool) -> pd.DataFrame:
    if df.shape[1] != 6:
        raise fail(sample, path, f"expected 6 columns ({', '.join(POSITION_COLUMNS)}), found "
                                 f"{df.shape[1]}")
    if has_header and list(df.columns) != POSITION_COLUMNS:
        raise fail(sample, path, f"unexpected header {list(df.columns)}; expected {POSITION_COLUMNS}")
    df.columns = POSITION_COLUMNS
    for col in POSITION_COLUMNS[1:]:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() & df[col].notna()
        if bad.any():
            raise fail(sample, path, f"column {col!r} has {int(bad.sum())} non-numeric values "
                                     f"(e.g. barcode {examples(df.loc[bad, 'barcode'], 1)}: "
                                     f"{df.loc[bad, col].iloc[0]!r})")
        df[col] = vals
    not01 = ~df["in_tissue"].isin([0, 1])
    if not01.any():
        raise fail(sample, path, f"column 'in_tissue' must be 0 or 1 but {int(not01.sum())} rows are not "
                                 f"(e.g. barcode {examples(df.loc[not01, 'barcode'], 1)}: "
                                 f"{df.loc[not01, 'in_tissue'].iloc[0]!r})")
    if df["barcode"].isna().any():
        raise fail(sample, path, f"{int(df['barcode'].isna().sum())} rows without a barcode")
    df["barcode"] = df["barcode"].astype(str)
    df = df.set_index("barcode", drop=False)
    df.index.name = None
    return df


def read_scalefactors(spatial: Path, sample: str) -> tuple[dict, Path]:
    """``scalefactors_json.json`` as a dict (required)."""
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        raise fail(sample, path, "scale factors file not found (Space Ranger writes "
                                 "spatial/scalefactors_json.json)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            sf = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(sample, path, f"malformed scale factors JSON: {exc}") from exc
    if not isinstance(sf, dict):
        raise fail(sample, path, "scale factors JSON is not an object")
    for k, v in sf.items():
        if k.endswith("_scalef") or k.endswith("_fullres"):
            if not is_positive_number(v):
                raise fail(sample, path, f"scale factor {k!r} is {v!r}, expected a positive number")
    return sf, path


def is_positive_number(v) -> bool:
    """Whether a JSON value is a finite positive number (not a bool, a string or a list)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0


#: pixels an image file may declare per byte it holds (deflate expands at most ~1032x, and a 1-bit
#: PNG packs 8 pixels a byte), beyond a floor any image may have
_PIXELS_PER_BYTE, _PIXELS_FLOOR = 9000, 10_000_000


def check_image_header(path: Path, sample: str | None) -> None:
    """Refuse, before decoding, an image whose header declares more pixels than its file can hold."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:  # PIL raises many types (and DecompressionBombError for huge headers)
        raise fail(sample, path, f"image cannot be read: {exc}") from exc
    size = Path(path).stat().st_size
    if w <= 0 or h <= 0 or w * h > max(_PIXELS_FLOOR, _PIXELS_PER_BYTE * size):
        raise fail(sample, path, f"image header declares {w} x {h} pixels, impossible for a file of "
                                 f"{size} bytes (corrupt header?); refused before decoding")


def read_image(path: Path, sample: str | None = None) -> np.ndarray:
    """A PNG/JPEG/TIFF image as a uint8 (h, w, 3) array (alpha dropped, gray expanded)."""
    import matplotlib.image as mpimg

    check_image_header(path, sample)
    try:
        img = mpimg.imread(path)
    except Exception as exc:  # PIL and matplotlib raise many types
        raise fail(sample, path, f"image cannot be read: {exc}") from exc
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise fail(sample, path, f"unexpected image shape {img.shape}")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if np.issubdtype(img.dtype, np.floating):
        return np.ascontiguousarray(np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))
    if img.dtype == np.uint16:
        return np.ascontiguousarray((img // 257).astype(np.uint8))
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


def check_positions(xy: np.ndarray, barcodes, images: dict, scalefactors: dict, sample: str,
                    file: Path, all_xy: np.ndarray | None = None) -> None:
    """Check that full-resolution pixel positions agree with the images and the spot size.

    Raises a ReaderError when spots scaled by ``tissue_<res>_scalef`` fall outside the image, or
    when the spot spacing (median nearest-neighbour distance over ``all_xy``, the whole array of the
    positions file, else over ``xy``) does not match ``spot_diameter_fullres`` (array coordinates,
    microns or a wrong column taken for pixels).
    """
    if xy.shape[0] == 0:
        return
    hint = ("usual causes: array (row, col) coordinates used as pixels, pxl_row/pxl_col swapped, "
            "or the scale factors of another image")
    diam = scalefactors.get("spot_diameter_fullres")
    for res, img in images.items():
        sf = scalefactors.get(f"tissue_{res}_scalef")
        if sf is None:
            raise fail(sample, file.parent / "scalefactors_json.json",
                       f"the {res} image exists but 'tissue_{res}_scalef' is missing")
        h, w = img.shape[:2]
        margin = max(2.0, (diam or 0.0) * sf)  # one spot diameter in image pixels
        s = xy * sf
        out = (s[:, 0] < -margin) | (s[:, 0] > w + margin) | (s[:, 1] < -margin) | (s[:, 1] > h + margin)
        if out.any():
            swapped = s[:, ::-1]
            fits_swapped = not ((swapped[:, 0] < -margin) | (swapped[:, 0] > w + margin)
                                | (swapped[:, 1] < -margin) | (swapped[:, 1] > h + margin)).any()
            extra = " (they would fit with x and y swapped)" if fits_swapped else ""
            raise fail(sample, file, f"{int(out.sum())} of {len(s)} spots fall outside the {res} image "
                                     f"({w} x {h} px) once scaled by tissue_{res}_scalef={sf}{extra}, "
                                     f"e.g. barcode {examples(np.asarray(barcodes)[out], 1)} at "
                                     f"full-resolution (x, y) = {tuple(np.round(xy[out][0], 1))}; "
                                     f"{hint}")
    grid = xy if all_xy is None else all_xy[np.isfinite(all_xy).all(axis=1)]
    if diam and grid.shape[0] >= 10:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(grid).query(grid, k=2)
        nn = float(np.median(d[:, 1]))
        # Visium: centre-to-centre distance ~1.4-1.9 spot diameters; accept a wide band
        if not (0.5 * diam <= nn <= 10 * diam):
            raise fail(sample, file, f"median distance between neighbouring spots is {nn:.3g} "
                                     f"full-resolution pixels but spot_diameter_fullres is {diam:.3g}; "
                                     f"{hint}")


def match_positions(adata, positions: pd.DataFrame, ppath: Path, sample: str, *, what: str,
                    in_tissue_only: bool, log_dropped: bool = True):
    """The positions rows of the matrix's barcodes (all must be there, once), in-tissue ones only if asked.

    Returns ``(adata, positions)`` restricted alike.
    """
    if not positions.index.is_unique:
        dup = positions.index[positions.index.duplicated()].unique()
        raise fail(sample, ppath, f"{len(dup)} duplicated barcodes (e.g. {examples(dup)})")
    check_subset(adata.obs_names, positions.index, f"matrix {'barcodes' if what == 'spots' else what}",
                 "the tissue positions file", sample, ppath)
    pos = positions.loc[adata.obs_names]
    if in_tissue_only:
        keep = (pos["in_tissue"] == 1).to_numpy()
        if not keep.all():
            if log_dropped:
                logger.info("sample %r: %d %s of the matrix are not in tissue; dropped", sample,
                            int((~keep).sum()), what)
            adata = adata[keep].copy()
            pos = pos.loc[keep]
    return adata, pos


def read_matrix(path: Path, *, sample: str, gex_only: bool = True):
    """A 10x matrix: an MTX folder or a Cell Ranger HDF5 file."""
    if path.is_dir():
        return read_10x_mtx(path, sample=sample, gex_only=gex_only)
    return read_10x_h5(path, sample=sample, gex_only=gex_only)


def read_tissue_images(spatial: Path, sample: str, *, load: bool = True) -> tuple[dict, dict]:
    """The hires/lowres tissue images of a Space Ranger ``spatial/`` folder, whichever exist.

    Returns ``({name: uint8 array}, {name: path})``; arrays only when ``load``.
    """
    images: dict[str, np.ndarray] = {}
    image_paths: dict[str, str] = {}
    for res in ("hires", "lowres"):
        ipath = spatial / f"tissue_{res}_image.png"
        if ipath.is_file():
            image_paths[res] = str(ipath)
            if load:
                images[res] = read_image(ipath, sample)
    if not image_paths:
        logger.info("sample %r: no tissue_hires_image.png or tissue_lowres_image.png in %s",
                    sample, spatial)
    return images, image_paths


def read_visium(folder, *, sample: str, matrix=None, in_tissue_only: bool = True,
                gex_only: bool = True, load_images: bool = True, check: bool = True):
    """Read a 10x Visium Space Ranger output folder.

    Parameters
    ----------
    folder
        The Space Ranger ``outs/`` folder (or its parent holding ``outs/``): a count matrix
        (``filtered_feature_bc_matrix.h5``, ``raw_feature_bc_matrix.h5``, any single ``*.h5``
        such as the DLPFC ``filtered_feature_bc_matrix_top5000genes.h5``, or a
        ``filtered_feature_bc_matrix/`` MatrixMarket folder) and ``spatial/`` with
        ``tissue_positions_list.csv`` (no header) or ``tissue_positions.csv`` (header),
        ``scalefactors_json.json`` and whichever of ``tissue_hires_image.png`` /
        ``tissue_lowres_image.png`` exist.
    sample
        Sample name: the key of ``uns['spatial']`` and the name used in error messages.
    matrix
        The count matrix file (name inside ``folder`` or path) when the folder holds several.
    in_tissue_only
        Keep only spots with ``in_tissue == 1`` (default).
    gex_only
        Keep only the "Gene Expression" features (default).
    load_images
        Read the hires/lowres images into ``uns['spatial'][sample]['images']``.
    check
        Check that positions agree with the images and the spot size (see below).

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR spots x genes), ``obs['barcode']``, ``obs['in_tissue']``,
        ``obsm['spatial']`` full-resolution pixel (x, y) = (pxl_col_in_fullres, pxl_row_in_fullres)
        float64, ``obsm['spatial.array']`` = (array_row, array_col) int64,
        ``uns['spatial'][sample] = {'images', 'scalefactors', 'metadata'}`` (the scverse layout),
        ``uns['spatial.unit'] = 'pixel'``.

    Raises
    ------
    ReaderError
        Missing folder/matrix/positions/scale factors, corrupt HDF5, matrix barcodes absent from the
        positions file, NaN coordinates, duplicated barcodes, spots outside the image once scaled
        (pixel/array confusion), an unreadable image.
    """
    folder = require_dir(folder, sample, "Visium folder")
    if not (folder / "spatial").is_dir() and (folder / "outs" / "spatial").is_dir():
        folder = folder / "outs"
    spatial = folder / "spatial"
    if not spatial.is_dir():
        raise fail(sample, spatial, "Visium 'spatial/' folder not found (tissue positions, scale "
                                    "factors and images live there)")
    mpath = _find_matrix(folder, sample, matrix)
    adata = read_matrix(mpath, sample=sample, gex_only=gex_only)
    positions, ppath = read_positions(spatial, sample)
    adata, pos = match_positions(adata, positions, ppath, sample, what="spots", in_tissue_only=in_tissue_only,
                                 log_dropped="filtered" in mpath.name)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    check_finite(xy, pos.index, "spots", sample, ppath)
    arr = pos[["array_row", "array_col"]].to_numpy(dtype=np.float64)
    check_finite(arr, pos.index, "spots (array_row/array_col)", sample, ppath)
    scalefactors, _ = read_scalefactors(spatial, sample)
    images, image_paths = read_tissue_images(spatial, sample, load=load_images or check)
    if check:
        all_xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
        check_positions(xy, pos.index, images, scalefactors, sample, ppath, all_xy=all_xy)
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy(dtype=np.int64)
    adata.obsm["spatial"] = xy
    adata.obsm["spatial.array"] = arr.astype(np.int64)
    source = image_paths.get("hires") or image_paths.get("lowres") or ""
    metadata = {"source_image_path": source, "technology": "visium"}
    for k, v in adata.uns.pop("10x", {}).items():
        metadata[k] = v
    adata.uns["spatial"] = {sample: {"images": images if load_images else {},
                                     "scalefactors": dict(scalefactors),
                                     "metadata": metadata}}
    adata.uns["spatial.unit"] = "pixel"
    return adata
