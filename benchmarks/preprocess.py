"""Preprocessing benchmark: expkit next to scanpy, step by step, on the shared real data.

    # expkit alone (its own venv):
    EXPKIT_SHARED_DATA=/work/shared/data /work/main/.venv/bin/python benchmarks/preprocess.py
    # with scanpy side by side (a venv that has scanpy + scikit-misc + torch; expkit from the checkout):
    EXPKIT_SHARED_DATA=/work/shared/data PYTHONPATH=. /work/peers/.venv/bin/python benchmarks/preprocess.py

Options: ``--threads N`` (default 1: BLAS/OpenMP/torch threads), ``--gpu`` (expkit steps on CUDA),
``--datasets xenium_mouse_brain dlpfc_merged``, ``--steps qc log_normalize ...``, ``--no-scanpy``,
``--tracemalloc`` (a second run of every step under tracemalloc for the Python-heap peak).

Each (dataset, tool) pair runs in a fresh subprocess, so that neither tool inherits the other's freed
memory; there the dataset is loaded once and the steps run in order on the same AnnData (each step
sees the previous steps' results, as in an analysis). Per step it reports wall time and the peak
resident-memory increase over the step's start (RSS sampled every 2 ms, so torch and BLAS buffers
count too; all steps first run once on a ~400-cell slice so that imports, numba compilation and lazily
loaded kernels are not measured), and with ``--tracemalloc`` the tracemalloc peak (numpy/Python allocations only).

Adding a step: append a ``Step(name, expkit_fn, scanpy_fn)`` to ``STEPS``; each fn takes
``(adata, ctx)`` (``ctx``: dataset name, batch key, use_gpu, ...) and returns nothing. Steps that
another step must precede simply come later in the list.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--steps", nargs="*", default=None)
    p.add_argument("--no-scanpy", action="store_true")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("DATASET", "TOOL"), help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be fixed before numpy / torch load their pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import _pp_data as D  # noqa: E402

SHARED = Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


# ------------------------------------------------------------------ datasets

def _xenium():
    x, obs, ids, names = D.xenium(SHARED)
    return D.to_anndata(x, obs, ids, names), {"batch_key": None, "use_hvg": None, "n_top": 100, "taxa": "mouse"}


def _dlpfc_merged():
    x, obs, ids, names, batch = D.dlpfc_merged(SHARED)
    return (D.to_anndata(x, obs, ids, names, batch),
            {"batch_key": "batch", "use_hvg": "hvg", "n_top": 2000, "taxa": "human"})


DATASETS: dict[str, Callable] = {"xenium_mouse_brain": _xenium, "dlpfc_merged": _dlpfc_merged}


def _flags(adata, taxa: str) -> None:
    """mito / ribo var flags from the Ensembl 98 table (what expkit.database.annotate provides)."""
    ann = D.annotation(SHARED, taxa)
    for name in ("mito", "ribo"):
        adata.var[name] = np.asarray(adata.var_names.map(ann[name]).fillna(False), dtype=bool)


# ------------------------------------------------------------------ steps

@dataclass
class Step:
    name: str
    expkit: Callable | None
    scanpy: Callable | None = None
    notes: str = ""


def _ek_qc(a, ctx):
    import expkit.pp as pp

    pp.qc(a)


def _sc_qc(a, ctx):
    import scanpy as sc

    sc.pp.calculate_qc_metrics(a, qc_vars=["mito", "ribo"], percent_top=None, log1p=False, inplace=True)


def _ek_norm(a, ctx):
    import expkit.pp as pp

    pp.log_normalize(a)


def _sc_norm(a, ctx):
    import scanpy as sc

    sc.pp.normalize_total(a)
    sc.pp.log1p(a)


def _ek_hvg(a, ctx):
    import expkit.pp as pp

    pp.select_hvg(a, n_top_genes=ctx["n_top"], batch_key=ctx["batch_key"], use_gpu=ctx["use_gpu"])


def _sc_hvg(a, ctx):
    import scanpy as sc

    sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=ctx["n_top"], layer="counts",
                                batch_key=ctx["batch_key"])


def _ek_pca(a, ctx):
    import expkit.pp as pp

    pp.scale_pca(a, n_comps=50, use_hvg="vst.hvg" if ctx["use_hvg"] else None, use_gpu=ctx["use_gpu"])


def _sc_pca(a, ctx):
    import scanpy as sc

    b = a[:, a.var["highly_variable"].to_numpy()].copy() if ctx["use_hvg"] else a.copy()
    sc.pp.scale(b, max_value=10)
    sc.pp.pca(b, n_comps=50, svd_solver="arpack")
    a.obsm["X_pca"] = b.obsm["X_pca"]


STEPS: list[Step] = [
    Step("qc", _ek_qc, _sc_qc),
    Step("log_normalize", _ek_norm, _sc_norm,
         "expkit keeps counts and writes layers norm + lognorm + X; scanpy overwrites X in place"),
    Step("select_hvg", _ek_hvg, _sc_hvg, "Seurat v3 on counts (batch-aware on dlpfc_merged)"),
    Step("scale_pca", _ek_pca, _sc_pca, "scale (max 10) + 50 PCs; scanpy densifies, expkit stays sparse"),
    # later steps (knn, leiden, umap, ...) go here
]


# ------------------------------------------------------------------ measurement

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident memory above the starting point, sampled by a thread every 2 ms."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class Result:
    dataset: str
    step: str
    tool: str
    seconds: float
    rss_mb: float
    heap_mb: float | None = None
    error: str = field(default="")


def _measure(fn, adata, ctx, tracemalloc_pass: bool):
    import gc

    gc.collect()
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        fn(adata, ctx)
        if ctx.get("use_gpu"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    heap = None
    if tracemalloc_pass:
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        fn(adata, ctx)
        heap = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return secs, mem.delta_mb, heap


def worker(args, name: str, tool: str) -> list[Result]:
    """Run every step of one tool on one dataset in this process."""
    import torch

    torch.set_num_threads(args.threads)
    if tool == "scanpy":
        import scanpy  # noqa: F401  (imported before measuring)
    import expkit.pp  # noqa: F401

    adata, ctx = DATASETS[name]()
    _flags(adata, ctx["taxa"])
    ctx = {**ctx, "dataset": name, "use_gpu": bool(args.gpu and tool == "expkit")}
    print(f"[{name}] {tool}: {adata.n_obs:,} x {adata.n_vars:,}, nnz {adata.X.nnz:,}", file=sys.stderr, flush=True)
    steps = [s for s in STEPS if getattr(s, tool) is not None and (args.steps is None or s.name in args.steps)]
    # warm-up on a small slice: imports, JIT compilation (numba) and lazily loaded torch kernels are
    # one-time costs, kept out of the measurements of both tools
    warm = adata[:: max(1, adata.n_obs // 400)].copy()
    for step in steps:
        try:
            getattr(step, tool)(warm, {**ctx, "n_top": min(ctx["n_top"], warm.n_vars // 2)})
        except Exception:
            pass
    del warm
    out = []
    for step in steps:
        fn = getattr(step, tool)
        try:
            secs, rss, heap = _measure(fn, adata, ctx, args.tracemalloc)
            out.append(Result(name, step.name, tool, secs, rss, heap))
            print(f"    {step.name:<14} {secs:8.2f} s  +{rss:8.1f} MB RSS"
                  + (f"  {heap:8.1f} MB heap" if heap is not None else ""), file=sys.stderr, flush=True)
        except Exception as err:  # keep going: report the failure in the table
            out.append(Result(name, step.name, tool, float("nan"), float("nan"), None, repr(err)))
            print(f"    {step.name:<14} FAILED {err!r}", file=sys.stderr, flush=True)
    return out


def run(args) -> list[Result]:
    import json
    import subprocess

    tools = ["expkit"]
    if not args.no_scanpy:
        try:
            import importlib.util

            if importlib.util.find_spec("scanpy") is not None:
                tools.append("scanpy")
            else:
                print("scanpy not importable: expkit only")
        except ImportError:
            print("scanpy not importable: expkit only")
    results: list[Result] = []
    for name in args.datasets or list(DATASETS):
        for tool in tools:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, tool, "--threads", str(args.threads)]
            cmd += (["--gpu"] if args.gpu else []) + (["--tracemalloc"] if args.tracemalloc else [])
            cmd += (["--steps", *args.steps] if args.steps else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(f"[{name}] {tool}: worker failed with exit code {proc.returncode}")
                continue
            results += [Result(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    return results


def report(results: list[Result]) -> None:
    import pandas as pd

    df = pd.DataFrame([r.__dict__ for r in results])
    if df.empty:
        return
    wide = df.pivot_table(index=["dataset", "step"], columns="tool", values=["seconds", "rss_mb"], sort=False)
    if ("seconds", "scanpy") in wide.columns:
        wide[("ratio", "time scanpy/expkit")] = wide[("seconds", "scanpy")] / wide[("seconds", "expkit")]
        wide[("ratio", "mem scanpy/expkit")] = (wide[("rss_mb", "scanpy")].clip(lower=1)
                                                / wide[("rss_mb", "expkit")].clip(lower=1))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 2):
        print()
        print(wide)
    for s in STEPS:
        if s.notes:
            print(f"  {s.name}: {s.notes}")


def main() -> None:
    args = ARGS
    if args.worker:
        import json

        import expkit

        expkit.settings.progress = False
        print(json.dumps([r.__dict__ for r in worker(args, *args.worker)]))
        return
    import expkit
    import torch

    print(f"expkit {expkit.__version__}, torch {torch.__version__}, threads {args.threads}, "
          f"device {'cuda' if args.gpu and torch.cuda.is_available() else 'cpu'}, data {SHARED}")
    expkit.settings.progress = False
    report(run(args))


if __name__ == "__main__":
    main()
