"""Fuzzed inputs to every reader (issue 17) give an expkit error naming the sample and the file (or, for harmless
mutations, a valid AnnData), never another exception, a hang or a giant allocation, and write nothing.

Each case copies a real fixture (tests/data/platforms, ../shared/data or subsets cut here from it) into tmp_path and
applies seeded mutations to one file at a time: truncation, byte flips, a folder or nothing instead of the file; CSV
cells with text/NaN/inf/negative/empty values, dropped or swapped columns, ragged rows, header changes; JSON values of
the wrong type; HDF5 datasets deleted, of the wrong dtype or shape or declaring 10^12 entries, inconsistent CSC
structures; MatrixMarket headers claiming 10^12 rows or entries; PNG headers claiming 10^10 pixels. Reads run under an
address-space cap (a giant allocation fails as MemoryError: a crash) and a time limit. ``run_case(..., log=print)``
prints every mutation's outcome.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import signal
import struct
import threading
import traceback
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import expkit as ek
import expkit.io as eio
from expkit.errors import ExpkitError, ReaderError

SEED, SAMPLE, HUGE = 17, "fz17", 10**12
PLATFORMS = Path(__file__).resolve().parent / "data" / "platforms"
SCANPY = Path("visium_fixtures") / "scanpy_visium_1.0.0"
SQ8, H5 = "outs/binned_outputs/square_008um/", "filtered_feature_bc_matrix.h5"


class _Hang(BaseException):
    """A read past its time limit (a BaseException: readers' ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _guarded(seconds: float = 30.0, extra_bytes: int = 2 << 30):
    """Cap the address space at its current size + ``extra_bytes`` (Linux) and the time at ``seconds``."""
    cap = None
    with contextlib.suppress(ImportError, OSError, StopIteration, ValueError):
        import resource

        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
        cap = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, cap[1]))  # ValueError past the hard limit
    alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if alarm:
        def _stop(*_):
            raise _Hang(f"still running after {seconds} s")
        handler = signal.signal(signal.SIGALRM, _stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, handler)
        if cap is not None:
            with contextlib.suppress(ValueError):
                resource.setrlimit(resource.RLIMIT_AS, cap)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def _invalid_anndata(adata, strict_x: bool = True) -> str | None:
    """Why ``adata`` breaks the reader conventions (float32 finite CSR X for all but h5ad), or None."""
    X = getattr(adata, "X", None)
    if not isinstance(adata, ad.AnnData) or not sp.isspmatrix_csr(X) or (strict_x and X.dtype != np.float32):
        return f"not an AnnData with a CSR float32 X: {type(adata).__name__} {type(X).__name__}"
    try:
        X.check_format(full_check=True)
    except ValueError as exc:
        return f"X has a broken CSR structure: {exc}"
    if X.shape != adata.shape or (strict_x and not np.isfinite(X.data).all()):
        return "X has non-finite values or the wrong shape"
    if not (adata.obs_names.is_unique and adata.var_names.is_unique) or "barcode" not in adata.obs:
        return "duplicated names or no obs['barcode']"
    xy = np.asarray(adata.obsm.get("spatial", np.zeros((adata.n_obs, 2))))
    if xy.dtype != np.float64 or xy.shape != (adata.n_obs, 2) or not np.isfinite(xy).all():
        return f"obsm['spatial'] {xy.dtype} {xy.shape} or not finite"
    return None


# ------------------------------------------------------------------------- mutations of any file

def _gz(p: Path) -> bool:
    return p.read_bytes()[:2] == b"\x1f\x8b"


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")


def _write_text(p: Path, text: str | bytes, gz: bool) -> None:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    p.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)


def _flip(p: Path, positions) -> None:
    raw = np.frombuffer(p.read_bytes(), np.uint8).copy()
    raw[np.asarray(positions) % raw.size] ^= 0xA5
    p.write_bytes(raw.tobytes())


def bytes_mutations(path: Path, rng, n_flips: int | None) -> list:
    size = path.stat().st_size
    out = [("missing", lambda p: p.unlink()), ("dir", lambda p: (p.unlink(), p.mkdir(), (p / "f.txt").write_text("x")))]
    out += [(f"trunc{f}", lambda p, f=f: p.write_bytes(p.read_bytes()[: int(p.stat().st_size * f)]))
            for f in (0.0, 0.03, 0.5, 0.99)]
    for k in range(n_flips or 0):
        pos = rng.integers(0, size, size=int(rng.integers(1, 9)))
        out.append((f"flip{k}", lambda p, pos=pos: _flip(p, pos)))
    return out


