"""Where per-sample method calls run: in this process (default), in a local process pool, or on a Dask cluster.

>>> with ek.executor("dask", address=None, n_workers=2):     # a LocalCluster; or address="tcp://..."
...     expm.spatial_cell.spatial_svg_spatialde(run_on_samples=True, layer="counts")

Inside the block, each saved, unchanged sample of a per-sample method (kind "sample") becomes one task: the
worker reads the sample's file from the experiment folder itself, runs the plain function, and sends back only
what changed (new or replaced ``obs`` / ``var`` columns, ``obsm`` / ``obsp`` / ``layers`` / ``varm`` / ``uns``
entries, ``X``) with the function's return value; the driver merges that into the sample and marks it changed.
No sample data goes through the scheduler beyond those results. Samples changed in memory since the last
save, joint methods and functions that cannot be imported by name (lambdas) run here, as before. A failed task
is retried once; samples that still fail are reported together after the others have finished (their results
kept). ``"process"`` uses a ``concurrent.futures`` process pool (no extra dependency); ``"dask"`` needs
``pip install expkit[dask]``.
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Iterator

from ..errors import InputError

KINDS = ("serial", "process", "dask")
MAPPINGS = ("obsm", "obsp", "layers", "varm", "uns")
_current = None


class _Pool:
    def __init__(self, kind: str, address, n_workers: int, options: dict):
        self.kind, self._own = kind, None
        if kind == "process":
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"))
        else:
            try:
                from dask.distributed import Client, LocalCluster
            except ImportError as exc:
                raise InputError("executor('dask') needs dask.distributed: pip install expkit[dask]") from exc
            if address is None:
                self._own = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None, **options)
                address = self._own
            self._pool = Client(address)

    def submit(self, fn, *args):
        if self.kind == "dask":
            return self._pool.submit(fn, *args, pure=False)
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self.kind == "dask":
            self._pool.close()
            if self._own is not None:
                self._own.close()
        else:
            self._pool.shutdown()


@contextmanager
def executor(kind: str = "dask", *, address=None, n_workers: int = 2, **options) -> Iterator[object]:
    """Run the per-sample methods called inside the block on ``kind`` ("serial", "process" or "dask";
    ``address``: a Dask scheduler address or cluster object, None for a LocalCluster of ``n_workers``)."""
    global _current
    if kind not in KINDS:
        raise InputError(f"executor kind must be one of {KINDS}, not {kind!r}")
    if not isinstance(n_workers, int) or n_workers < 1:
        raise InputError(f"n_workers must be a positive integer, not {n_workers!r}")
    pool = None if kind == "serial" else _Pool(kind, address, n_workers, options)
    previous, _current = _current, pool
    try:
        yield pool
    finally:
        _current = previous
        if pool is not None:
            pool.close()


def current():
    """The active pool, or None (run here)."""
    return _current


def target_of(func) -> str | None:
    """``module:qualname`` when ``func`` can be imported by name on a worker, else None."""
    module, qual = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or "<" in qual or module == "__main__":
        return None
    try:
        obj = import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qual}" if obj is func else None


# ------------------------------------------------------------------------------------------- the worker side
def _snapshot(adata):
    return {"obs": adata.obs.copy(), "var": adata.var.copy(), "X": id(adata.X),
            **{slot: {k: id(v) for k, v in getattr(adata, slot).items()} for slot in MAPPINGS}}


def _delta(before: dict, adata) -> dict:
    """What the call added, replaced or removed (only that travels back)."""
    out = {"X": adata.X if id(adata.X) != before["X"] else None}
    for slot in ("obs", "var"):
        old, new = before[slot], getattr(adata, slot)
        cols = [c for c in new.columns if c not in old.columns or not new[c].equals(old[c])]
        out[slot] = new[cols].copy()
        out[f"{slot}.removed"] = [c for c in old.columns if c not in new.columns]
    for slot in MAPPINGS:
        old, new = before[slot], getattr(adata, slot)
        out[slot] = {k: v for k, v in new.items() if k not in old or old[k] != id(v)}
        out[f"{slot}.removed"] = [k for k in old if k not in new]
    return out


def remote_call(path: str, target: str, kwargs: dict, image_store: str | None, what: str):
    """Run ``target`` on the sample file ``path`` (on a worker); returns (result, delta)."""
    from . import store

    adata = store.read_h5ad(Path(path), what=what)
    module, qual = target.split(":")
    func = import_module(module)
    for part in qual.split("."):
        func = getattr(func, part)
    if image_store is not None:
        from ..io.images import ImageStore

        kwargs = {**kwargs, "image_store": ImageStore(image_store)}
    before = _snapshot(adata)
    result = func(adata, **kwargs)
    return result, _delta(before, adata)


def apply_delta(adata, delta: dict) -> None:
    """Merge a worker's delta into the driver's sample."""
    if delta["X"] is not None:
        adata.X = delta["X"]
    for slot in ("obs", "var"):
        frame = getattr(adata, slot)
        for c in delta[f"{slot}.removed"]:
            del frame[c]
        for c in delta[slot].columns:
            frame[c] = delta[slot][c].reindex(frame.index)
    for slot in MAPPINGS:
        mapping = getattr(adata, slot)
        for k in delta[f"{slot}.removed"]:
            del mapping[k]
        for k, v in delta[slot].items():
            mapping[k] = v
