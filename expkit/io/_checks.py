"""Shared helpers of the readers: error messages, read-only file access, consistency checks.

Every failure is raised as :class:`expkit.errors.ReaderError` with a message that names the sample
and the file. Nothing here writes to disk.
"""
from __future__ import annotations

import gzip
import io
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import ReaderError

#: name used in messages when the caller did not say which sample a file belongs to
_NO_SAMPLE = "<unnamed>"


def where(sample: str | None, file: str | Path | None = None) -> str:
    """The ``sample 'x', file '...'`` prefix of every reader message."""
    parts = [f"sample {sample!r}" if sample is not None else f"sample {_NO_SAMPLE}"]
    if file is not None:
        parts.append(f"file '{file}'")
    return ", ".join(parts)


def fail(sample: str | None, file: str | Path | None, message: str) -> ReaderError:
    """Build (not raise) a ReaderError naming ``sample`` and ``file``."""
    return ReaderError(f"{where(sample, file)}: {message}")


def examples(values: Iterable, n: int = 3) -> str:
    """A short ``'a', 'b', 'c'`` list of the first ``n`` values (for error messages)."""
    out = []
    for v in values:
        out.append(repr(str(v)))
        if len(out) == n:
            break
    return ", ".join(out)


def require_file(path: str | Path, sample: str | None, what: str) -> Path:
    """``path`` as a Path that must exist and be a file."""
    path = Path(path)
    if not path.exists():
        raise fail(sample, path, f"{what} not found")
    if not path.is_file():
        raise fail(sample, path, f"{what} is not a file")
    return path


def require_dir(path: str | Path, sample: str | None, what: str) -> Path:
    """``path`` as a Path that must exist and be a folder."""
    path = Path(path)
    if not path.exists():
        raise fail(sample, path, f"{what} not found")
    if not path.is_dir():
        raise fail(sample, path, f"{what} is not a folder")
    return path


def read_parquet(path: Path, sample: str | None, what: str, *, alternative: str = ""):
    """A parquet table as a DataFrame; a clear error when pyarrow is missing (``alternative``: what works
    without it) or the file is malformed."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise fail(sample, path, f"reading {Path(path).name} needs pyarrow (pip install expkit[parquet])"
                                 f"{alternative}") from exc
    except Exception as exc:  # pyarrow's own error types
        raise fail(sample, path, f"malformed {what}: {exc}") from exc


def is_gzip(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes (whatever its name says)."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


@contextmanager
def open_text(path: Path, sample: str | None) -> Iterator[io.TextIOBase]:
    """Open a (possibly gzipped) text file read-only, decompressing in memory only.

    A corrupt or truncated gzip stream, a read error or text that is not UTF-8, met while the caller
    reads, becomes a ReaderError naming the file."""
    try:
        if is_gzip(path):
            fh = io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        else:
            fh = open(path, "r", encoding="utf-8", newline="")
    except OSError as exc:
        raise fail(sample, path, f"cannot be opened: {exc}") from exc
    try:
        yield fh
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise fail(sample, path, f"cannot be read (corrupt or truncated file, or text that is not "
                                 f"UTF-8?): {exc}") from exc
    finally:
        fh.close()


def first_line(path: Path, sample: str | None) -> str:
    """The first line of a (possibly gzipped) text file, without the newline."""
    try:
        with open_text(path, sample) as fh:
            return fh.readline().rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise fail(sample, path, f"cannot be read as text: {exc}") from exc


@contextmanager
def open_h5(path: Path, sample: str | None):
    """Open an HDF5 file read-only, its declared dataset sizes checked (:func:`check_h5_sizes`); a
    corrupt or truncated file becomes a ReaderError."""
    path = require_file(path, sample, "HDF5 file")
    fh = open_h5_file(path, sample)
    try:
        check_h5_sizes(fh, sample, path)
        yield fh
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        if isinstance(exc, ReaderError):
            raise
        raise fail(sample, path, f"HDF5 content cannot be read (corrupt or truncated?): {exc}") from exc
    finally:
        fh.close()


#: a dataset may declare more bytes than it stores (compression, unwritten chunks) by at most this
#: factor (deflate cannot exceed ~1032:1) ...
_H5_RATIO = 2000
#: ... unless it declares less than this (reading it is harmless whatever it stores)
_H5_FLOOR = 256 << 20


def check_h5_sizes(fh, sample: str | None, path: Path) -> None:
    """Refuse, before anything is read, an HDF5 dataset whose declared size its stored bytes cannot
    hold (e.g. a corrupt header claiming 10^12 entries), or that claims more storage than the file."""
    import h5py

    file_size = Path(path).stat().st_size
    bad: list[str] = []

    def visit(name, obj):
        if bad or not isinstance(obj, h5py.Dataset):
            return
        declared = int(np.prod(obj.shape, dtype=np.float64) * obj.dtype.itemsize) if obj.shape else 0
        stored = int(obj.id.get_storage_size())
        if declared > _H5_FLOOR and declared > _H5_RATIO * stored:
            bad.append(f"dataset '/{name}' declares shape {obj.shape} ({declared / 2**30:.3g} GiB) but "
                       f"stores {stored} bytes")
        elif stored > file_size:
            bad.append(f"dataset '/{name}' claims {stored} bytes of storage in a file of {file_size}")

    fh.visititems(visit)
    if bad:
        raise fail(sample, path, f"corrupt HDF5 file: {bad[0]}; refused before reading")


def open_h5_file(path: Path, sample: str | None):
    """``h5py.File(path, "r")``; retried without HDF5 file locking where the file system refuses
    locks (read-only mounts); other failures become a ReaderError."""
    import os

    import h5py

    if not os.access(path, os.R_OK):
        raise fail(sample, path, "is not readable (permission denied)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock" in str(exc).lower():
            try:
                return h5py.File(path, "r", locking=False)
            except (OSError, TypeError):
                pass
        raise fail(sample, path, f"is not a readable HDF5 file (corrupt or truncated?): {exc}") from exc


def check_unique(names: Sequence[str] | np.ndarray, what: str, sample: str | None,
                 file: str | Path | None) -> None:
    """Raise when ``names`` holds duplicates (with their count and examples)."""
    import pandas as pd

    idx = pd.Index(names)
    if idx.is_unique:
        return
    dup = idx[idx.duplicated()].unique()
    raise fail(sample, file, f"{len(dup)} duplicated {what} (e.g. {examples(dup)})")


def check_finite(coords: np.ndarray, names: Sequence[str], what: str, sample: str | None,
                 file: str | Path | None) -> None:
    """Raise when any row of ``coords`` holds NaN or inf (with the count and an example name)."""
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        bad_names = np.asarray(names)[bad]
        raise fail(sample, file, f"{int(bad.sum())} {what} have NaN or infinite coordinates "
                                 f"(e.g. {examples(bad_names)})")


def check_subset(names: Sequence[str], available, what: str, where_what: str,
                 sample: str | None, file: str | Path | None) -> None:
    """Raise when some of ``names`` are absent from ``available`` (a pandas Index)."""
    import pandas as pd

    available = pd.Index(available)
    missing = ~pd.Index(names).isin(available)
    if missing.any():
        miss = np.asarray(names)[missing]
        raise fail(sample, file, f"{int(missing.sum())} of {len(names)} {what} are absent from "
                                 f"{where_what} (e.g. {examples(miss)})")


def gex_mask(feature_types: np.ndarray) -> np.ndarray:
    """Boolean mask of the "Gene Expression" features."""
    return np.asarray(feature_types) == "Gene Expression"
