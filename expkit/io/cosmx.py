"""NanoString CosMx SMI flat files: ``*_exprMat_file.csv`` + ``*_metadata_file.csv``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger
from ._cellcsv import (cell_anndata, header_fields, locate_pair, numeric_columns, read_cell_table,
                       read_wide_counts, split_controls)
from ._checks import check_finite, check_subset, check_unique, examples, fail

__all__ = ["read_cosmx", "COSMX_PIXEL_SIZE_UM"]

#: microns per pixel of the CosMx SMI global/local pixel coordinates (the CosMx flat-file ReadMe
#: value; other instruments or exports may differ, so it is only used when passed explicitly)
COSMX_PIXEL_SIZE_UM = 0.12028
MATRIX_SUFFIX = "exprMat_file.csv"
METADATA_SUFFIX = "metadata_file.csv"
_KEYS = ["fov", "cell_ID"]


def _cell_names(fov: pd.Series, cell_id: pd.Series, sample, path, what: str) -> np.ndarray:
    """``"<fov>_<cell_ID>"`` from the two key columns (integers written as text)."""
    out = []
    for col, vals in (("fov", fov), ("cell_ID", cell_id)):
        num = pd.to_numeric(vals, errors="coerce")
        f = num.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(f) | (f != np.round(f)) | (np.abs(f) > 2.0**62)
        if bad.any():
            raise fail(sample, path, f"column {col!r} of the {what} has {int(bad.sum())} values that "
                                     f"are not whole numbers (e.g. {examples(vals[bad], 1)})")
        out.append(num.to_numpy(dtype=np.int64).astype(str))
    return np.char.add(np.char.add(out[0], "_"), out[1]).astype(object)


def read_cosmx(folder_or_csv, *, sample: str | None = None, metadata=None,
               pixel_size_um: float | None = None,
               control_prefixes: tuple[str, ...] = ("NegPrb", "Negative", "SystemControl"),
               keep_controls: bool = True):
    """Read a NanoString CosMx SMI flat-file export (cells x genes counts, cell centres in pixels).

    Parameters
    ----------
    folder_or_csv
        The export folder holding ``<run>_exprMat_file.csv`` and ``<run>_metadata_file.csv``
        (``.gz`` accepted), or the ``*_exprMat_file.csv`` file itself (the metadata is then looked
        for beside it). Both tables are keyed by (``fov``, ``cell_ID``), the first columns of the
        expression matrix (a text cell-id column among the first three is allowed); the matrix
        rows with ``cell_ID == 0`` (each FOV's transcripts outside any cell) are dropped.
    sample
        Sample name used in messages and as the ``uns['spatial']`` key.
    metadata
        Path of the metadata table when it is not beside the matrix.
    pixel_size_um
        Microns per pixel. ``None`` (default) keeps the global pixel coordinates
        (``uns['spatial.unit'] = 'pixel'``); a number (CosMx SMI: :data:`COSMX_PIXEL_SIZE_UM` =
        0.12028) converts them to microns (``'um'``). The value is recorded in
        ``uns['spatial'][sample]['scalefactors']['microns_per_pixel']``.
    control_prefixes
        Column-name prefixes of the negative-probe / system-control columns, set apart from ``X``.
    keep_controls
        Keep the control counts in ``obsm['controls']`` (a cells x controls DataFrame); ``False``
        drops them (logged). ``obs['control_counts']`` holds their total either way.

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR cells x genes; ``var_names`` = gene symbols), ``obs_names`` =
        ``obs['barcode']`` = ``"<fov>_<cell_ID>"``, the metadata columns in ``obs`` (``fov``,
        ``cell_ID``, ``Area``, local coordinates, stain intensities ... as present),
        ``obsm['spatial']`` = (CenterX_global_px, CenterY_global_px) (float64, pixels or microns,
        see ``pixel_size_um``), ``uns['spatial.unit']``,
        ``uns['spatial'][sample]['metadata']['technology'] = 'cosmx'``.

    Raises
    ------
    ReaderError
        Missing matrix or metadata, missing ``fov``/``cell_ID`` columns, malformed counts, duplicated
        cells, matrix cells absent from the metadata, missing or NaN global coordinates, a
        non-positive ``pixel_size_um``.
    """
    path = Path(folder_or_csv)
    if not path.exists():
        raise fail(sample, path, "CosMx input not found")
    mpath, cpath = locate_pair(path, sample, matrix_suffix=MATRIX_SUFFIX, metadata_suffix=METADATA_SUFFIX,
                               metadata=metadata, matrix_label="CosMx expression matrix",
                               metadata_label="CosMx metadata", matrix_glob="*_" + MATRIX_SUFFIX,
                               metadata_glob="*_" + METADATA_SUFFIX,
                               metadata_hint="the cell centres live in *_metadata_file.csv")
    if pixel_size_um is not None:
        try:
            ok = float(pixel_size_um) > 0 and np.isfinite(float(pixel_size_um))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise fail(sample, cpath, f"pixel_size_um={pixel_size_um!r} must be a positive number "
                                      f"(CosMx SMI: {COSMX_PIXEL_SIZE_UM})")
    header = header_fields(mpath, sample)
    # the identifier columns lead: fov and cell_ID (some exports add a text cell id among them)
    lead = [i for i, h in enumerate(header[:3]) if h in _KEYS]
    if len(lead) != 2:
        raise fail(sample, mpath, f"expected the expression matrix to start with columns "
                                  f"{_KEYS}, found {header[:3]}")
    ids, genes, X = read_wide_counts(mpath, sample, header[:max(lead) + 1], "expression matrix",
                                     names=header)
    names = _cell_names(ids["fov"], ids["cell_ID"], sample, mpath, "expression matrix")
    background = (pd.to_numeric(ids["cell_ID"]) == 0).to_numpy()
    if background.any():
        logger.info("sample %r: %d background rows (cell_ID 0) of the expression matrix dropped",
                    sample, int(background.sum()))
        keep = np.flatnonzero(~background)
        X, names, ids = X[keep], names[keep], ids.iloc[keep]
    if X.shape[0] == 0:
        raise fail(sample, mpath, "no cells (only background rows with cell_ID 0)")
    check_unique(names, "cells (fov, cell_ID)", sample, mpath)
    X, genes, controls, ctrl_total = split_controls(X, genes, control_prefixes, keep_controls,
                                                    sample, "CosMx")
    if not genes:
        raise fail(sample, mpath, "no gene columns left once the control columns "
                                  f"({', '.join(control_prefixes)}*) are set apart")
    meta = read_cell_table(cpath, sample, "metadata", {})
    missing = [c for c in _KEYS if c not in meta.columns]
    if missing:
        raise fail(sample, cpath, f"required column(s) {missing} missing from the metadata "
                                  f"(columns: {list(meta.columns)[:15]})")
    meta.index = pd.Index(_cell_names(meta["fov"], meta["cell_ID"], sample, cpath, "metadata"))
    check_unique(meta.index, "cells (fov, cell_ID)", sample, cpath)
    check_subset(names, meta.index, "matrix cells", "the metadata", sample, cpath)
    meta = meta.loc[names]
    xy = numeric_columns(meta, ["CenterX_global_px", "CenterY_global_px"], sample, cpath, "metadata")
    check_finite(xy, names, "cells", sample, cpath)
    scalefactors: dict = {}
    unit = "pixel"
    if pixel_size_um is not None:
        scalefactors["microns_per_pixel"] = float(pixel_size_um)
        xy = xy * float(pixel_size_um)
        unit = "um"
    obs = meta.drop(columns=["CenterX_global_px", "CenterY_global_px"])
    obs["control_counts"] = ctrl_total
    return cell_anndata(X, names, genes, obs, xy, controls, sample=sample, mpath=mpath, unit=unit,
                        technology="cosmx", scalefactors=scalefactors)
