"""The experiment folder: manifest, sample table, one h5ad per sample, the integrated h5mu.

Layout (all paths relative to the folder, so a copied folder loads identically)::

    manifest.json               format version, package version, generation, the sample table, samples, summaries
    samples.tsv                 the sample table (a readable copy; the manifest's is the one read)
    history.jsonl               the provenance log: one JSON line per method call, appended at each save
    <modality>/<sample>.g<N>.h5ad    one AnnData per sample, written by the save of generation N
    images/<modality>/<sample>.h5   the sample's images (chunked HDF5), when it has any
    integrated.g<N>.h5mu        the integrated MuData (one AnnData per modality), after merge()

Saves are atomic (see :mod:`expkit.experiment.saving`): new files under new names, then the manifest replaced
in one rename, then the previous generation's files removed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import FormatError

FORMAT_NAME = "expkit-experiment"
# 2: a sample file may omit X when X equals one of its layers (uns[X_IS_LAYER] names it)
# 3: the manifest holds the sample table and the save generation; files are named per generation
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TABLE = "samples.tsv"
HISTORY = "history.jsonl"
INTEGRATED = "integrated.h5mu"

# Migrations from older format versions: {old_version: function(manifest dict) -> manifest of old_version + 1}.
# 1 -> 2: nothing to rewrite (format-1 sample files store X; format 2 reads both).
# 2 -> 3: nothing to rewrite (the table is read from samples.tsv until the next save puts it in the manifest).
MIGRATIONS: dict[int, callable] = {1: lambda manifest: {**manifest, "format_version": 2},
                                   2: lambda manifest: {**manifest, "format_version": 3, "generation": 0}}
X_IS_LAYER = "expkit.X_is_layer"


def sample_file(modality: str, sample: str, generation: int | None = None) -> str:
    """``<modality>/<sample>.h5ad``, or with a save generation ``<modality>/<sample>.g<N>.h5ad``."""
    return f"{modality}/{sample}.h5ad" if generation is None else f"{modality}/{sample}.g{int(generation)}.h5ad"


def integrated_file(generation: int) -> str:
    return f"integrated.g{int(generation)}.h5mu"


def image_file(modality: str, sample: str) -> str:
    return f"images/{modality}/{sample}.h5"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FormatError(f"experiment folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise FormatError(f"{str(folder)!r} is not an expkit experiment: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{str(path)!r} is not a readable manifest: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"{str(path)!r} is not an expkit manifest (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise FormatError(f"{str(path)!r} has no integer format_version")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{str(folder)!r} was written in folder format {version} by expkit {manifest.get('expkit_version')}; "
            f"this expkit reads format <= {FORMAT_VERSION}: upgrade expkit to open it")
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise FormatError(f"{str(folder)!r} uses folder format {version}, which has no migration path")
        manifest = MIGRATIONS[version](manifest)
        version = manifest["format_version"]
    return manifest


@contextmanager
def staged(target: Path):
    """Yield a temporary path beside ``target``; the caller writes it, ``commit`` renames it later."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def leftover_temporaries(folder: Path, *, older_than: float = 0.0) -> list[Path]:
    """Temporary files of saves that were killed before they finished (``.<name>.<random>.tmp``).

    Only files last modified more than ``older_than`` seconds ago: a younger one may belong to a save that
    another process is running right now.
    """
    import time

    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than
    found = []
    for path in folder.rglob(".*.tmp"):
        try:
            if path.is_file() and path.stat().st_mtime <= cutoff:
                found.append(path)
        except FileNotFoundError:  # renamed or removed by a concurrent save
            continue
    return sorted(found)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_json_atomic(path: Path, obj: dict) -> None:
    with staged(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
        fsync_file(tmp)
        os.replace(tmp, path)


def append_lines_atomic(path: Path, lines: list[str]) -> None:
    """Append lines to a text file by writing old + new to a temporary and renaming it: a reader sees the
    file before or after, never a torn line."""
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + "".join(line.rstrip("\n") + "\n" for line in lines))


def write_text_atomic(path: Path, text: str) -> None:
    with staged(path) as tmp:
        tmp.write_text(text)
        fsync_file(tmp)
        os.replace(tmp, path)


def layer_equal_to_x(adata) -> str | None:
    """The name of a layer holding exactly ``adata.X`` (same object, or same format, dtype and values)."""
    import numpy as np
    import scipy.sparse as sp

    X = adata.X
    if X is None:
        return None
    for name, layer in adata.layers.items():
        if layer is X:
            return name
        if type(layer) is not type(X) or layer.shape != X.shape or layer.dtype != X.dtype:
            continue
        if sp.issparse(X) and X.format in ("csr", "csc"):
            if (layer.nnz == X.nnz and np.array_equal(layer.indptr, X.indptr)
                    and np.array_equal(layer.indices, X.indices) and np.array_equal(layer.data, X.data)):
                return name
        elif isinstance(X, np.ndarray) and np.array_equal(layer, X):
            return name
    return None


def write_h5ad(adata, tmp: Path) -> None:
    """Write an AnnData (compressed, no pickles: anndata's h5ad is pure HDF5).

    When ``X`` equals a layer (raw counts, or the log-normalised values, are usually both), ``X`` is not
    written twice: the file names the layer in ``uns[X_IS_LAYER]`` and :func:`read_h5ad` restores ``X``.
    """
    name = layer_equal_to_x(adata)
    if name is None:
        adata.write_h5ad(tmp, compression="gzip", compression_opts=4)
    else:
        X = adata.X
        adata.X = None
        adata.uns[X_IS_LAYER] = name
        try:
            adata.write_h5ad(tmp, compression="gzip", compression_opts=4)
        finally:
            del adata.uns[X_IS_LAYER]
            adata.X = X
    fsync_file(tmp)


def read_h5ad(path: Path, *, what: str):
    import anndata as ad

    if not path.is_file():
        raise FormatError(f"{what}: file {str(path)!r} is missing from the experiment folder")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise FormatError(f"{what}: {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    name = adata.uns.pop(X_IS_LAYER, None)
    if name is not None:
        if name not in adata.layers:
            raise FormatError(f"{what}: {str(path)!r} stores X as layer {name!r}, which it does not have")
        adata.X = adata.layers[name].copy()
    return adata


def write_h5mu(mdata, tmp: Path) -> None:
    mdata.write_h5mu(tmp, compression="gzip", compression_opts=4)
    fsync_file(tmp)


def read_h5mu(path: Path):
    import mudata as md

    if not path.is_file():
        raise FormatError(f"integrated data {str(path)!r} is missing from the experiment folder")
    try:
        return md.read_h5mu(path)
    except Exception as exc:
        raise FormatError(f"integrated data {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def remove_quietly(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
