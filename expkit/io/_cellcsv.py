"""Shared parts of the imaging-platform readers (MERSCOPE, CosMx): a wide cells x genes CSV read in
chunks into a sparse matrix, a cell table, control-probe columns set apart, the file finders.

Nothing here writes to disk; every failure is a ReaderError naming the sample and the file.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import logger
from ..errors import ReaderError
from ._checks import check_unique, examples, fail, first_line, open_text

#: values per chunk of a wide table (rows = this / number of columns): ~80 MB of float32
_CHUNK_VALUES = 20_000_000


def header_fields(path: Path, sample) -> list[str]:
    """The column names of a CSV file (first line, quotes removed)."""
    line = first_line(path, sample)
    if not line.strip():
        raise fail(sample, path, "file is empty (no header line)")
    return [f.strip() for f in next(csv.reader([line]))]


def find_by_suffix(folder: Path, suffixes: Sequence[str], sample, what: str) -> Path | None:
    """The one file of ``folder`` whose name ends with one of ``suffixes`` (+ optional ``.gz``);
    None when there is none, a ReaderError when there are several."""
    hits = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if any(name == s or name.endswith(s) for s in suffixes):
            hits.append(p)
    if len(hits) > 1:
        raise fail(sample, folder, f"several {what} files ({', '.join(p.name for p in hits)}): pass "
                                   f"the one to read explicitly")
    return hits[0] if hits else None


def locate_pair(path: Path, sample, *, matrix_suffix: str, metadata_suffix: str, metadata=None,
                matrix_label: str, metadata_label: str, matrix_glob: str, metadata_glob: str,
                metadata_hint: str) -> tuple[Path, Path]:
    """The (matrix, metadata) CSV pair of a cell-level export, from its folder or its matrix file.

    ``metadata`` overrides the metadata file; otherwise it is found by ``metadata_suffix`` beside the matrix.
    """
    from ._checks import require_file

    if path.is_dir():
        folder = path
        mpath = find_by_suffix(folder, (matrix_suffix,), sample, matrix_suffix)
        if mpath is None:
            raise fail(sample, folder / matrix_glob, f"{matrix_label} not found")
    else:
        mpath = require_file(path, sample, matrix_label)
        folder = mpath.parent
    if metadata is not None:
        return mpath, require_file(metadata, sample, metadata_label)
    cpath = find_by_suffix(folder, (metadata_suffix,), sample, metadata_suffix)
    if cpath is None:
        raise fail(sample, folder / metadata_glob, f"{metadata_label} not found ({metadata_hint})")
    return mpath, cpath


def cell_anndata(X, names, genes, obs: pd.DataFrame, xy: np.ndarray, controls, *, sample, mpath: Path,
                 unit: str, technology: str, scalefactors: dict | None = None, metadata: dict | None = None):
    """The AnnData of a cell-level export: counts, obs, centres in ``obsm['spatial']``, control probes in
    ``obsm['controls']``, the unit and ``uns['spatial'][sample]`` (no images)."""
    from ._build import build_var, make_anndata

    adata = make_anndata(X, names, build_var(genes, genes), sample=sample, file=mpath, obs=obs)
    adata.obsm["spatial"] = xy
    if controls is not None:
        adata.obsm["controls"] = pd.DataFrame(controls[0].astype(np.float32), index=adata.obs_names,
                                              columns=controls[1])
    adata.uns["spatial.unit"] = unit
    key = sample if sample is not None else mpath.parent.name
    adata.uns["spatial"] = {key: {"images": {}, "scalefactors": dict(scalefactors or {}),
                                  "metadata": {"technology": technology, "source_image_path": "",
                                               **(metadata or {})}}}
    return adata


def control_mask(columns: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the control-probe columns (name starting with one of ``prefixes``,
    case-insensitive)."""
    pat = re.compile("^(" + "|".join(re.escape(p) for p in prefixes) + ")", re.I) if prefixes else None
    return np.array([bool(pat and pat.match(str(c))) for c in columns], dtype=bool)