def _sample(pool: list, n: int | None, rng) -> list:
    return pool if n is None or n >= len(pool) else [pool[k] for k in sorted(rng.choice(len(pool), n, replace=False))]


def _sep(text: str) -> str:
    head = text.split("\n", 1)[0]
    return "\t" if "\t" in head else "," if "," in head else " "


def _num(text: str) -> bool:
    with contextlib.suppress(ValueError):
        return float(text.strip().strip('"')) is not None
    return False


def _rows(fn):
    """A mutation editing the rows (lists of fields) of a delimited text file, gzipped or not."""
    def apply(p: Path):
        gz, text = _gz(p), _read_text(p)
        sep = _sep(text)
        out = fn([line.split(sep) for line in text.rstrip("\n").split("\n")])
        _write_text(p, "\n".join(sep.join(r) for r in out) + "\n", gz)
    return apply


def _raw(fn):
    return lambda p: _write_text(p, fn(_read_text(p).encode("utf-8")), _gz(p))


def _set_cell(r: int, j: int, value: str):
    return lambda rows: [row if k != r else row[:j % len(row)] + [value] + row[j % len(row) + 1:]
                         for k, row in enumerate(rows)]


def _swap_cols(i: int, j: int, start: int):
    return lambda rows: rows[:start] + [[row[j] if k == i else row[i] if k == j else v for k, v in enumerate(row)]
                                        if max(i, j) < len(row) else row for row in rows[start:]]


def csv_mutations(path: Path, rng, n: int | None) -> list:
    text = _read_text(path)
    sep, n_rows = _sep(text), text.count("\n")
    head = [line.split(sep) for line in text.split("\n", 3)[:2]]
    ncol = len(head[0])
    start = int(len(head) > 1 and not _num(head[0][-1]) and _num(head[1][-1]))  # 1 with a header line
    r = int(rng.integers(start, max(start + 1, n_rows)))
    cols = sorted({0, min(1, ncol - 1), ncol - 1, *map(int, rng.choice(ncol, min(2, ncol), replace=False))})
    pool = []
    for j in cols:
        pool += [(f"{tag}@r{r}c{j}", _rows(_set_cell(r, j, val))) for tag, val in (
            ("str", "abc"), ("nan", "NaN"), ("neg", "-7"), ("empty", ""), ("inf", "inf"), ("big", "1e400"),
            ("frac", "0.5"))]
        pool.append((f"dropcol{j}", _rows(lambda rows, j=j: [row[:j] + row[j + 1:] for row in rows])))
    i, j = sorted(map(int, rng.choice(ncol, 2, replace=False))) if ncol > 1 else (0, 0)
    order = rng.permutation(max(1, n_rows - start))
    pool += [
        (f"swapvals{i},{j}", _rows(_swap_cols(i, j, start))), (f"swapall{i},{j}", _rows(_swap_cols(i, j, 0))),
        ("duprow", _rows(lambda rows: rows + [list(rows[-1])])), ("dropheader", _rows(lambda rows: rows[1:])),
        ("headeronly", _rows(lambda rows: rows[:1])),
        ("ragged+", _rows(lambda rows: rows[:r] + [rows[r] + ["9"]] + rows[r + 1:])),
        ("ragged-", _rows(lambda rows: rows[:r] + [rows[r][:-1]] + rows[r + 1:])),
        ("shuffle", _rows(lambda rows: rows[:start] + [rows[start:][k % len(rows[start:])] for k in order])),
        ("blankline", _rows(lambda rows: rows[:r] + [[""]] + rows[r:])),
        ("crlf", _rows(lambda rows: [row[:-1] + [row[-1] + "\r"] for row in rows])),
        ("bom", _raw(lambda b: b"\xef\xbb\xbf" + b)), ("latin1", _raw(lambda b: b.replace(b"\n", b"\xe9\n", 3))),
        ("nul", _raw(lambda b: b.replace(b"\n", b"\x00\n", 2))),
        ("gz-toggle", lambda p: _write_text(p, _read_text(p), not _gz(p)))]
    return _sample(pool, n, rng)


def _json(fn):
    return lambda p: p.write_text(out if isinstance(out := fn(json.loads(p.read_text())), str) else json.dumps(out))


