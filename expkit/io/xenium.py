"""10x Xenium cell-level output: ``cell_feature_matrix.h5`` + ``cells.csv.gz`` (or ``cells.parquet``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReaderError
from ._checks import check_finite, check_subset, check_unique, fail, open_text, read_parquet, require_file
from .tenx import read_10x_h5, read_10x_mtx

__all__ = ["read_xenium"]

_CELL_COLUMNS = ("cell_area", "nucleus_area", "transcript_counts", "control_probe_counts",
                 "control_codeword_counts", "unassigned_codeword_counts", "total_counts",
                 "deprecated_codeword_counts", "segmentation_method")


def _find_cells(folder: Path) -> Path | None:
    for name in ("cells.csv.gz", "cells.csv", "cells.parquet"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_cells(path: Path, sample) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            df = read_parquet(path, sample, "cells table", alternative="; cells.csv.gz works without it")
        else:
            with open_text(path, sample) as fh:
                df = pd.read_csv(fh, engine="c", dtype={"cell_id": str})
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, "cells table is empty") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed cells table: {exc}") from exc
    for col in ("cell_id", "x_centroid", "y_centroid"):
        if col not in df.columns:
            raise fail(sample, path, f"required column {col!r} missing (columns: {list(df.columns)})")
    df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    check_unique(df["cell_id"].to_numpy(), "cell ids", sample, path)
    return df.set_index("cell_id", drop=False)


def read_xenium(folder_or_h5, *, sample: str | None = None, cells=None, gex_only: bool = True):
    """Read a 10x Xenium output (cell x gene counts with cell centroids in microns).

    Parameters
    ----------
    folder_or_h5
        The Xenium output folder (holding ``cell_feature_matrix.h5``, or the
        ``cell_feature_matrix/`` MatrixMarket folder, and ``cells.csv.gz``,
        ``cells.csv`` or ``cells.parquet``) or the ``cell_feature_matrix.h5`` file itself (the cells
        table is then looked for beside it).
    sample
        Sample name used in messages and as the ``uns['spatial']`` key.
    cells
        Path of the cells table when it is not beside the matrix.
    gex_only
        Keep only the "Gene Expression" features (default); ``False`` keeps the negative-control
        probes and codewords.

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR cells x genes), ``obs['barcode']`` = cell id, ``obs`` columns
        ``cell_area``, ``nucleus_area``, ``transcript_counts`` (and the other count columns present),
        ``obsm['spatial']`` = (x_centroid, y_centroid) in microns (float64),
        ``uns['spatial.unit'] = 'um'``, ``uns['spatial'][sample]['metadata']['technology'] = 'xenium'``.

    Raises
    ------
    ReaderError
        Missing matrix or cells table, corrupt HDF5, matrix cells absent from the cells table,
        NaN centroids, duplicated cell ids.
    """
    path = Path(folder_or_h5)
    if path.is_dir():
        h5 = path / "cell_feature_matrix.h5"
        if not h5.is_file() and (path / "cell_feature_matrix").is_dir():
            h5 = path / "cell_feature_matrix"  # the MatrixMarket export of the same matrix
        elif not h5.is_file():
            raise fail(sample, h5, "Xenium cell_feature_matrix.h5 (or cell_feature_matrix/) not found")
        folder = path
    else:
        h5 = require_file(path, sample, "Xenium cell_feature_matrix.h5")
        folder = h5.parent
    if cells is not None:
        cpath = require_file(cells, sample, "Xenium cells table")
    else:
        cpath = _find_cells(folder)
        if cpath is None:
            raise fail(sample, folder / "cells.csv.gz", "Xenium cells table not found (looked for "
                                                        "cells.csv.gz, cells.csv, cells.parquet)")
    if h5.is_dir():
        adata = read_10x_mtx(h5, sample=sample, gex_only=gex_only)
    else:
        adata = read_10x_h5(h5, sample=sample, gex_only=gex_only)
    df = _read_cells(cpath, sample)
    check_subset(adata.obs_names, df.index, "matrix cells", "the cells table", sample, cpath)
    df = df.loc[adata.obs_names]
    xy = df[["x_centroid", "y_centroid"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    check_finite(xy, df.index, "cells", sample, cpath)
    for col in _CELL_COLUMNS:
        if col in df.columns:
            adata.obs[col] = df[col].to_numpy()
    adata.obsm["spatial"] = xy
    adata.uns["spatial.unit"] = "um"
    metadata = {"technology": "xenium", "source_image_path": ""}
    metadata.update(adata.uns.pop("10x", {}))
    key = sample if sample is not None else folder.name
    adata.uns["spatial"] = {key: {"images": {}, "scalefactors": {}, "metadata": metadata}}
    return adata