def read_wide_counts(path: Path, sample, id_columns: Sequence[str], what: str,
                     names: list[str] | None = None):
    """Read a cells x genes CSV whose first ``len(id_columns)`` columns identify the cell.

    Returns ``(ids, genes, X)``: the identifier columns as a DataFrame of text, the gene column names
    and the counts as float32 CSR. Counts must be finite, non-negative numbers.
    """
    header = header_fields(path, sample) if names is None else names
    n_id = len(id_columns)
    if len(header) <= n_id:
        raise fail(sample, path, f"{what} has no gene columns (header: {header})")
    genes = header[n_id:]
    empty = [i for i, g in enumerate(genes) if not g]
    if empty:
        raise fail(sample, path, f"{what}: gene column {empty[0] + n_id + 1} has no name")
    check_unique(genes, "gene columns", sample, path)
    cols = list(id_columns) + genes
    dtypes = {c: str for c in id_columns}  # counts: inferred (integers parse fastest)
    ids, blocks = [], []
    try:
        with open_text(path, sample) as fh:
            reader = pd.read_csv(fh, header=None, skiprows=1, names=cols, dtype=dtypes, engine="c",
                                 chunksize=max(500, _CHUNK_VALUES // len(cols)),
                                 keep_default_na=True)
            for chunk in reader:
                if chunk.empty:  # a header-only file yields one empty chunk
                    continue
                block = chunk[genes]
                for g, dt in zip(genes, block.dtypes):
                    if not pd.api.types.is_numeric_dtype(dt):
                        col = block[g]
                        bad = pd.to_numeric(col, errors="coerce").isna() & col.notna()
                        r = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
                        raise fail(sample, path, f"malformed {what}: non-numeric count in column "
                                                 f"{g!r}, row {int(chunk.index[r]) + 2}: "
                                                 f"{col.iloc[r]!r}")
                vals = block.to_numpy(dtype=np.float32)
                bad = ~np.isfinite(vals)
                if bad.any():
                    r, c = np.argwhere(bad)[0]
                    raise fail(sample, path, f"{int(bad.sum())} missing or non-finite counts in the "
                                             f"{what}, e.g. row {int(chunk.index[r]) + 2} "
                                             f"({examples(chunk.iloc[r, :n_id], n_id)}), column "
                                             f"{genes[c]!r}")
                if (vals < 0).any():
                    r, c = np.argwhere(vals < 0)[0]
                    raise fail(sample, path, f"negative count in the {what}, row "
                                             f"{int(chunk.index[r]) + 2}, column {genes[c]!r}")
                ids.append(chunk[list(id_columns)])
                blocks.append(sp.csr_matrix(vals))
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, f"{what} is empty") from None
    except (pd.errors.ParserError, ValueError, TypeError, UnicodeDecodeError, OSError,
            EOFError) as exc:
        raise fail(sample, path, f"malformed {what} (non-numeric count or ragged rows?): {exc}") from exc
    if not blocks:
        raise fail(sample, path, f"{what} has no data rows")
    id_df = pd.concat(ids, ignore_index=True)
    for c in id_columns:
        if id_df[c].isna().any():
            raise fail(sample, path, f"{int(id_df[c].isna().sum())} rows of the {what} have no "
                                     f"{c!r}")
        id_df[c] = id_df[c].str.strip()
    X = sp.vstack(blocks, format="csr")
    X.eliminate_zeros()
    return id_df, genes, X.astype(np.float32, copy=False)


def read_cell_table(path: Path, sample, what: str, id_dtypes: dict) -> pd.DataFrame:
    """A per-cell CSV (``id_dtypes`` columns read as text) as a DataFrame."""
    try:
        with open_text(path, sample) as fh:
            return pd.read_csv(fh, engine="c", dtype=id_dtypes, low_memory=False)
    except ReaderError:
        raise
    except pd.errors.EmptyDataError:
        raise fail(sample, path, f"{what} is empty") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed {what}: {exc}") from exc


def numeric_columns(df: pd.DataFrame, columns: Sequence[str], sample, path, what: str) -> np.ndarray:
    """``df[columns]`` as float64, a ReaderError for missing columns or non-numeric text."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise fail(sample, path, f"required column(s) {missing} missing from the {what} "
                                 f"(columns: {list(df.columns)[:15]})")
    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, c in enumerate(columns):
        vals = pd.to_numeric(df[c], errors="coerce")
        bad = vals.isna() & df[c].notna()
        if bad.any():
            raise fail(sample, path, f"column {c!r} of the {what} has {int(bad.sum())} non-numeric "
                                     f"values (e.g. {df.loc[bad, c].iloc[0]!r})")
        out[:, j] = vals.to_numpy(dtype=np.float64)
    return out


def split_controls(X: sp.csr_matrix, genes: list[str], prefixes: Sequence[str], keep: bool,
                   sample, technology: str):
    """Set the control-probe columns apart: returns ``(X genes only, gene names, controls or None,
    control total per cell)``; ``controls`` is a DataFrame-ready (matrix, names) pair when ``keep``."""
    mask = control_mask(genes, prefixes)
    genes_arr = np.asarray(genes, dtype=object)
    ctrl = X[:, np.flatnonzero(mask)]
    total = np.asarray(ctrl.sum(axis=1)).ravel().astype(np.float64)
    if mask.any():
        logger.info("sample %r: %d %s control columns (%s) set apart from X%s", sample,
                    int(mask.sum()), technology, examples(genes_arr[mask]),
                    " into obsm['controls']" if keep else " and dropped (keep_controls=False)")
    controls = (ctrl.toarray(), list(genes_arr[mask])) if keep and mask.any() else None
    return X[:, np.flatnonzero(~mask)], list(genes_arr[~mask]), controls, total