def _set_key(key, value):
    return lambda obj: {**{k: v for k, v in obj.items() if k != key}, **({} if value is _set_key else {key: value})}


def json_mutations(path: Path, rng, n: int | None) -> list:
    pool = [("list", _json(lambda o: [o])), ("string", _json(lambda o: '"abc"')), ("emptyobj", _json(lambda o: {})),
            ("garbage", _json(lambda o: json.dumps(o) + "}x")), ("nested", _json(lambda o: {"a": o}))]
    for k in sorted(json.loads(path.read_text())):
        pool += [(f"{tag}:{k}", _json(_set_key(k, val))) for tag, val in (
            ("str", "abc"), ("null", None), ("neg", -1.5), ("zero", 0), ("nan", float("nan")), ("inf", float("inf")),
            ("list", [1.0]), ("bool", True), ("huge", 1e300), ("del", _set_key))]
    return _sample(pool, n, rng)


# ------------------------------------------------------------------------------------------ HDF5

def _h5(fn):
    def apply(p: Path):
        with h5py.File(p, "r+") as f:
            fn(f)
    return apply


def _replace(name: str, make):
    """Replace dataset ``name`` by ``make(old values)`` (an array or create_dataset keywords), attrs kept."""
    def fn(f):
        old, attrs = f[name][()], dict(f[name].attrs)
        del f[name]
        new = make(old)
        ds = f.create_dataset(name, **(new if isinstance(new, dict) else {"data": new}))
        for k, v in attrs.items():
            ds.attrs[k] = v
    return fn


def _huge(old):
    """A dataset declaring 10^12 rows (chunked, nothing written: the file stays small)."""
    old = np.asarray(old)
    tail = old.shape[1:] if old.ndim else ()
    dtype = old.dtype if old.dtype.kind != "O" else h5py.string_dtype()
    return {"shape": (HUGE, *tail), "dtype": dtype, "chunks": (1024, *tail)}


def _group(name: str):
    return lambda f: (f.__delitem__(name), f.create_group(name))


def _setitem(name: str, fn):
    return lambda f: f[name].__setitem__(Ellipsis, fn(f[name][()].copy()))


def dataset_mutations(names: list[str]) -> list:
    """Generic changes of each HDF5 dataset in ``names``."""
    out = []
    for n in names:
        out += [(f"del:{n}", _h5(lambda f, n=n: f.__delitem__(n))), (f"group:{n}", _h5(_group(n))),
                (f"str:{n}", _h5(_replace(n, lambda o: np.full(np.shape(o) or (1,), b"x")))),
                (f"nan:{n}", _h5(_replace(n, lambda o: np.full(np.shape(o), np.nan)))),
                (f"short:{n}", _h5(_replace(n, lambda o: np.asarray(o)[:-1] if np.ndim(o) else np.asarray([o])))),
                (f"2d:{n}", _h5(_replace(n, lambda o: np.stack([np.atleast_1d(o)] * 2, axis=1)))),
                (f"scalar:{n}", _h5(_replace(n, lambda o: np.atleast_1d(o)[0]))), (f"huge:{n}", _h5(_replace(n, _huge)))]
    return out


