"""``read_sample``: the one entry point the Experiment calls, with layout auto-detection."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._checks import fail

__all__ = ["read_sample", "detect_reader", "READERS", "SPATIAL_MODALITIES"]

SPATIAL_MODALITIES = ("spatial-bin", "spatial-cell")

#: reader name -> "module:function" (imported on use)
READERS: dict[str, str] = {
    "10x_h5": "expkit.io.tenx:read_10x_h5",
    "10x_mtx": "expkit.io.tenx:read_10x_mtx",
    "visium": "expkit.io.visium:read_visium",
    "table": "expkit.io.tables:read_table",
    "xenium": "expkit.io.xenium:read_xenium",
    "visium_hd": "expkit.io.visium_hd:read_visium_hd",
    "merscope": "expkit.io.merscope:read_merscope",
    "cosmx": "expkit.io.cosmx:read_cosmx",
    "h5ad": "expkit.io.h5ad:read_h5ad",
}

LAYOUTS = """supported layouts:
  visium   a Space Ranger outs/ folder: spatial/ (tissue_positions[_list].csv, scalefactors_json.json,
           images) + filtered_feature_bc_matrix.h5 or a single *.h5
  visium_hd a Space Ranger outs/ (or binned_outputs/) folder of Visium HD, or one
           binned_outputs/square_<size>um/ folder: filtered_feature_bc_matrix.h5 + spatial/
           (tissue_positions.parquet or .csv, scalefactors_json.json with bin_size_um, images);
           option bin_size=2|8|16
  xenium   a folder with cell_feature_matrix.h5 + cells.csv.gz (or the .h5 file itself)
  merscope a Vizgen folder with cell_by_gene.csv + cell_metadata.csv (or the cell_by_gene.csv)
  cosmx    a NanoString CosMx folder with *_exprMat_file.csv + *_metadata_file.csv (or the
           *_exprMat_file.csv)
  10x_h5   a Cell Ranger .h5 file (or a folder holding exactly one .h5)
  10x_mtx  a folder with matrix.mtx(.gz), features.tsv(.gz)/genes.tsv, barcodes.tsv(.gz)
  h5ad     an AnnData .h5ad file (or a folder holding exactly one)
  table    a count table (.tsv/.csv/.txt[.gz] or .mtx[.gz]) file, or a folder with one count table
           (name containing count/expr/matrix) and optional coordinate (locs/spots/coord/position)
           and metadata (meta) tables"""

_TEXT = (".tsv", ".csv", ".txt", ".tab")
_COUNT_HINT = re.compile(r"count|expr|matrix|umi", re.I)
_COORD_HINT = re.compile(r"loc|spot|coord|position|spatial|xy", re.I)
_META_HINT = re.compile(r"meta|annot", re.I)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _is_text_table(p: Path) -> bool:
    return p.is_file() and _strip_gz(p.name).lower().endswith(_TEXT)


def _is_mtx(p: Path) -> bool:
    return p.is_file() and _strip_gz(p.name).lower().endswith(".mtx")


def _platform_csv(name: str) -> str | None:
    """The imaging-platform reader of a cells x genes CSV named ``name`` (``.gz`` stripped)."""
    if name.endswith("cell_by_gene.csv"):
        return "merscope"
    if name.endswith("exprmat_file.csv"):
        return "cosmx"
    return None


def _platform_folder(folder: Path, names: set[str]) -> str | None:
    """``visium_hd``, ``merscope`` or ``cosmx`` when ``folder``'s files say so, else None."""
    from .visium_hd import is_visium_hd_square

    if (folder / "binned_outputs").is_dir() or is_visium_hd_square(folder) or \
            any(re.fullmatch(r"square_\d{3}um", n) and (folder / n).is_dir() for n in names):
        return "visium_hd"
    found = {_platform_csv(_strip_gz(n).lower()) for n in names if (folder / n).is_file()}
    found.discard(None)
    if len(found) == 1:
        return found.pop()
    return None


