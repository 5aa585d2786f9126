"""Vizgen MERSCOPE cell-level output: ``cell_by_gene.csv`` + ``cell_metadata.csv`` (microns)."""
from __future__ import annotations

from pathlib import Path


from ._cellcsv import (cell_anndata, header_fields, locate_pair, numeric_columns, read_cell_table,
                       read_wide_counts, split_controls)
from ._checks import check_finite, check_subset, check_unique, fail

__all__ = ["read_merscope"]

#: column names MERSCOPE / VPT give the cell id (the first column; older exports leave it unnamed)
_ID_NAMES = ("cell", "EntityID", "cell_id", "")
MATRIX_SUFFIX = "cell_by_gene.csv"
METADATA_SUFFIX = "cell_metadata.csv"


def _id_column(header: list[str], sample, path, what: str) -> str:
    if header[0] in _ID_NAMES or header[0].startswith("Unnamed"):
        return header[0]
    raise fail(sample, path, f"the first column of the {what} is {header[0]!r}; expected the cell "
                             f"id column ({', '.join(repr(n) for n in _ID_NAMES[:-1])} or unnamed)")


def read_merscope(folder_or_csv, *, sample: str | None = None, cell_metadata=None,
                  control_prefixes: tuple[str, ...] = ("Blank-",), keep_controls: bool = True):
    """Read a Vizgen MERSCOPE cell-level output (cells x genes counts, cell centres in microns).

    Parameters
    ----------
    folder_or_csv
        The MERSCOPE region folder holding ``cell_by_gene.csv`` and ``cell_metadata.csv`` (a prefix
        such as ``region_0_cell_by_gene.csv`` and ``.gz`` compression are accepted), or the
        ``cell_by_gene.csv`` file itself (the metadata is then looked for beside it).
    sample
        Sample name used in messages and as the ``uns['spatial']`` key.
    cell_metadata
        Path of the cell metadata table when it is not beside the matrix.
    control_prefixes
        Column-name prefixes of the control (blank barcode) columns, set apart from ``X``.
    keep_controls
        Keep the control counts in ``obsm['controls']`` (a cells x controls DataFrame); ``False``
        drops them (logged). ``obs['control_counts']`` holds their total either way.

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR cells x genes; ``var_names`` = gene symbols, also in
        ``var['gene_ids']``/``var['gene_symbols']``), ``obs_names`` = ``obs['barcode']`` = the cell id
        as text (the ids overflow 64-bit integers), the metadata columns in ``obs`` (``fov``,
        ``volume``, ``min_x`` ... as present), ``obsm['spatial']`` = (center_x, center_y) in
        microns (float64), ``uns['spatial.unit'] = 'um'``,
        ``uns['spatial'][sample]['metadata']['technology'] = 'merscope'``.

    Raises
    ------
    ReaderError
        Missing matrix or metadata, malformed CSV (non-numeric or missing counts), duplicated cell
        ids, matrix cells absent from the metadata, missing or NaN centre coordinates.
    """
    path = Path(folder_or_csv)
    if not path.exists():
        raise fail(sample, path, "MERSCOPE input not found")
    mpath, cpath = locate_pair(path, sample, matrix_suffix=MATRIX_SUFFIX, metadata_suffix=METADATA_SUFFIX,
                               metadata=cell_metadata, matrix_label="MERSCOPE cell_by_gene.csv",
                               metadata_label="MERSCOPE cell metadata", matrix_glob=MATRIX_SUFFIX,
                               metadata_glob=METADATA_SUFFIX,
                               metadata_hint="the cell centres live in cell_metadata.csv")
    header = header_fields(mpath, sample)
    id_col = _id_column(header, sample, mpath, "cell_by_gene table")
    names = ["cell"] + header[1:]
    ids, genes, X = read_wide_counts(mpath, sample, ["cell"], "cell_by_gene table", names=names)
    cells = ids["cell"].to_numpy(dtype=object)
    check_unique(cells, "cell ids", sample, mpath)
    X, genes, controls, ctrl_total = split_controls(X, genes, control_prefixes, keep_controls,
                                                    sample, "MERSCOPE")
    if not genes:
        raise fail(sample, mpath, "no gene columns left once the control columns "
                                  f"({', '.join(control_prefixes)}*) are set apart")
    mheader = header_fields(cpath, sample)
    mid = _id_column(mheader, sample, cpath, "cell metadata")
    meta = read_cell_table(cpath, sample, "cell metadata", {mid or "Unnamed: 0": str})
    mid = meta.columns[0]
    meta[mid] = meta[mid].astype(str).str.strip()
    check_unique(meta[mid].to_numpy(), "cell ids", sample, cpath)
    meta = meta.set_index(mid, drop=True)
    meta.index.name = None
    check_subset(cells, meta.index, "matrix cells", "the cell metadata", sample, cpath)
    meta = meta.loc[cells]
    xy = numeric_columns(meta, ["center_x", "center_y"], sample, cpath, "cell metadata")
    check_finite(xy, cells, "cells", sample, cpath)
    obs = meta.drop(columns=["center_x", "center_y"])
    obs["control_counts"] = ctrl_total
    adata = cell_anndata(X, cells, genes, obs, xy, controls, sample=sample, mpath=mpath, unit="um",
                         technology="merscope", metadata={"id_column": id_col})
    return adata