def tenx_mutations() -> list:
    """Changes of a Cell Ranger v3 HDF5 matrix that break (or not) its CSC structure."""
    i64, rep = np.int64, lambda n, fn: _h5(_replace("matrix/" + n, fn))  # noqa: E731
    put = lambda n, fn: _h5(_setitem("matrix/" + n, fn))  # noqa: E731
    names = ["matrix/" + k for k in ("data", "indices", "indptr", "shape", "barcodes", "features/id")]
    return dataset_mutations(names) + [
        ("shape=1e12", rep("shape", lambda a: np.array([HUGE, HUGE], i64))), ("shape=neg", rep("shape", lambda a: -a)),
        ("shape=3", rep("shape", lambda a: np.r_[a, 1])), ("shape=float", rep("shape", lambda a: a + 0.5)),
        ("indptr=float", rep("indptr", lambda a: a + 0.25)),
        ("indptr=1e12", rep("indptr", lambda a: np.r_[a[:-1].astype(i64), HUGE])),
        ("indices=1e12", rep("indices", lambda a: np.r_[a[:-1].astype(i64), HUGE])),
        ("data=nan", rep("data", lambda a: np.r_[np.nan, a[1:]])), ("data=inf", rep("data", lambda a: np.full(a.shape, np.inf))),
        ("indptr-dec", put("indptr", lambda a: np.r_[a[:1], a[2:3], a[1:2], a[3:]] if a[2] > a[1] else a[::-1])),
        ("indptr-last+1", put("indptr", lambda a: np.r_[a[:-1], a[-1] + 1])),
        ("indptr-first=1", put("indptr", lambda a: np.r_[1, a[1:]])),
        ("indptr-mid-over", put("indptr", lambda a: np.r_[a[:2], a[-1] + 5, a[3:]])),
        ("indices-oob", put("indices", lambda a: np.r_[a[:-1], 10**6])), ("indices-neg", put("indices", lambda a: -a)),
        ("indices-unsorted", put("indices", lambda a: np.r_[a[1::-1], a[2:]])),
        ("indices-dup", put("indices", lambda a: np.r_[a[0], a[0], a[2:]])), ("data-neg", put("data", lambda a: -a)),
        ("barcodes-dup", put("barcodes", lambda a: np.r_[a[1:2], a[1:]])),
        ("barcodes-utf8", put("barcodes", lambda a: np.r_[np.array([b"\xff\xfe-1"], a.dtype), a[1:]])),
        ("ids-dup", put("features/id", lambda a: np.r_[a[1:2], a[1:]])),
        ("no-gex", put("features/feature_type", lambda a: np.full(a.shape, b"Antibody Capture", a.dtype))),
        ("del:matrix", _h5(lambda f: f.__delitem__("matrix"))),
        ("matrix=dataset", _h5(lambda f: (f.__delitem__("matrix"), f.create_dataset("matrix", data=[1])))),
        ("attr-utf8", _h5(lambda f: f.attrs.__setitem__("software_version", np.bytes_(b"\xff\xfe"))))]


def h5ad_mutations(path: Path, rng, n: int | None) -> list:
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visititems(lambda k, o: names.append(k) if isinstance(o, h5py.Dataset) else None)
    shape = lambda v: _h5(lambda f: f["X"].attrs.__setitem__("shape", np.array(v, np.int64)))  # noqa: E731
    huge_x = lambda f: (f.__delitem__("X"), f.create_dataset("X", shape=(10**6,) * 2, dtype="f4", chunks=(64, 64)))  # noqa
    return _sample(dataset_mutations(names), n, rng) + [
        ("X.shape=1e12", shape([HUGE, HUGE])), ("X.shape=1e12,n", shape([HUGE, 1999])), ("X.shape=neg", shape([-1, 1999])),
        ("X=csc", _h5(lambda f: f["X"].attrs.__setitem__("encoding-type", "csc_matrix"))), ("X=dense-huge", _h5(huge_x)),
        ("X.indices-oob", _h5(_setitem("X/indices", lambda a: np.r_[a[:-1], 10**6]))),
        ("obsp-indices-long", _h5(_replace("obsp/distances/indices", lambda a: np.r_[a, a]))),
        ("obs-dup", _h5(_setitem("obs/_index", lambda a: np.r_[a[1:2], a[1:]]))),
        ("spatial-nan", _h5(_replace("obsm/spatial", lambda a: np.r_[[[np.nan, 1.0]], a[1:]]))),
        ("spatial-str", _h5(_replace("obsm/spatial", lambda a: np.full(a.shape, b"x")))),
        ("no-encoding", _h5(lambda f: f.attrs.__delitem__("encoding-type")))]


def _mtx(banner=None, size=None, entry=None, insert=None):
    """Edit a MatrixMarket file's banner, size line (as ints) or first entry, or insert a line before the size."""
    def apply(p: Path):
        gz, lines = _gz(p), _read_text(p).split("\n")
        k = next(i for i, line in enumerate(lines) if not line.startswith("%"))
        dims, first = [int(v) for v in lines[k].split()], lines[k + 1].split()
        lines[0] = banner(lines[0].split()) if banner else lines[0]
        lines[k] = " ".join(map(str, size(dims))) if size else lines[k]
        lines[k + 1] = " ".join(entry(first, dims)) if entry else lines[k + 1]
        _write_text(p, "\n".join(lines[:k] + ([insert] if insert else []) + lines[k:]), gz)
    return apply


