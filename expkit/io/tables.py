"""Plain count tables (TSV/CSV/space-separated, optionally gzipped, or MatrixMarket) with a
coordinate table: Spatial Transcriptomics, Giotto exports, published supplementary tables."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import logger
from ..errors import ReaderError
from ._build import build_var, make_anndata
from ._checks import (check_finite, check_subset, check_unique, examples, fail, first_line, open_text,
                      require_file)
from .tenx import read_mtx_file

__all__ = ["read_table"]

_X_ALIASES = ("x", "sdimx", "x_centroid", "pxl_col_in_fullres", "imagecol", "X", "coord_x", "xcoord")
_Y_ALIASES = ("y", "sdimy", "y_centroid", "pxl_row_in_fullres", "imagerow", "Y", "coord_y", "ycoord")
_ORIENTATIONS = {"auto": "auto", "genes x spots": "genes", "spots x genes": "spots",
                 "genes x cells": "genes", "cells x genes": "spots", "genes": "genes",
                 "spots": "spots", "cells": "spots", "obs": "spots", "var": "genes"}
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_BARCODE = re.compile(r"[ACGTN]{8,}|^\d+(\.\d+)?x\d+(\.\d+)?$|^\d+$|^(spot|cell|bin)[_\-.]?\d+$",
                      re.IGNORECASE)
_CHUNK_ROWS = 2000


def _sniff_sep(path: Path, sample) -> str:
    line = first_line(path, sample)
    if "\t" in line:
        return "\t"
    if "," in line:
        return ","
    return r"\s+"


def _is_number(text: str) -> bool:
    try:
        float(text.strip().strip('"'))
    except ValueError:
        return False
    return True


def _norm_orientation(orientation: str, sample) -> str:
    key = str(orientation).strip().lower().replace("_", " ").replace("-", " ")
    key = re.sub(r"\s+", " ", key).replace(" by ", " x ")
    if key not in _ORIENTATIONS:
        raise fail(sample, None, f"orientation={orientation!r} is not one of 'auto', "
                                 f"'genes x spots', 'spots x genes'")
    return _ORIENTATIONS[key]


def _read_frame(path: Path, sep, sample, what: str, header="infer", chunksize=None, convert=None):
    """pandas.read_csv (C engine) on a possibly gzipped file, errors as ReaderError.

    The row labels are the first column, or the implicit index of R's write.table layout (a header
    with one name fewer than the data rows).
    """
    sep = sep or _sniff_sep(path, sample)
    head = first_line(path, sample)
    # R write.table layout: header has one field fewer than the rows -> pandas builds the index.
    with open_text(path, sample) as fh:
        fh.readline()
        second = fh.readline().rstrip("\r\n")
    if sep == r"\s+":
        n_head, n_row = len(head.split()), len(second.split())
    else:
        n_head, n_row = len(head.split(sep)), len(second.split(sep))
    fields = head.split() if sep == r"\s+" else head.split(sep)
    if header is not None and fields and all(_is_number(f) for f in fields):
        header = None  # no header line: the first line is data
    index_col = None if (header is not None and second and n_head == n_row - 1) else 0
    if header is None and n_row and all(_is_number(f) for f in fields):
        index_col = None  # headerless and all-numeric: no identifier column at all
    try:
        with open_text(path, sample) as fh:
            kw = dict(sep=sep, index_col=index_col, engine="c", header=0 if header is not None else None,
                      low_memory=False)
            if chunksize is None:
                return pd.read_csv(fh, **kw), sep
            frames = []
            for chunk in pd.read_csv(fh, chunksize=chunksize, **kw):
                frames.append(convert(chunk) if convert is not None else chunk)
            return frames, sep
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, f"{what} is empty") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed {what}: {exc}") from exc


def _numeric_block(chunk: pd.DataFrame, positions: np.ndarray, sample, path) -> sp.csr_matrix:
    block = chunk.iloc[:, positions]
    try:
        values = block.to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        values = None
    if values is None or (block.dtypes == object).any():
        j = next(i for i, d in enumerate(block.dtypes) if not pd.api.types.is_numeric_dtype(d))
        col = block.iloc[:, j]
        bad = pd.to_numeric(col, errors="coerce").isna() & col.notna()
        row = block.index[bad.to_numpy()][0] if bad.any() else block.index[0]
        shown = col[bad].iloc[0] if bad.any() else col.iloc[0]
        raise fail(sample, path, f"non-numeric count in column {block.columns[j]!r}, row {row!r}: "
                                 f"{shown!r}")
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise fail(sample, path, f"{int(bad.sum())} missing (NaN) or infinite counts, e.g. row "
                                 f"{block.index[r]!r}, column {block.columns[c]!r}")
    return sp.csr_matrix(values)


def _read_counts_table(path: Path, sep, sample, coord_names: set[str], obs_columns):
    """Row labels, column labels, the numeric part as CSR (rows x cols) and the extra columns
    (non-numeric ones, coordinate-named ones and ``obs_columns``) as a DataFrame."""
    state: dict = {}

    def convert(chunk: pd.DataFrame):
        if "extra" not in state:
            is_num = np.fromiter((pd.api.types.is_numeric_dtype(d) for d in chunk.dtypes), bool,
                                 count=chunk.shape[1])
            names = [str(c) for c in chunk.columns]
            special = np.fromiter((n in coord_names or n in obs_columns for n in names), bool,
                                  count=len(names))
            for j in np.flatnonzero(~is_num & ~special):
                col = chunk.iloc[:, j]
                num = pd.to_numeric(col, errors="coerce")
                if num.notna().mean() > 0.5:  # a count column with a few bad entries
                    bad = (num.isna() & col.notna()) | col.isna()
                    raise fail(sample, path, f"malformed count table: column {names[j]!r} has "
                                             f"{int(bad.sum())} non-numeric or missing values, e.g. "
                                             f"row {chunk.index[bad.to_numpy()][0]!r}: "
                                             f"{col[bad].iloc[0]!r}")
            state["extra"] = np.flatnonzero(special | ~is_num)
            state["numeric"] = np.flatnonzero(~(special | ~is_num))
            state["names"] = names
        return (chunk.index.astype(str).to_numpy(dtype=object),
                _numeric_block(chunk, state["numeric"], sample, path),
                chunk.iloc[:, state["extra"]])

    parts, sep = _read_frame(path, sep, sample, "count table", chunksize=_CHUNK_ROWS, convert=convert)
    if not parts:
        raise fail(sample, path, "count table has no data rows")
    rows = np.concatenate([p[0] for p in parts])
    X = sp.vstack([p[1] for p in parts], format="csr")
    extra = pd.concat([p[2] for p in parts])
    extra.index = rows
    cols = np.asarray(state["names"], dtype=object)[state["numeric"]]
    return rows, cols, X, extra


def _read_side_table(path: Path, sep, sample, what: str, index: str | None) -> pd.DataFrame:
    """A coordinate/metadata table indexed by its identifier column.

    The identifier is ``index`` if given, else the implicit R row names / first column, else the first
    unique text column. A table without any identifier column is an error: matching rows by order
    is unsafe (Giotto's headerless ``*_locs.txt`` files are not in the order of the count table).
    """
    df, _ = _read_frame(path, sep, sample, what)
    if index is not None:
        if index in df.columns:
            df = df.set_index(index, drop=True)
        elif df.index.name != index:
            raise fail(sample, path, f"identifier column {index!r} not found; columns are "
                                     f"{[df.index.name, *df.columns]}")
    elif isinstance(df.index, pd.RangeIndex) or (
            pd.api.types.is_numeric_dtype(df.index) and not pd.api.types.is_object_dtype(df.index)):
        # index_col=0 took a numeric column (or there is none): look for a text identifier column
        if not isinstance(df.index, pd.RangeIndex):
            df = df.reset_index()
        if all(isinstance(c, int) for c in df.columns) and df.shape[1] == 2:
            df.columns = ["x", "y"]  # a headerless two-column coordinate file
        text = [c for c in df.columns if pd.api.types.is_object_dtype(df[c]) and df[c].is_unique]
        if text:
            df = df.set_index(text[0], drop=True)
        else:
            raise fail(sample, path, f"the {what} has no identifier column (spot/cell names) to match "
                                     f"the count table with; columns: {list(df.columns)}")
    df.index = df.index.astype(str)
    df.index.name = None
    check_unique(df.index, f"identifiers in the {what}", sample, path)
    return df


def _label_file(path: Path, sample, what: str) -> pd.DataFrame:
    """A headerless tab-separated names file (genes / barcodes) as text columns."""
    try:
        with open_text(path, sample) as fh:
            df = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False, engine="c")
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, f"{what} is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise fail(sample, path, f"malformed {what}: {exc}") from exc
    return df


def _read_mtx_table(cpath: Path, genes, barcodes, coord_df, how: str, orientation: str, sample):
    """(X spots x genes CSR, spot labels, gene labels, gene symbols or None) of a MatrixMarket count
    table; the header is checked against the names before any entry is read."""
    if genes is None:
        raise fail(sample, cpath, "a MatrixMarket count table needs genes=<file of feature names>")
    gdf = _label_file(require_file(genes, sample, "genes file"), sample, "genes file")
    gene_labels = gdf.iloc[:, 0].to_numpy(dtype=object)
    symbols = gdf.iloc[:, 1].to_numpy(dtype=object) if gdf.shape[1] > 1 else None
    if barcodes is not None:
        bdf = _label_file(require_file(barcodes, sample, "barcodes file"), sample, "barcodes file")
        spot_labels = bdf.iloc[:, 0].to_numpy(dtype=object)
    elif coord_df is not None:
        spot_labels = coord_df.index.to_numpy(dtype=object)
    else:
        raise fail(sample, cpath, "a MatrixMarket count table needs barcodes=<file> or a coords "
                                  "table with spot identifiers")
    shape = (len(gene_labels), len(spot_labels))
    M = read_mtx_file(cpath, sample, shape, f"{shape[0]} genes x {shape[1]} spots").tocsr()
    if how in ("auto", "genes") and M.shape == shape:
        X = M.T.tocsr()
    elif how in ("auto", "spots") and M.shape == shape[::-1]:
        X = M
    else:
        raise fail(sample, cpath, f"matrix shape {M.shape} does not match {shape[0]} genes "
                                  f"x {shape[1]} spots (orientation={orientation!r})")
    return X, spot_labels, gene_labels, symbols


def _looks_like_spots(labels) -> float:
    labels = [str(v) for v in labels[:500]]
    if not labels:
        return 0.0
    return float(np.mean([bool(_BARCODE.search(v)) and not _ENSEMBL.match(v) for v in labels]))


def read_table(counts, *, coords=None, metadata=None, orientation: str = "auto", sep: str | None = None,
               x: str = "x", y: str = "y", index: str | None = None, genes=None, barcodes=None,
               array: tuple[str, str] = ("array_row", "array_col"), obs_columns=(),
               unit: str = "unknown", sample: str | None = None):
    """Read a plain count table with spot/cell coordinates.

    Parameters
    ----------
    counts
        A delimited text table (``.tsv``, ``.csv``, ``.txt``, optionally gzipped; tab, comma or
        whitespace separated, quoted names allowed, R ``write.table`` headers allowed) in either
        orientation, or a MatrixMarket file (``.mtx``/``.mtx.gz``) whose row/column names come
        from ``genes`` and ``barcodes`` (or the ``coords`` table's identifiers in file order).
        In a spots x genes table, columns named as the coordinates (``x``, ``y``) and non-numeric
        columns are taken out of the counts (they become coordinates / ``obs`` columns).
    coords
        Table of coordinates, one row per spot/cell, identified by ``index``, the R row names or
        the first unique text column. Other columns become ``obs`` columns. Without it the
        coordinates must be columns of the count table (or the result has none).
    metadata
        Optional extra per-spot table (or a list of them), joined into ``obs`` by identifier
        (e.g. Giotto's ``cell_metadata.txt`` with ``list_ID``).
    orientation
        ``"auto"`` (default): the axis whose names match the coordinate table's identifiers, else the
        axis whose names look like barcodes; or ``"genes x spots"`` / ``"spots x genes"``.
    sep
        Field separator of the count table; default sniffed from its first line (tab, comma, else
        whitespace). The coordinate/metadata tables are always sniffed.
    x, y
        Coordinate column names. With the defaults, common aliases are tried too (``sdimx``/``sdimy``,
        ``x_centroid``/``y_centroid``, ``pxl_col_in_fullres``/``pxl_row_in_fullres``, ``imagecol``/
        ``imagerow``).
    index
        Identifier column of ``coords``/``metadata`` when it is not the first text column.
    genes, barcodes
        For a MatrixMarket ``counts``: the feature names file (first column id, optional second
        column symbol) and the observation names file (one column).
    array
        Column names of array (row, col) coordinates, stored in ``obsm['spatial.array']`` when present.
    obs_columns
        Extra column names of a spots x genes count table that are annotations, not genes.
    unit
        Stored in ``uns['spatial.unit']`` (e.g. ``"pixel"``, ``"um"``, ``"array"``).
    sample
        Sample name used in messages.

    Returns
    -------
    AnnData
        ``X`` float32 CSR spots x genes, ``obs['barcode']`` + annotation columns, ``obsm['spatial']``
        (x, y) float64 when coordinates were found, ``obsm['spatial.array']`` when array columns exist,
        ``var['gene_ids']`` (and ``var['gene_symbols']`` for symbol names).

    Raises
    ------
    ReaderError
        Missing or malformed files, non-numeric/NaN counts, duplicated barcodes, spots absent from
        the coordinate table, NaN/inf coordinates, undecidable orientation.
    """
    cpath = require_file(counts, sample, "count table")
    how = _norm_orientation(orientation, sample)
    coord_df = meta_dfs = None
    ctab_path = None
    if coords is not None:
        ctab_path = require_file(coords, sample, "coordinate table")
        coord_df = _read_side_table(ctab_path, sep if sep and Path(coords) == cpath else None, sample,
                                    "coordinate table", index)
    if metadata is not None:
        mlist = metadata if isinstance(metadata, (list, tuple)) else [metadata]
        meta_dfs = [(require_file(m, sample, "metadata table"), None) for m in mlist]
        meta_dfs = [(p, _read_side_table(p, None, sample, "metadata table", index)) for p, _ in meta_dfs]
    x_names = {x, *(_X_ALIASES if x == "x" else ())}
    y_names = {y, *(_Y_ALIASES if y == "y" else ())}

    name = cpath.name[:-3] if cpath.name.endswith(".gz") else cpath.name
    gene_labels_symbols = None
    if name.endswith(".mtx"):
        X, spot_labels, gene_labels, gene_labels_symbols = _read_mtx_table(
            cpath, genes, barcodes, coord_df, how, orientation, sample)
        extra = pd.DataFrame(index=pd.Index(spot_labels))
        gene_extra = None
    else:
        coord_cols = x_names | y_names | set(array)
        rows, cols, T, extra_rows = _read_counts_table(cpath, sep, sample, coord_cols, set(obs_columns))
        # decide the orientation
        if how == "auto":
            if coord_df is not None:
                in_rows = int(pd.Index(rows).isin(coord_df.index).sum())
                in_cols = int(pd.Index(cols).isin(coord_df.index).sum())
                if in_rows == 0 and in_cols == 0:
                    raise fail(sample, ctab_path, f"no identifier of the coordinate table (e.g. "
                                                  f"{examples(coord_df.index)}) names a row (e.g. "
                                                  f"{examples(rows)}) or a column (e.g. {examples(cols)}) "
                                                  f"of the count table '{cpath}'")
                how = "spots" if in_rows >= in_cols else "genes"
            elif any(str(c) in x_names for c in extra_rows.columns) and \
                    any(str(c) in y_names for c in extra_rows.columns):
                how = "spots"
            else:
                r, c = _looks_like_spots(rows), _looks_like_spots(cols)
                if max(r, c) < 0.5 or abs(r - c) < 0.25:
                    raise fail(sample, cpath, "cannot tell whether rows or columns are spots (names "
                                              f"e.g. {examples(rows)} / {examples(cols)}): pass "
                                              "orientation='genes x spots' or 'spots x genes', or coords")
                how = "spots" if r > c else "genes"
            logger.debug("%s: count table read as %s", cpath, "spots x genes" if how == "spots"
                         else "genes x spots")
        if how == "spots":
            X, spot_labels, gene_labels = T, rows, cols
            extra = extra_rows
            gene_extra = None
        else:
            X, spot_labels, gene_labels = T.T.tocsr(), cols, rows
            extra = pd.DataFrame(index=pd.Index(cols))
            gene_extra = extra_rows
            gene_extra = gene_extra[[c for c in gene_extra.columns
                                     if not pd.api.types.is_numeric_dtype(gene_extra[c])]]
    spot_labels = np.asarray(spot_labels, dtype=object).astype(str)
    check_unique(spot_labels, "spot/cell identifiers", sample, cpath)

    # obs: annotations of the count table, the coordinate table, metadata tables
    obs = pd.DataFrame(index=pd.Index(spot_labels))
    coord_source: pd.DataFrame | None = None
    coord_file = cpath
    if coord_df is not None:
        check_subset(spot_labels, coord_df.index, "spots of the count table",
                     f"the coordinate table '{ctab_path}'", sample, ctab_path)
        coord_source = coord_df.loc[spot_labels]
        coord_file = ctab_path
        dropped = [c for c in extra.columns if str(c) in x_names | y_names]
        extra = extra.drop(columns=dropped)
    elif len(extra.columns):
        coord_source = extra
    frames = [extra] if len(extra.columns) else []
    if coord_source is not None and coord_source is not extra:
        frames.append(coord_source)
    for mpath, mdf in meta_dfs or []:
        check_subset(spot_labels, mdf.index, "spots of the count table",
                     f"the metadata table '{mpath}'", sample, mpath)
        frames.append(mdf.loc[spot_labels])
    seen: set[str] = set()
    for fr in frames:
        for c in fr.columns:
            if str(c) in seen:
                continue
            seen.add(str(c))
            obs[str(c)] = fr[c].to_numpy()

    xcol = next((c for c in ([x] if x != "x" else [x, *_X_ALIASES]) if c in obs.columns), None)
    ycol = next((c for c in ([y] if y != "y" else [y, *_Y_ALIASES]) if c in obs.columns), None)
    xy = None
    if xcol is not None and ycol is not None:
        xy = np.column_stack([pd.to_numeric(obs[xcol], errors="coerce").to_numpy(np.float64),
                              pd.to_numeric(obs[ycol], errors="coerce").to_numpy(np.float64)])
        check_finite(xy, spot_labels, "spots", sample, coord_file)
        obs = obs.drop(columns=[xcol, ycol])
    elif coord_df is not None:
        raise fail(sample, ctab_path, f"coordinate columns {x!r}/{y!r} not found (columns: "
                                      f"{list(coord_df.columns)}); pass x=..., y=...")
    arr = None
    if all(a in obs.columns for a in array):
        arr_f = np.column_stack([pd.to_numeric(obs[a], errors="coerce").to_numpy(np.float64)
                                 for a in array])
        if np.isfinite(arr_f).all():
            arr = arr_f.astype(np.int64)
            obs = obs.drop(columns=list(array))

    gene_labels = np.asarray(gene_labels, dtype=object).astype(str)
    symbols = gene_labels_symbols
    if symbols is None:
        is_ens = np.fromiter((bool(_ENSEMBL.match(g)) for g in gene_labels[:200]), bool)
        if not (is_ens.size and is_ens.mean() > 0.5):
            symbols = gene_labels
    var = build_var(gene_labels, symbols)
    if gene_extra is not None:
        for c in gene_extra.columns:
            var[str(c)] = gene_extra[c].to_numpy()
    adata = make_anndata(X, spot_labels, var, sample=sample, file=cpath, obs=obs)
    if xy is not None:
        adata.obsm["spatial"] = xy
        adata.uns["spatial.unit"] = unit
    if arr is not None:
        adata.obsm["spatial.array"] = arr
    return adata
