"""10x Genomics count matrices: Cell Ranger / Space Ranger / Xenium HDF5 and the MatrixMarket folder."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._build import build_var, make_anndata
from ._checks import fail, gex_mask, open_h5, open_text, require_dir, require_file

__all__ = ["read_10x_h5", "read_10x_mtx"]


def _str_array(ds, sample=None, path=None) -> np.ndarray:
    """A 1-D HDF5 string dataset as a numpy array of Python str."""
    if ds.ndim != 1:
        raise fail(sample, path, f"HDF5 dataset '{ds.name}' has shape {ds.shape}, expected one "
                                 f"dimension (a list of names)")
    values = ds[()]
    try:
        if values.dtype.kind == "S":
            return np.char.decode(values, "utf-8").astype(object)
        if values.dtype.kind == "O":
            return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values],
                            dtype=object)
    except UnicodeDecodeError as exc:
        raise fail(sample, path, f"HDF5 dataset '{ds.name}' holds names that are not UTF-8 text: "
                                 f"{exc}") from exc
    return values.astype(str).astype(object)


def _need(group, name: str, sample, path, kind: str = "dataset"):
    """``group[name]``, which must exist and be a dataset (``kind="dataset"``) or a group."""
    import h5py

    where_ = f"{group.name.rstrip('/')}/{name}"
    if not isinstance(group, h5py.Group) or name not in group:
        raise fail(sample, path, f"required HDF5 {kind} '{where_}' is missing")
    obj = group[name]
    if not isinstance(obj, h5py.Dataset if kind == "dataset" else h5py.Group):
        raise fail(sample, path, f"HDF5 object '{where_}' is not a {kind}")
    return obj


def _shape(group, sample, path) -> tuple[int, int]:
    """The (features, barcodes) of ``group/shape``: two non-negative whole numbers."""
    ds = _need(group, "shape", sample, path)
    vals = np.asarray(ds[()]) if ds.shape is not None else np.zeros(0)
    if vals.shape != (2,) or vals.dtype.kind not in "iuf" or not np.all(np.isfinite(vals)) or \
            np.any(vals < 0) or np.any(vals != np.round(vals)):
        raise fail(sample, path, f"'{ds.name}' is {vals.tolist()!r}, expected two non-negative whole "
                                 f"numbers (features, barcodes)")
    return int(vals[0]), int(vals[1])


def _sparse_parts(group, sample, path):
    """(data, indices, indptr) of a 10x group: 1-D, numeric counts, integer indices."""
    out = []
    for name, kinds in (("data", "iufb"), ("indices", "iu"), ("indptr", "iu")):
        ds = _need(group, name, sample, path)
        if ds.ndim != 1 or ds.dtype.kind not in kinds:
            raise fail(sample, path, f"'{ds.name}' is a {ds.dtype} dataset of shape {ds.shape}, "
                                     f"expected a 1-D {'numeric' if name == 'data' else 'integer'} array")
        out.append(ds[()])
    return out


def _csc_as_csr(group, n_genes: int, n_cells: int, sample, path) -> sp.csr_matrix:
    """The genes x cells CSC arrays of a 10x file, reinterpreted (no copy of the structure) as the
    cells x genes CSR matrix they already are, once their structure is checked."""
    data, indices, indptr = _sparse_parts(group, sample, path)
    if indptr.shape != (n_cells + 1,):
        raise fail(sample, path, f"'indptr' has {indptr.shape[0]} entries, expected {n_cells + 1} "
                                 f"(number of barcodes + 1)")
    if data.shape != indices.shape or int(indptr[-1]) != data.shape[0] or int(indptr[0]) != 0:
        raise fail(sample, path, f"inconsistent sparse matrix: {data.shape[0]} values, "
                                 f"{indices.shape[0]} indices, indptr from {int(indptr[0])} to "
                                 f"{int(indptr[-1])}")
    if np.any(np.diff(indptr) < 0):
        raise fail(sample, path, "'indptr' is not non-decreasing (corrupt matrix)")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_genes):
        raise fail(sample, path, f"feature indices out of range [0, {n_genes})")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise fail(sample, path, f"{int((~np.isfinite(data)).sum())} counts are NaN or infinite")
    if data.dtype.kind in "if" and data.size and data.min() < 0:
        raise fail(sample, path, f"{int((data < 0).sum())} counts are negative (a count matrix holds "
                                 f"non-negative counts)")
    X = sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr),
                      shape=(n_cells, n_genes))
    return X


def _read_h5_v3(fh, sample, path, gex_only: bool):
    grp = _need(fh, "matrix", sample, path, kind="group")
    feats = _need(grp, "features", sample, path, kind="group")
    barcodes = _str_array(_need(grp, "barcodes", sample, path), sample, path)
    ids = _str_array(_need(feats, "id", sample, path), sample, path)
    opt = {k: _str_array(_need(feats, k, sample, path), sample, path) if k in feats else None
           for k in ("name", "feature_type", "genome")}
    names, ftype, genome = opt["name"], opt["feature_type"], opt["genome"]
    if ftype is None:
        ftype = np.full(len(ids), "Gene Expression", dtype=object)
    shape = _shape(grp, sample, path)
    if shape != (len(ids), len(barcodes)):
        raise fail(sample, path, f"'matrix/shape' is {shape} but the file lists {len(ids)} features "
                                 f"and {len(barcodes)} barcodes")
    for label, arr in (("name", names), ("feature_type", ftype), ("genome", genome)):
        if arr is not None and len(arr) != len(ids):
            raise fail(sample, path, f"'matrix/features/{label}' has {len(arr)} entries, "
                                     f"'matrix/features/id' has {len(ids)}")
    X = _csc_as_csr(grp, len(ids), len(barcodes), sample, path)
    var = build_var(ids, names, ftype, genome)
    return X, barcodes, var


def _read_h5_v2(fh, sample, path, genome: str | None):
    genomes = [k for k in fh.keys() if hasattr(fh[k], "keys") and "genes" in fh[k]]
    if not genomes:
        raise fail(sample, path, "no 'matrix' group (Cell Ranger v3) and no genome group with "
                                 "'genes' (Cell Ranger v2): not a 10x HDF5 count matrix")
    if genome is None:
        if len(genomes) > 1:
            raise fail(sample, path, f"Cell Ranger v2 file with several genomes {genomes}: pass "
                                     f"genome=<one of them>")
        genome = genomes[0]
    elif genome not in genomes:
        raise fail(sample, path, f"genome {genome!r} not in the file (has {genomes})")
    grp = fh[genome]
    barcodes = _str_array(_need(grp, "barcodes", sample, path), sample, path)
    ids = _str_array(_need(grp, "genes", sample, path), sample, path)
    names = (_str_array(_need(grp, "gene_names", sample, path), sample, path)
             if "gene_names" in grp else None)
    shape = _shape(grp, sample, path)
    if shape != (len(ids), len(barcodes)):
        raise fail(sample, path, f"'{genome}/shape' is {shape} but the file lists {len(ids)} genes "
                                 f"and {len(barcodes)} barcodes")
    X = _csc_as_csr(grp, len(ids), len(barcodes), sample, path)
    var = build_var(ids, names, None, np.full(len(ids), genome, dtype=object))
    return X, barcodes, var


def _h5_parts(path: Path, sample: str | None, gex_only: bool, genome: str | None = None):
    """(X cells x genes CSR float32, barcodes, var, file attrs) of a 10x HDF5 matrix."""
    with open_h5(path, sample) as fh:
        if "matrix" in fh:
            X, barcodes, var = _read_h5_v3(fh, sample, path, gex_only)
        else:
            X, barcodes, var = _read_h5_v2(fh, sample, path, genome)
        attrs = {}
        for k in ("chemistry_description", "software_version", "filetype", "library_ids"):
            if k in fh.attrs:
                v = fh.attrs[k]
                if isinstance(v, np.ndarray):
                    v = [x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel()]
                    v = v[0] if len(v) == 1 else v
                elif isinstance(v, bytes):
                    v = v.decode()
                attrs[k] = v if isinstance(v, (str, list)) else str(v)
    if gex_only:
        mask = var["feature_types"].to_numpy() == "Gene Expression"
        if not mask.all():
            X = X[:, np.flatnonzero(mask)]
            var = var.iloc[np.flatnonzero(mask)]
    return X, barcodes, var, attrs


def read_10x_h5(path, *, sample: str | None = None, gex_only: bool = True,
                genome: str | None = None):
    """Read a Cell Ranger / Space Ranger / Xenium HDF5 count matrix.

    Parameters
    ----------
    path
        The ``.h5`` file: Cell Ranger v3+ layout (``matrix/{data,indices,indptr,shape,barcodes}``,
        ``matrix/features/{id,name,feature_type,genome}``) or the v2 layout (one group per genome
        with ``genes``/``gene_names``).
    sample
        Sample name used in error messages.
    gex_only
        Keep only the "Gene Expression" features (default); ``False`` keeps all (antibody capture,
        control probes, ...).
    genome
        For v2 files with several genome groups, which one to read.

    Returns
    -------
    AnnData
        ``X`` raw counts (float32 CSR, barcodes x features), ``obs_names`` = ``obs['barcode']`` = the
        barcodes, ``var_names`` = feature ids, ``var`` columns ``gene_ids``, ``gene_symbols``,
        ``feature_types`` (and ``genome``). File attributes go to ``uns['10x']``.

    Raises
    ------
    ReaderError
        Missing, corrupt or truncated file, missing dataset, inconsistent shapes, duplicated barcodes.
    """
    path = require_file(path, sample, "10x HDF5 matrix")
    X, barcodes, var, attrs = _h5_parts(path, sample, gex_only, genome)
    adata = make_anndata(X, barcodes, var, sample=sample, file=path)
    if attrs:
        adata.uns["10x"] = attrs
    return adata


# --------------------------------------------------------------------------------------- MatrixMarket

def _find_one(folder: Path, stems: tuple[str, ...], sample) -> Path | None:
    """The single file of ``folder`` whose name ends with one of ``stems`` (+ optional .gz)."""
    hits = []
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        name = f.name[:-3] if f.name.endswith(".gz") else f.name
        if any(name == s or name.endswith("_" + s) or name.endswith("-" + s) or name.endswith("." + s)
               for s in stems):
            hits.append(f)
    if len(hits) > 1:
        # prefer the exact name
        exact = [f for f in hits if f.name in stems or f.name[:-3] in stems]
        if len(exact) == 1:
            return exact[0]
        raise fail(sample, folder, f"several candidate files for {stems[0]}: "
                                   f"{', '.join(f.name for f in hits)}")
    return hits[0] if hits else None


#: bytes a MatrixMarket entry takes at least ("1 1\n" in a coordinate file; an array file may store
#: only a triangle: half its rows x columns entries of "1\n")
_MTX_MIN_ENTRY = {"coordinate": 4, "array": 1}


def _size_line(fh) -> bytes:
    """The first line after the comments (however long) and blank lines of a MatrixMarket stream."""
    line = fh.readline(1 << 16)
    while line.startswith(b"%") or (line and not line.strip()):
        while line and not line.endswith(b"\n"):
            line = fh.readline(1 << 16)
        line = fh.readline(1 << 16)
    return line


def mtx_header(path: Path, sample) -> tuple[int, int, int]:
    """(rows, columns, entries) of a MatrixMarket file from its banner and size line, refused when the
    file cannot hold that many entries (a corrupt header claiming 10^12 must not be allocated)."""
    import gzip

    from ._checks import is_gzip

    try:
        with (gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")) as fh:
            banner = fh.readline(1024).decode("utf-8", "replace").split()
            line = _size_line(fh).decode("utf-8", "replace") if banner else ""
    except (OSError, EOFError, zlib.error) as exc:
        raise fail(sample, path, f"is not a readable MatrixMarket file: {exc}") from exc
    if len(banner) != 5 or banner[0].lower() != "%%matrixmarket" or banner[2].lower() not in _MTX_MIN_ENTRY:
        raise fail(sample, path, f"is not a MatrixMarket matrix file (banner {' '.join(banner)[:80]!r})")
    layout = banner[2].lower()
    try:
        size = [int(v) for v in line.split()]
    except ValueError:
        size = []
    if len(size) != (3 if layout == "coordinate" else 2) or min(size) < 0:
        raise fail(sample, path, f"malformed MatrixMarket size line {line.strip()[:80]!r}")
    rows, cols = size[0], size[1]
    entries = size[2] if layout == "coordinate" else rows * cols
    budget = path.stat().st_size * (1100 if is_gzip(path) else 1)  # deflate expands at most ~1032x
    if entries * _MTX_MIN_ENTRY[layout] > budget + 64:
        raise fail(sample, path, f"MatrixMarket header declares {entries} entries ({rows} x {cols}), "
                                 f"more than the file can hold (corrupt or truncated?)")
    return rows, cols, entries


def read_mtx_file(path: Path, sample, expect: tuple[int, int], describe: str) -> sp.coo_matrix:
    """A MatrixMarket file (optionally gzipped), decompressed in memory only.

    ``expect``: the (rows, columns) the header must declare, in either order (``describe`` says what
    they are), checked before the entries are read. Non-finite values are refused."""
    import gzip

    import scipy.io

    from ._checks import is_gzip

    rows, cols, _ = mtx_header(path, sample)
    if (rows, cols) not in (tuple(expect), tuple(expect)[::-1]):
        raise fail(sample, path, f"matrix shape {(rows, cols)} matches neither {describe} nor its "
                                 f"transpose")
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as fh:
                M = scipy.io.mmread(fh)
        else:
            with open(path, "rb") as fh:
                M = scipy.io.mmread(fh)
    except (ValueError, OSError, EOFError, IndexError, RuntimeError, OverflowError,
            zlib.error) as exc:
        raise fail(sample, path, f"is not a readable MatrixMarket file: {exc}") from exc
    if not sp.issparse(M):
        M = sp.coo_matrix(M)
    if M.dtype.kind == "c" or (M.dtype.kind == "f" and not np.isfinite(M.data).all()):
        raise fail(sample, path, "holds complex, NaN or infinite values (counts expected)")
    return M


def _read_lines_table(path: Path, sample, what: str):
    import pandas as pd

    try:
        with open_text(path, sample) as fh:
            df = pd.read_csv(fh, sep="\t", header=None, dtype=str, quoting=3, engine="c",
                             keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise fail(sample, path, f"{what} file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise fail(sample, path, f"malformed {what} file: {exc}") from exc
    return df


def read_10x_mtx(folder, *, sample: str | None = None, gex_only: bool = True):
    """Read a 10x MatrixMarket folder (``filtered_feature_bc_matrix/``).

    Parameters
    ----------
    folder
        Folder holding ``matrix.mtx(.gz)``, ``features.tsv(.gz)`` (Cell Ranger v3: id, name, type) or
        ``genes.tsv`` (v2: id, name) and ``barcodes.tsv(.gz)``. A common prefix such as GEO's
        ``GSM123_matrix.mtx.gz`` is accepted. Gzipped files are decompressed in memory only.
    sample
        Sample name used in error messages.
    gex_only
        Keep only the "Gene Expression" features (default).

    Returns
    -------
    AnnData
        As :func:`read_10x_h5`.

    Raises
    ------
    ReaderError
        Missing or malformed files, shapes that disagree, duplicated barcodes.
    """
    folder = require_dir(folder, sample, "10x matrix folder")
    mtx = _find_one(folder, ("matrix.mtx",), sample)
    feats = _find_one(folder, ("features.tsv",), sample) or _find_one(folder, ("genes.tsv",), sample)
    bcs = _find_one(folder, ("barcodes.tsv",), sample)
    missing = [n for n, f in (("matrix.mtx(.gz)", mtx), ("features.tsv(.gz) or genes.tsv", feats),
                              ("barcodes.tsv(.gz)", bcs)) if f is None]
    if missing:
        raise fail(sample, folder, f"not a 10x matrix folder: missing {', '.join(missing)}")
    fdf = _read_lines_table(feats, sample, "features")
    bdf = _read_lines_table(bcs, sample, "barcodes")
    barcodes = bdf.iloc[:, 0].to_numpy(dtype=object)
    ids = fdf.iloc[:, 0].to_numpy(dtype=object)
    names = fdf.iloc[:, 1].to_numpy(dtype=object) if fdf.shape[1] > 1 else None
    ftype = fdf.iloc[:, 2].to_numpy(dtype=object) if fdf.shape[1] > 2 else None
    M = read_mtx_file(mtx, sample, (len(ids), len(barcodes)),
                      f"{len(ids)} features ({feats.name}) x {len(barcodes)} barcodes ({bcs.name})")
    if M.nnz and M.data.min() < 0:
        raise fail(sample, mtx, f"{int((M.data < 0).sum())} counts are negative (a count matrix holds "
                                f"non-negative counts)")
    if M.shape == (len(ids), len(barcodes)):
        X = M.T.tocsr()
    elif M.shape == (len(barcodes), len(ids)):
        X = M.tocsr()
    else:
        raise fail(sample, mtx, f"matrix shape {M.shape} matches neither {len(ids)} features "
                                f"({feats.name}) x {len(barcodes)} barcodes ({bcs.name}) nor its transpose")
    var = build_var(ids, names, ftype)
    if gex_only and ftype is not None:
        keep = np.flatnonzero(gex_mask(ftype))
        if keep.size < len(ids):
            X = X[:, keep]
            var = var.iloc[keep]
    return make_anndata(X, barcodes, var, sample=sample, file=mtx)