def mtx_mutations() -> list:
    E, field = 10**12, lambda v: (lambda b: " ".join(b[:3] + [v] + b[4:]))  # noqa: E731
    return [("rows=1e12", _mtx(size=lambda s: [E, *s[1:]])), ("cols=1e12", _mtx(size=lambda s: [s[0], E, s[2]])),
            ("nnz=1e12", _mtx(size=lambda s: [*s[:2], E])), ("all=1e12", _mtx(size=lambda s: [E, E, E])),
            ("nnz+1", _mtx(size=lambda s: [*s[:2], s[2] + 1])), ("nnz-1", _mtx(size=lambda s: [*s[:2], s[2] - 1])),
            ("size=2", _mtx(size=lambda s: s[:2])), ("size=neg", _mtx(size=lambda s: [-s[0], *s[1:]])),
            ("array-huge", _mtx(banner=lambda b: "%%MatrixMarket matrix array real general", size=lambda s: [10**6] * 2)),
            ("complex", _mtx(banner=field("complex"))), ("pattern", _mtx(banner=field("pattern"))),
            ("symmetric", _mtx(banner=lambda b: " ".join(b[:4] + ["symmetric"]))),
            ("nobanner", _mtx(banner=lambda b: "% no banner")), ("comment", _mtx(insert="% a comment")),
            ("entry-row-oob", _mtx(entry=lambda e, s: [str(s[0] + 1), *e[1:]])),
            ("entry-zero", _mtx(entry=lambda e, s: ["0", *e[1:]])), ("entry-short", _mtx(entry=lambda e, s: e[:1]))] + [
            (f"entry-{v}", _mtx(entry=lambda e, s, v=v: [*e[:2], v])) for v in ("-3", "nan", "x")]


def _ihdr(width=None, height=None, depth=None, color=None):
    """Rewrite a PNG's IHDR chunk (with a valid CRC, so that only the values are wrong)."""
    def apply(p: Path):
        raw = bytearray(p.read_bytes())
        for off, v, fmt in ((16, width, ">I"), (20, height, ">I"), (24, depth, ">B"), (25, color, ">B")):
            if v is not None:
                raw[off:off + struct.calcsize(fmt)] = struct.pack(fmt, v)
        raw[29:33] = (zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
        p.write_bytes(bytes(raw))
    return apply


FAMILIES = {"bytes": bytes_mutations, "csv": csv_mutations, "json": json_mutations, "h5ad": h5ad_mutations,
            "tenx": lambda p, rng, n: _sample(tenx_mutations(), n, rng),
            "mtx": lambda p, rng, n: _sample(mtx_mutations(), n, rng),
            "png": lambda p, rng, n: _sample([
                ("ihdr-huge", _ihdr(100_000, 100_000)), ("ihdr-wide", _ihdr(2**31 - 1, 1)), ("ihdr-zero", _ihdr(0, 0)),
                ("ihdr-depth", _ihdr(depth=3)), ("ihdr-color", _ihdr(color=5)), ("ihdr-16bit", _ihdr(depth=16))], n, rng)}


def mutations(path: Path, spec: str, rng) -> list:
    """The mutations of ``spec``, e.g. ``"bytes:1 csv:10 png"`` (family:count, no count = all)."""
    out = []
    for item in spec.split():
        kind, _, n = item.partition(":")
        out += FAMILIES[kind](path, rng, int(n) if n else None)
    return out


# ------------------------------------------------------------------------------ fixtures (real data)

def _copytree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def build_subset(shared: Path, dst: Path, which: str) -> None:
    """Real inputs cut to a few hundred cells, genes or spots (same layouts) so that each read is fast."""
    import scipy.io

    dst.mkdir(parents=True)
    if which in ("xenium", "10x_mtx"):  # Xenium mouse brain, first 300 cells / the scanpy Visium matrix as .mtx
        src = shared / ("xenium_mouse_brain/cell_feature_matrix.h5" if which == "xenium" else SCANPY / H5)
        with h5py.File(src, "r") as f:
            g = f["matrix"]
            X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=tuple(g["shape"][()]))[:, :300]
            if which == "10x_mtx":
                buf = io.BytesIO()
                scipy.io.mmwrite(buf, sp.coo_matrix(X.astype(np.int64)), field="integer")
                (dst / "matrix.mtx").write_bytes(buf.getvalue())
                rows = zip(*(np.char.decode(g["features"][k][()]) for k in ("id", "name", "feature_type")))
                _write_text(dst / "features.tsv.gz", "".join("\t".join(r) + "\n" for r in rows), True)
                (dst / "barcodes.tsv").write_text("".join(b.decode() + "\n" for b in g["barcodes"][()]))
                return
            with h5py.File(dst / "cell_feature_matrix.h5", "w") as out:
                out.attrs["filetype"] = "matrix"
                for k, v in (("data", X.data), ("indices", X.indices), ("indptr", X.indptr),
                             ("shape", np.array(X.shape, np.int32)), ("barcodes", g["barcodes"][:300])):
                    out.create_dataset(f"matrix/{k}", data=v.astype(g[k].dtype), compression="gzip")
                f.copy(g["features"], out["matrix"])
        lines = _read_text(shared / "xenium_mouse_brain" / "cells.csv.gz").split("\n")[:301]
        _write_text(dst / "cells.csv.gz", "\n".join(lines) + "\n", True)
    elif which == "mob":  # MOB replicate 11: 262 spots x 300 genes (+ x, y) and the spots table
        src = shared / "mob_rep11"
        lines = _read_text(src / "Rep11_MOB_counts_spots_x_genes.tsv.gz").rstrip("\n").split("\n")
        _write_text(dst / "Rep11_MOB_counts_spots_x_genes.tsv.gz",
                    "".join("\t".join(line.split("\t")[:303]) + "\n" for line in lines), True)
        shutil.copy(src / "Rep11_MOB_spots.tsv", dst)
    elif which == "giotto":  # Giotto prostate: 150 genes x the first 400 (NP) spots, full locs and metadata
        src = shared / "giotto" / "Visium_multisample_prostate"
        lines = _read_text(src / "expression_matrix.txt.gz").split("\n")[:151]
        _write_text(dst / "expression_matrix.txt.gz",
                    "".join(" ".join(line.split(" ")[: 400 + (i > 0)]) + "\n" for i, line in enumerate(lines)), True)
        for name in ("spatial_locs.txt", "cell_metadata.txt"):
            shutil.copy(src / name, dst)
    else:  # breast cancer layers: 400 genes x all 1,031 spots, MatrixMarket + genes + spots tables
        src = shared / "breast_cancer_layers"
        buf = io.BytesIO()
        scipy.io.mmwrite(buf, scipy.io.mmread(gzip.open(src / "matrix_genes_x_spots.mtx.gz")).tocsr()[:400].tocoo(),
                         field="integer")
        _write_text(dst / "matrix_genes_x_spots.mtx.gz", buf.getvalue(), True)
        (dst / "genes.tsv").write_text("\n".join((src / "genes.tsv").read_text().split("\n")[:400]) + "\n")
        shutil.copy(src / "spots.tsv", dst)


