"""10x Genomics count matrices: Cell Ranger / Space Ranger / Xenium HDF5 and the MatrixMarket folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._build import build_var, make_anndata
from ._checks import fail, gex_mask, open_h5, open_text, require_dir, require_file

__all__ = ["read_10x_h5", "read_10x_mtx"]


def _str_array(ds) -> np.ndarray:
    """An HDF5 string dataset as a numpy array of Python str."""
    values = ds[()]
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    if values.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values],
                        dtype=object)
    return values.astype(str).astype(object)


def _need(group, name: str, sample, path):
    if name not in group:
        raise fail(sample, path, f"required HDF5 dataset '{group.name.rstrip('/')}/{name}' is missing")
    return group[name]


def _csc_as_csr(group, n_genes: int, n_cells: int, sample, path) -> sp.csr_matrix:
    """The genes x cells CSC arrays of a 10x file, reinterpreted (no copy of the structure) as the
    cells x genes CSR matrix they already are."""
    data = _need(group, "data", sample, path)[()]
    indices = _need(group, "indices", sample, path)[()]
    indptr = _need(group, "indptr", sample, path)[()]
    if indptr.shape != (n_cells + 1,):
        raise fail(sample, path, f"'indptr' has {indptr.shape[0]} entries, expected {n_cells + 1} "
                                 f"(number of barcodes + 1)")
    if data.shape != indices.shape or int(indptr[-1]) != data.shape[0] or int(indptr[0]) != 0:
        raise fail(sample, path, f"inconsistent sparse matrix: {data.shape[0]} values, "
                                 f"{indices.shape[0]} indices, indptr ends at {int(indptr[-1])}")
    if np.any(np.diff(indptr) < 0):
        raise fail(sample, path, "'indptr' is not non-decreasing (corrupt matrix)")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_genes):
        raise fail(sample, path, f"feature indices out of range [0, {n_genes})")
    X = sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr),
                      shape=(n_cells, n_genes))
    return X


def _read_h5_v3(fh, sample, path, gex_only: bool):
    grp = fh["matrix"]
    feats = _need(grp, "features", sample, path)
    barcodes = _str_array(_need(grp, "barcodes", sample, path))
    ids = _str_array(_need(feats, "id", sample, path))
    names = _str_array(feats["name"]) if "name" in feats else None
    ftype = (_str_array(feats["feature_type"]) if "feature_type" in feats
             else np.full(len(ids), "Gene Expression", dtype=object))
    genome = _str_array(feats["genome"]) if "genome" in feats else None
    shape = tuple(int(v) for v in _need(grp, "shape", sample, path)[()])
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
    barcodes = _str_array(_need(grp, "barcodes", sample, path))
    ids = _str_array(_need(grp, "genes", sample, path))
    names = _str_array(grp["gene_names"]) if "gene_names" in grp else None
    shape = tuple(int(v) for v in _need(grp, "shape", sample, path)[()])
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


def read_mtx_file(path: Path, sample) -> sp.coo_matrix:
    """A MatrixMarket file (optionally gzipped), decompressed in memory only."""
    import gzip

    import scipy.io

    from ._checks import is_gzip

    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as fh:
                M = scipy.io.mmread(fh)
        else:
            with open(path, "rb") as fh:
                M = scipy.io.mmread(fh)
    except (ValueError, OSError, EOFError, IndexError, RuntimeError) as exc:
        raise fail(sample, path, f"is not a readable MatrixMarket file: {exc}") from exc
    if not sp.issparse(M):
        M = sp.coo_matrix(M)
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
    M = read_mtx_file(mtx, sample)
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
