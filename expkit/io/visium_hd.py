"""10x Visium HD: one bin size of a Space Ranger ``binned_outputs/square_<size>um/`` folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger
from ..errors import ReaderError
from ._checks import check_finite, fail, first_line, open_text, require_dir
from .visium import (POSITION_COLUMNS, _clean_positions, _find_matrix, check_positions, is_positive_number,
                     match_positions, read_matrix, read_scalefactors, read_tissue_images)

__all__ = ["read_visium_hd", "is_visium_hd_square", "BIN_SIZES"]

#: the bin sizes (microns) Space Ranger writes for Visium HD
BIN_SIZES = (2, 8, 16)
_SQUARE = re.compile(r"^square_(\d{3})um$")
PARQUET_HINT = "pip install expkit[parquet]"


def is_visium_hd_square(folder: Path) -> bool:
    """Whether ``folder`` looks like one Visium HD bin-size folder (``square_008um``-style name, or a
    ``spatial/scalefactors_json.json`` carrying ``bin_size_um``)."""
    folder = Path(folder)
    if not (folder / "spatial").is_dir():
        return False
    if _SQUARE.match(folder.name):
        return True
    try:
        with open(folder / "spatial" / "scalefactors_json.json", "r", encoding="utf-8") as fh:
            sf = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(sf, dict) and "bin_size_um" in sf


def _parse_bin_size(bin_size, sample, folder: Path) -> int:
    """2, 8, 16, "8", "8um", "008um" or "square_008um" -> 8."""
    text = str(bin_size).strip().lower()
    m = re.fullmatch(r"(?:square_)?0*(\d+)(?:\.0+)?\s*(?:um|µm)?", text)
    if m is None or int(m.group(1)) <= 0:
        raise fail(sample, folder, f"bin_size={bin_size!r} is not a bin size in microns (Visium HD "
                                   f"writes {', '.join(map(str, BIN_SIZES))})")
    return int(m.group(1))


def _squares(folder: Path) -> dict[int, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        m = _SQUARE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _resolve_square(folder: Path, sample, bin_size) -> tuple[Path, int | None]:
    """The ``square_<size>um`` folder to read given the outs/ folder (or its parent), the
    binned_outputs/ folder or a square folder itself, and the requested ``bin_size``."""
    want = _parse_bin_size(bin_size, sample, folder) if bin_size is not None else None
    if (folder / "outs" / "binned_outputs").is_dir():
        folder = folder / "outs"
    if (folder / "binned_outputs").is_dir():
        folder = folder / "binned_outputs"
    squares = _squares(folder)
    if squares:
        if want is None:
            if len(squares) == 1:
                want = next(iter(squares))
            elif 8 in squares:
                want = 8
                logger.info("sample %r: %s holds bins of %s um; reading the 8 um bins (pass "
                            "bin_size=... for another)", sample, folder,
                            ", ".join(str(k) for k in squares))
            else:
                raise fail(sample, folder, f"several bin sizes ({', '.join(f'{k} um' for k in squares)}):"
                                           f" pass bin_size=<one of {sorted(squares)}>")
        if want not in squares:
            raise fail(sample, folder / f"square_{want:03d}um",
                       f"no {want} um bins here (bin sizes present: {sorted(squares)})")
        return squares[want], want
    if not (folder / "spatial").is_dir():
        raise fail(sample, folder, "not a Visium HD output: expected an outs/ folder with "
                                   "binned_outputs/square_<size>um/ folders, binned_outputs/ itself, "
                                   "or one square_<size>um/ folder (matrix + spatial/)")
    m = _SQUARE.match(folder.name)
    have = int(m.group(1)) if m else None
    if want is not None and have is not None and want != have:
        raise fail(sample, folder, f"bin_size={bin_size!r} asked for {want} um bins but this folder "
                                   f"holds the {have} um bins (pass the outs/ or binned_outputs/ "
                                   f"folder to choose)")
    return folder, have if have is not None else want


def _import_pyarrow_parquet():
    import pyarrow.parquet as pq  # noqa: F401  (the optional 'parquet' extra)

    return pq


def read_hd_positions(spatial: Path, sample) -> tuple[pd.DataFrame, Path]:
    """The bin positions of a Visium HD ``spatial/`` folder, indexed by barcode:
    ``tissue_positions.parquet`` (needs pyarrow) or a ``tissue_positions.csv`` beside it."""
    parquet = spatial / "tissue_positions.parquet"
    csv = spatial / "tissue_positions.csv"
    if parquet.is_file():
        try:
            pq = _import_pyarrow_parquet()
        except ImportError as exc:
            if csv.is_file():
                logger.info("sample %r: pyarrow is not installed; reading %s instead of %s",
                            sample, csv.name, parquet.name)
                return _read_csv_positions(csv, sample), csv
            raise fail(sample, parquet, f"reading the Visium HD bin positions needs the optional "
                                        f"parquet engine pyarrow, which is not installed: "
                                        f"{PARQUET_HINT} (or pip install pyarrow)") from exc
        try:
            df = pq.read_table(parquet).to_pandas()
        except Exception as exc:  # pyarrow's own error types
            raise fail(sample, parquet, f"malformed tissue positions parquet file: {exc}") from exc
        return _clean(df, parquet, sample), parquet
    if csv.is_file():
        return _read_csv_positions(csv, sample), csv
    raise fail(sample, parquet, "Visium HD tissue positions not found (looked for "
                                "tissue_positions.parquet and tissue_positions.csv)")


def _clean(df: pd.DataFrame, path: Path, sample) -> pd.DataFrame:
    if set(POSITION_COLUMNS) <= set(df.columns) and list(df.columns) != POSITION_COLUMNS:
        df = df[POSITION_COLUMNS].copy()
    if "barcode" in df.columns:
        df["barcode"] = df["barcode"].map(lambda v: v.decode() if isinstance(v, bytes) else v)
    return _clean_positions(df, path, sample, has_header=True)


def _read_csv_positions(path: Path, sample) -> pd.DataFrame:
    head = first_line(path, sample)
    if head.split(",")[0].strip().strip('"') != "barcode":
        raise fail(sample, path, f"expected a header starting with 'barcode' "
                                 f"({', '.join(POSITION_COLUMNS)}), found {head[:80]!r}")
    try:
        with open_text(path, sample) as fh:
            df = pd.read_csv(fh, header=0, engine="c", dtype={"barcode": str})
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, "tissue positions file is empty") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed tissue positions file: {exc}") from exc
    return _clean(df, path, sample)


def _check_spacing(xy: np.ndarray, barcodes, step_px: float, sample, file: Path) -> None:
    """The median distance between neighbouring bins must be about one bin (pixel/micron/array
    confusions, the scale factors of another bin size)."""
    if xy.shape[0] < 10 or not np.isfinite(step_px) or step_px <= 0:
        return
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    probe = xy[:: max(1, xy.shape[0] // 20000)]  # a strided subset: 2 um outputs hold millions
    d, _ = tree.query(probe, k=2)
    nn = float(np.median(d[:, 1]))
    if not (0.7 * step_px <= nn <= 1.5 * step_px):
        raise fail(sample, file, f"median distance between neighbouring bins is {nn:.4g} "
                                 f"full-resolution pixels but one bin is {step_px:.4g} pixels "
                                 f"(bin_size_um / microns_per_pixel); usual causes: array (row, col) "
                                 f"coordinates used as pixels, positions and scale factors of "
                                 f"different bin sizes")


def read_visium_hd(folder, *, sample: str, bin_size=None, matrix=None, in_tissue_only: bool = True,
                   gex_only: bool = True, load_images: bool = True, check: bool = True):
    """Read one bin size of a 10x Visium HD Space Ranger output.

    Parameters
    ----------
    folder
        The Space Ranger ``outs/`` folder (or its parent), its ``binned_outputs/`` folder, or one
        ``binned_outputs/square_<size>um/`` folder. A bin folder holds the count matrix
        (``filtered_feature_bc_matrix.h5``, or ``matrix=``) and ``spatial/`` with
        ``tissue_positions.parquet`` (read with the optional pyarrow engine, ``pip install
        expkit[parquet]``; a ``tissue_positions.csv`` with the same columns is read instead when
        present), ``scalefactors_json.json`` (with ``microns_per_pixel`` and ``bin_size_um``) and
        whichever of ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` exist.
    sample
        Sample name: the key of ``uns['spatial']`` and the name used in error messages.
    bin_size
        Bin size in microns (2, 8, 16; also ``"8um"`` or ``"square_008um"``) when ``folder`` holds
        several; default: the only one present, else 8 (10x's recommended analysis bin). Given a
        square folder of another size it is an error.
    matrix
        The count matrix file (name inside the bin folder, or path).
    in_tissue_only
        Keep only bins with ``in_tissue == 1`` (default).
    gex_only
        Keep only the "Gene Expression" features (default).
    load_images
        Read the hires/lowres images into ``uns['spatial'][sample]['images']``.
    check
        Check that positions fall inside the images once scaled and that neighbouring bins are one
        bin (``bin_size_um / microns_per_pixel`` pixels) apart.

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR bins x genes), ``obs_names`` = ``obs['barcode']`` = the bin
        barcodes (``s_008um_00012_00034-1``), ``obs['in_tissue']``, ``obsm['spatial']``
        full-resolution pixel (x, y) = (pxl_col_in_fullres, pxl_row_in_fullres) float64,
        ``obsm['spatial.array']`` = (array_row, array_col) int64,
        ``uns['spatial'][sample] = {'images', 'scalefactors', 'metadata'}`` (scverse layout; the
        scale factors keep ``microns_per_pixel`` and ``bin_size_um``; ``metadata['bin_size_um']``),
        ``uns['spatial.unit'] = 'pixel'``.

    Raises
    ------
    ReaderError
        No bin folder / the requested bin size absent, missing matrix/positions/scale factors, the
        parquet engine missing (naming ``expkit[parquet]``), matrix bins absent from the positions,
        NaN coordinates, duplicated barcodes, scale factors of another bin size, bins outside the
        images or not one bin apart, an unreadable image.
    """
    folder = require_dir(folder, sample, "Visium HD folder")
    square, size = _resolve_square(folder, sample, bin_size)
    spatial = square / "spatial"
    if not spatial.is_dir():
        raise fail(sample, spatial, "Visium HD 'spatial/' folder not found (bin positions, scale "
                                    "factors and images live there)")
    mpath = _find_matrix(square, sample, matrix)
    adata = read_matrix(mpath, sample=sample, gex_only=gex_only)
    scalefactors, spath = read_scalefactors(spatial, sample)
    sf_size = scalefactors.get("bin_size_um")
    if sf_size is not None:
        if not is_positive_number(sf_size):
            raise fail(sample, spath, f"'bin_size_um' is {sf_size!r}, expected a positive number")
        if size is not None and abs(float(sf_size) - size) > 1e-6:
            raise fail(sample, spath, f"'bin_size_um' is {sf_size} but the folder "
                                      f"{square.name!r} holds {size} um bins (scale factors of "
                                      f"another bin size?)")
        size = float(sf_size) if size is None else size
    mpp = scalefactors.get("microns_per_pixel")
    if mpp is not None and not is_positive_number(mpp):
        raise fail(sample, spath, f"'microns_per_pixel' is {mpp!r}, expected a positive number")
    if mpp is None:
        logger.warning("sample %r: %s has no 'microns_per_pixel'; pixel positions cannot be "
                       "converted to microns", sample, spath)
    positions, ppath = read_hd_positions(spatial, sample)
    adata, pos = match_positions(adata, positions, ppath, sample, what="bins", in_tissue_only=in_tissue_only)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    check_finite(xy, pos.index, "bins", sample, ppath)
    arr = pos[["array_row", "array_col"]].to_numpy(dtype=np.float64)
    check_finite(arr, pos.index, "bins (array_row/array_col)", sample, ppath)
    images, image_paths = read_tissue_images(spatial, sample, load=load_images or check)
    if check:
        bounds_sf = {k: v for k, v in scalefactors.items() if k != "spot_diameter_fullres"}
        check_positions(xy, pos.index, images, bounds_sf, sample, ppath)
        step = (size / mpp if (size is not None and mpp) else
                float(scalefactors.get("spot_diameter_fullres") or np.nan))
        _check_spacing(xy, pos.index, step, sample, ppath)
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy(dtype=np.int64)
    adata.obsm["spatial"] = xy
    adata.obsm["spatial.array"] = arr.astype(np.int64)
    source = image_paths.get("hires") or image_paths.get("lowres") or ""
    metadata = {"source_image_path": source, "technology": "visium_hd",
                "bin_size_um": float(size) if size is not None else float("nan"),
                "bin_folder": str(square)}
    for k, v in adata.uns.pop("10x", {}).items():
        metadata[k] = v
    adata.uns["spatial"] = {sample: {"images": images if load_images else {},
                                     "scalefactors": dict(scalefactors),
                                     "metadata": metadata}}
    adata.uns["spatial.unit"] = "pixel"
    return adata