def _copy_of(rel: str | Path, drop: tuple[str, ...] = (), platform: bool = False):
    """A builder copying ``rel`` (a file or folder of the shared data, or of tests/data/platforms)."""
    def build(shared, dst: Path) -> None:
        src = (PLATFORMS if platform else shared) / rel
        _copytree(src, dst) if src.is_dir() else (dst.mkdir(parents=True), shutil.copy(src, dst))
        for name in drop:
            (dst / name).unlink()
    return build


@dataclass
class Case:
    name: str
    build: Callable  # (shared data folder or None, destination) -> writes the fixture copy
    loc: str  # the input location inside the copy ("" = the copy itself)
    plan: dict  # file inside the copy -> mutation spec (see ``mutations``)
    modality: str = "spatial-bin"
    select: str | None = None
    shared: bool = True  # needs ../shared/data

    def read(self, root: Path):
        return eio.read_sample(root / self.loc, modality=self.modality, sample=SAMPLE, select=self.select)


_sub = lambda which: partial(build_subset, which=which)  # noqa: E731
CASES = [
    Case("10x_h5", _copy_of(SCANPY / H5), H5, {H5: "bytes:3 tenx"}, "rna"),
    Case("10x_mtx", _sub("10x_mtx"), "", {"matrix.mtx": "bytes:1 mtx", "features.tsv.gz": "bytes csv:4",
                                          "barcodes.tsv": "csv:4"}, "rna"),
    # the 2000 x 2000 hires image takes ~1 s to decode: dropped from the copy (the lowres one is read and checked)
    Case("visium", _copy_of(SCANPY, drop=("spatial/tissue_hires_image.png",)), "", {
        H5: "tenx:4", "spatial/tissue_positions_list.csv": "bytes:1 csv:9",
        "spatial/scalefactors_json.json": "bytes json:7", "spatial/tissue_lowres_image.png": "bytes:1 png"}),
    Case("dlpfc", _copy_of("dlpfc/151673"), "", {"spatial/tissue_lowres_image.png": "png:1",
                                                  "spatial/tissue_positions_list.csv": "csv:1"}),
    Case("visium_hd", _copy_of("visium_hd", platform=True), "", {
        SQ8 + H5: "tenx:5", SQ8 + "spatial/tissue_positions.csv": "bytes:1 csv:9",
        SQ8 + "spatial/scalefactors_json.json": "bytes json:6", SQ8 + "spatial/tissue_lowres_image.png": "bytes:1"},
        shared=False),
    Case("xenium", _sub("xenium"), "", {"cell_feature_matrix.h5": "bytes:1 tenx:5", "cells.csv.gz": "bytes:2 csv:9"},
         "spatial-cell"),
    Case("merscope", _copy_of("merscope", platform=True), "", {"cell_by_gene.csv": "bytes:1 csv:8",
                                                                "cell_metadata.csv": "bytes:1 csv:8"},
         "spatial-cell", shared=False),
    Case("cosmx", _copy_of("cosmx", platform=True), "", {"Fixture_exprMat_file.csv": "bytes:1 csv:8",
                                                          "Fixture_metadata_file.csv": "bytes:1 csv:8"},
         "spatial-cell", shared=False),
    Case("table_mob", _sub("mob"), "", {"Rep11_MOB_counts_spots_x_genes.tsv.gz": "bytes:2 csv:8",
                                        "Rep11_MOB_spots.tsv": "csv:5"}),
    Case("table_giotto", _sub("giotto"), "", {"expression_matrix.txt.gz": "bytes:1 csv:5",
                                              "spatial_locs.txt": "bytes csv:4", "cell_metadata.txt": "csv:4"},
         select="list_ID=NP"),
    Case("table_mtx", _sub("mtx"), "", {"matrix_genes_x_spots.mtx.gz": "bytes:1 mtx:7", "genes.tsv": "csv:3",
                                        "spots.tsv": "bytes csv:4"}),
    Case("h5ad", _copy_of("visium_fixtures/squidpy_test_data.h5ad"), "squidpy_test_data.h5ad",
         {"squidpy_test_data.h5ad": "bytes:2 h5ad:6"}),
]