def _table_folder(folder: Path, sample) -> dict | None:
    """Options of read_table for a folder of plain tables, or None when it is not one."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    mtx = [p for p in files if _is_mtx(p)]
    tables = [p for p in files if _is_text_table(p)]
    if len(mtx) == 1:
        rest = [p for p in tables]
        genes = [p for p in rest if re.search(r"gene|feature", p.name, re.I)]
        bcs = [p for p in rest if re.search(r"barcode", p.name, re.I)]
        coords = [p for p in rest if _COORD_HINT.search(p.name) and p not in genes + bcs]
        if len(genes) != 1 or (not bcs and len(coords) != 1):
            return None
        opts = {"counts": mtx[0], "genes": genes[0]}
        if bcs:
            opts["barcodes"] = bcs[0]
        if len(coords) == 1:
            opts["coords"] = coords[0]
        return opts
    counts = [p for p in tables if _COUNT_HINT.search(p.name)]
    if len(counts) != 1:
        return None
    rest = [p for p in tables if p != counts[0]]
    coords = [p for p in rest if _COORD_HINT.search(p.name) and not _META_HINT.search(p.name)]
    meta = [p for p in rest if _META_HINT.search(p.name)]
    opts: dict = {"counts": counts[0]}
    if len(coords) == 1:
        opts["coords"] = coords[0]
    elif len(coords) > 1:
        return None
    if meta:
        opts["metadata"] = meta
    return opts


def detect_reader(location, *, sample: str | None = None) -> tuple[str, Path, dict]:
    """Guess the reader of ``location`` from its contents / extension.

    Returns ``(reader name, path to pass to it, extra options)``; raises a ReaderError listing the
    supported layouts when nothing matches.
    """
    path = Path(location)
    if not path.exists():
        raise fail(sample, path, "input not found")
    if path.is_file():
        name = _strip_gz(path.name).lower()
        if name.endswith(".h5ad"):
            return "h5ad", path, {}
        if name.endswith(".h5"):
            if any((path.parent / c).is_file() for c in ("cells.csv.gz", "cells.csv", "cells.parquet")):
                return "xenium", path, {}
            if (path.parent / "spatial").is_dir():
                from .visium_hd import is_visium_hd_square

                if is_visium_hd_square(path.parent):
                    return "visium_hd", path.parent, {"matrix": path.name}
                return "visium", path.parent, {"matrix": path.name}
            return "10x_h5", path, {}
        if name.endswith(".mtx"):
            if any((path.parent / f).exists() for f in ("barcodes.tsv", "barcodes.tsv.gz")):
                return "10x_mtx", path.parent, {}
            return "table", path, {}
        platform = _platform_csv(name)
        if platform is not None:
            return platform, path, {}
        if name.endswith(_TEXT):
            return "table", path, {}
        raise fail(sample, path, f"unknown input file type\n{LAYOUTS}")
    folder = path
    if (folder / "outs").is_dir() and not (folder / "spatial").is_dir():
        folder = folder / "outs"
    names = {p.name for p in folder.iterdir()}
    platform = _platform_folder(folder, names)
    if platform is not None:
        return platform, folder, {}
    h5s = sorted(p for p in folder.glob("*.h5") if p.is_file())
    if (folder / "spatial").is_dir() and (h5s or names & {"filtered_feature_bc_matrix",
                                                           "raw_feature_bc_matrix"}):
        return "visium", folder, {}
    if "cell_feature_matrix.h5" in names and names & {"cells.csv.gz", "cells.csv", "cells.parquet"}:
        return "xenium", folder, {}
    if any(_strip_gz(n) in ("matrix.mtx",) or _strip_gz(n).endswith("_matrix.mtx") for n in names) and \
            any(_strip_gz(n).endswith("barcodes.tsv") for n in names):
        return "10x_mtx", folder, {}
    for sub in ("filtered_feature_bc_matrix", "raw_feature_bc_matrix"):
        if (folder / sub).is_dir() and not h5s:
            return "10x_mtx", folder / sub, {}
    if len(h5s) == 1:
        return "10x_h5", h5s[0], {}
    h5ads = sorted(folder.glob("*.h5ad"))
    if len(h5ads) == 1:
        return "h5ad", h5ads[0], {}
    opts = _table_folder(folder, sample)
    if opts is not None:
        counts = opts.pop("counts")
        return "table", counts, opts
    listing = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
    raise fail(sample, folder, f"cannot tell which reader to use (contents: {listing or 'empty'})\n"
                               f"{LAYOUTS}\nPass reader=<name> and its options explicitly.")


def _get_reader(name: str):
    from importlib import import_module

    if name not in READERS:
        raise InputError(f"unknown reader {name!r}; choose one of {sorted(READERS)} (or None to "
                         f"auto-detect)")
    module, func = READERS[name].split(":")
    return getattr(import_module(module), func)


def _parse_select(select: str, sample) -> tuple[str, str]:
    if not isinstance(select, str) or "=" not in select:
        raise InputError(f"sample {sample!r}: select={select!r} must be a string 'column=value'")
    col, value = select.split("=", 1)
    col, value = col.strip(), value.strip()
    if not col:
        raise InputError(f"sample {sample!r}: select={select!r} has no column name")
    return col, value


def _apply_select(adata, select: str, sample, location):
    col, value = _parse_select(select, sample)
    if col not in adata.obs.columns:
        raise fail(sample, location, f"select={select!r}: the reader provides no obs column {col!r} "
                                     f"(available: {list(adata.obs.columns)})")
    values = adata.obs[col]
    as_str = values.astype(str).str.strip()
    keep = (as_str == value).to_numpy()
    if not keep.any():
        # numeric columns: "1" should match 1.0
        try:
            num = float(value)
            keep = np.isclose(np.asarray(values, dtype=float), num)
        except (TypeError, ValueError):
            pass
    if not keep.any():
        present = list(dict.fromkeys(as_str.tolist()))
        shown = ", ".join(repr(v) for v in present[:10]) + (" ..." if len(present) > 10 else "")
        raise fail(sample, location, f"select={select!r} matches no observation; {col!r} takes the "
                                     f"values {shown}")
    return adata[keep].copy()


def read_sample(location, *, modality: str, sample: str, reader: str | None = None,
                select: str | None = None, **options):
    """Read one sample's raw input into an AnnData (the entry point the Experiment calls).

    Parameters
    ----------
    location
        The input file or folder (never modified).
    modality
        ``"rna"``, ``"spatial-bin"`` or ``"spatial-cell"`` (any other name is accepted without the
        spatial check). Spatial modalities require ``obsm['spatial']`` in the result.
    sample
        The sample name (errors name it; the spatial readers key ``uns['spatial']`` by it).
    reader
        One of ``"10x_h5"``, ``"10x_mtx"``, ``"visium"``, ``"visium_hd"``, ``"table"``,
        ``"xenium"``, ``"merscope"``, ``"cosmx"``, ``"h5ad"``, or None to auto-detect from the
        location's contents and extension.
    select
        ``"column=value"``: keep only the observations whose reader-provided ``obs[column]`` equals
        ``value`` (compared as text, or numerically for numeric columns). This is how one
        multi-sample input yields one sample, e.g. ``"list_ID=NP"`` or ``"slice=1"``.
    **options
        Passed to the reader (see each reader's parameters).

    Returns
    -------
    AnnData
        The reader's result (see the readers), with ``uns['io.reader']`` recording the reader name,
        location and selection.

    Raises
    ------
    ReaderError
        Anything wrong with the input (see the readers), no layout recognised, a ``select`` that
        names no column or matches nothing, a spatial modality without coordinates.
    InputError
        An unknown reader name or an option the reader does not take.
    """
    path = Path(location)
    extra: dict = {}
    if reader is None:
        reader, path, extra = detect_reader(path, sample=sample)
    elif reader in ("table", "10x_h5", "h5ad") and path.is_dir():
        # a file reader given a folder: take the file the folder's layout points to
        found, fpath, fextra = detect_reader(path, sample=sample)
        if found != reader:
            raise fail(sample, path, f"reader {reader!r} needs a file; the folder looks like a "
                                     f"{found!r} input (pass the file itself or reader={found!r})")
        path, extra = fpath, fextra
    func = _get_reader(reader)
    kwargs = {**extra, **options}
    params = inspect.signature(func).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise InputError(f"sample {sample!r}: reader {reader!r} takes no option(s) {unknown}; "
                         f"its options are {[p for p in params if p != 'sample'][1:]}")
    if "sample" in params:
        kwargs["sample"] = sample
    adata = func(path, **kwargs)
    if select is not None:
        adata = _apply_select(adata, select, sample, path)
    if modality in SPATIAL_MODALITIES and "spatial" not in adata.obsm:
        raise fail(sample, path, f"modality {modality!r} needs spatial coordinates but reader "
                                 f"{reader!r} found none (obsm['spatial'] missing); for a table pass "
                                 f"coords=<file> or x=/y= column names")
    adata.uns["io.reader"] = {"reader": reader, "location": str(path),
                              "select": select if select is not None else ""}
    return adata