# -------------------------------------------------------------------------------------------- runner

def _restore(pristine: Path, root: Path, rel: str) -> None:
    p = root / rel
    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.copy2(pristine / rel, p)


def attempt(read: Callable, root: Path, work: Path, label: str, invalid=_invalid_anndata) -> tuple[str, str | None]:
    """(outcome, failure or None) of ``read(root)`` on a mutated copy; ``work`` must stay unchanged."""
    before, failure = _snapshot(work), None
    try:
        with _guarded():
            result = read(root)
    except ExpkitError as exc:
        msg, cause = str(exc), exc
        outcome = f"{type(exc).__name__}: {msg.splitlines()[0][:200]}"
        if SAMPLE not in msg or str(root) not in msg:
            failure = f"{label}: the message does not name the sample and a file: {msg[:300]}"
        while cause is not None and failure is None:  # a giant allocation tried, then wrapped, is still one
            failure = f"{label}: MemoryError behind the error: {msg[:200]}" if isinstance(cause, MemoryError) else None
            cause = cause.__cause__ or cause.__context__
    except (Exception, _Hang) as exc:  # noqa: BLE001 - any other exception is what the fuzzing looks for
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = f"CRASH {type(exc).__name__}"
        failure = f"{label}: {type(exc).__name__}: {str(exc)[:200]} ({Path(frame.filename).name}:{frame.lineno})"
    else:
        problem = invalid(result)
        outcome = "valid" if problem is None else f"INVALID {problem}"
        failure = None if problem is None else f"{label}: returned a result breaking the conventions: {problem}"
    if _snapshot(work) != before:
        failure = f"{failure or label}: the read wrote to the input folder"
    return outcome, failure


def run_case(case: Case, shared: Path | None, tmp: Path, log=lambda line: None) -> tuple[list, int, list]:
    """Every mutation of ``case`` in turn: (failures, reads, [(file, label, mutation) that raised])."""
    pristine, work = tmp / "pristine", tmp / "work"
    case.build(shared, pristine)
    _copytree(pristine, root := work / "in")
    failures, raised, n = [], [], 0
    invalid = lambda a: _invalid_anndata(a, strict_x=case.name != "h5ad")  # noqa: E731 (h5ad keeps X's dtype)
    for rel, spec in case.plan.items():
        rng = np.random.default_rng([SEED, zlib.crc32(f"{case.name}/{rel}".encode())])
        for label, mutate in mutations(pristine / rel, spec, rng):
            _restore(pristine, root, rel)
            mutate(root / rel)
            if (root / rel).is_file() and (root / rel).read_bytes() == (pristine / rel).read_bytes():
                continue  # the mutation changed nothing (e.g. NaN into an integer dataset)
            label = f"{case.name}:{rel}:{label}"
            outcome, failure = attempt(case.read, root, work, label, invalid)
            n += 1
            log(f"{'FAIL' if failure else 'ok  '} {label} -> {outcome}")
            if failure:
                failures.append(failure)
            elif not outcome.startswith("valid"):
                raised.append((rel, label, mutate))
        _restore(pristine, root, rel)
    return failures, n, raised


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fuzzed_reader(case, request, tmp_path):
    shared = request.getfixturevalue("shared_data") if case.shared else None
    failures, n, raised = run_case(case, shared, tmp_path)
    assert not failures, f"{len(failures)} of {n} fuzzed reads misbehaved:\n" + "\n".join(failures)
    assert raised, f"{case.name}: {n} reads, none refused: the mutations do not reach the reader"
    # create_experiment on a fuzzed input: an expkit error naming the sample, no experiment folder, input unchanged
    rel, label, mutate = raised[len(raised) // 2]
    root, out = tmp_path / "work" / "in", tmp_path / "expm"
    mutate(root / rel)
    before = _snapshot(tmp_path / "work")
    table = pd.DataFrame([dict(sample=SAMPLE, modality=case.modality, batch="b", group="g", taxa="hsa",
                               location=str(root / case.loc), select=case.select or "")])
    with _guarded(), pytest.raises(ExpkitError, match=SAMPLE):
        ek.create_experiment(table, out)
    assert not out.exists() and _snapshot(tmp_path / "work") == before, f"{label}: create_experiment wrote"


def test_fuzzing_is_seeded(tmp_path):
    """Same seed, same mutations (labels and resulting bytes)."""
    src, runs = PLATFORMS / "merscope" / "cell_metadata.csv", []
    for k in range(2):
        for label, mutate in mutations(src, "bytes:2 csv:9", np.random.default_rng(SEED)):
            _restore(src.parent, tmp_path, src.name)
            mutate(tmp_path / src.name)
            runs.append((k, label, _snapshot(tmp_path).get(src.name, ("-",))[0]))
    assert [r[1:] for r in runs if r[0] == 0] == [r[1:] for r in runs if r[0] == 1] and len(runs) == 2 * 17


def test_attempt_flags_misbehaving_readers(tmp_path):
    """The harness itself: a foreign exception, an error naming no file or wrapping a MemoryError, a write into the
    input or a bad AnnData are failures; a named expkit error is not; the cap turns a giant allocation into one."""
    (root := tmp_path / "in").mkdir()

    def raise_(exc, cause=None):
        raise exc from cause
    good = ad.AnnData(sp.csr_matrix(np.ones((2, 2), np.float32)), obs=pd.DataFrame({"barcode": list("ab")}, list("ab")))
    assert attempt(lambda r: raise_(ReaderError(f"sample '{SAMPLE}', file '{r}/f': bad")), root, tmp_path, "")[1] is None
    assert attempt(lambda r: good, root, tmp_path, "")[1] is None
    for reader in (lambda r: raise_(KeyError("x")), lambda r: raise_(ReaderError("bad")),
                   lambda r: raise_(ReaderError(f"sample '{SAMPLE}', file '{r}/f': bad"), MemoryError()),
                   lambda r: ((r / "new").write_text("y"), good)[1], lambda r: ad.AnnData(np.ones((2, 2), np.float32))):
        assert attempt(reader, root, tmp_path, "")[1] is not None
    if Path("/proc/self/status").exists():
        with pytest.raises(MemoryError), _guarded(extra_bytes=1 << 30):
            np.ones(4 << 30, dtype=np.uint8)
