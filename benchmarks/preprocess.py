"""Analysis-chain benchmark: expkit next to scanpy, step by step and in total, on the shared real data.

The chain: qc -> log_normalize -> select_hvg -> scale_pca -> knn -> leiden -> umap, on the Xenium mouse
brain (36,602 cells x 248 genes) and the two DLPFC sections 151673 + 151674 merged. Matching parameters on
both sides: Seurat v3 HVGs on counts (2,000, batch-aware on DLPFC; all 248 genes on Xenium), scale (max 10)
+ 50 PCs, exact kNN with n_neighbors=15, Leiden (leidenalg RBConfiguration, resolution 1, seed 0),
UMAP (min_dist 0.5, spectral start, 200 epochs above 10,000 cells else 500). The knn / leiden / umap step
functions are those of benchmarks/neighbors.py (which times them alone on a fixed PCA).

    # expkit alone (its own venv):
    EXPKIT_SHARED_DATA=/work/shared/data /work/main/.venv/bin/python benchmarks/preprocess.py
    # with scanpy side by side (a venv that has scanpy + scikit-misc + torch; expkit from the checkout):
    EXPKIT_SHARED_DATA=/work/shared/data PYTHONPATH=. /work/peers/.venv/bin/python benchmarks/preprocess.py

Options: ``--threads N`` (default 1: BLAS/OpenMP/torch threads), ``--gpu`` (expkit steps on CUDA),
``--datasets xenium_mouse_brain dlpfc_merged``, ``--steps qc log_normalize ...``, ``--no-scanpy``,
``--tracemalloc`` (a second run of every step under tracemalloc for the Python-heap peak).
igraph / leidenalg missing from the scanpy venv: ``BENCH_EXTRA_SITE=/work/main/.venv/lib/python3.11/site-packages``
(appended to sys.path, so the venv's own packages win; see benchmarks/neighbors.py).

Each (dataset, tool) pair runs in a fresh subprocess, so that neither tool inherits the other's freed
memory; there the dataset is loaded once and the steps run in order on the same AnnData (each step
sees the previous steps' results, as in an analysis). Per step it reports wall time and the peak
resident-memory increase over the step's start (RSS sampled every 2 ms, so torch and BLAS buffers
count too; all steps first run once on a ~400-cell slice so that imports, numba compilation and lazily
loaded kernels are not measured), the process CPU time (all threads; steadier than wall time on a shared
machine), and with ``--tracemalloc`` the tracemalloc peak (numpy/Python allocations only). The "chain total"
line sums the steps' times; its memory is the peak resident memory over the whole chain above the RSS
after loading (and the absolute peak RSS of the process). The ratio is expkit / scanpy wall time
(<= 1: expkit no slower).

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

from benchmarks import neighbors as NB  # noqa: E402  (knn / leiden / umap steps)

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
    info: Callable | None = None  # (adata, tool) -> a short note printed with the result


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


def _leiden_info(a, tool) -> str:
    key = "leiden" if tool == "expkit" else "sc.leiden"
    return f"{a.obs[key].nunique()} clusters" if key in a.obs else ""


STEPS: list[Step] = [
    Step("qc", _ek_qc, _sc_qc),
    Step("log_normalize", _ek_norm, _sc_norm,
         "expkit keeps counts and writes layers norm + lognorm + X; scanpy overwrites X in place"),
    Step("select_hvg", _ek_hvg, _sc_hvg, "Seurat v3 on counts (batch-aware on dlpfc_merged)"),
    Step("scale_pca", _ek_pca, _sc_pca, "scale (max 10) + 50 PCs; scanpy densifies, expkit stays sparse"),
    Step("knn", NB._e_knn, NB._s_knn,
         f"exact, n_neighbors={NB.K} + UMAP fuzzy graph; expkit torch brute force, scanpy sklearn (exact)"),
    Step("leiden", NB._e_leiden, NB._s_leiden,
         f"leidenalg RBConfiguration, resolution {NB.RESOLUTION}, seed {NB.SEED}, directed, until stable "
         "(the same library call on both sides)", info=_leiden_info),
    Step("umap", NB._e_umap, NB._s_umap, "min_dist 0.5, spectral start; expkit torch, scanpy umap-learn (numba)"),
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
    cpu_s: float = float("nan")
    peak_abs_mb: float = float("nan")
    info: str = ""


def _measure(fn, adata, ctx, tracemalloc_pass: bool):
    import gc

    gc.collect()
    with _PeakRSS() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        fn(adata, ctx)
        if ctx.get("use_gpu"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    heap = None
    if tracemalloc_pass:
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        fn(adata, ctx)
        heap = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return secs, cpu, mem, heap


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
    import gc

    gc.collect()
    chain_start = _rss()
    chain_peak = chain_start
    out = []
    for step in steps:
        fn = getattr(step, tool)
        try:
            secs, cpu, mem, heap = _measure(fn, adata, ctx, args.tracemalloc)
            chain_peak = max(chain_peak, mem.peak)
            info = step.info(adata, tool) if step.info else ""
            out.append(Result(name, step.name, tool, secs, mem.delta_mb, heap, cpu_s=cpu,
                              peak_abs_mb=mem.peak / 2**20, info=info))
            print(f"    {step.name:<14} {secs:8.2f} s  cpu {cpu:8.2f} s  +{mem.delta_mb:8.1f} MB RSS"
                  + (f"  {heap:8.1f} MB heap" if heap is not None else "") + (f"  {info}" if info else ""),
                  file=sys.stderr, flush=True)
        except Exception as err:  # keep going: report the failure in the table
            out.append(Result(name, step.name, tool, float("nan"), float("nan"), None, repr(err)))
            print(f"    {step.name:<14} FAILED {err!r}", file=sys.stderr, flush=True)
    if out:
        ok = all(not r.error for r in out)
        nan = float("nan")
        out.append(Result(name, "chain total", tool, sum(r.seconds for r in out) if ok else nan,
                          (chain_peak - chain_start) / 2**20, None, "" if ok else "a step failed",
                          cpu_s=sum(r.cpu_s for r in out) if ok else nan, peak_abs_mb=chain_peak / 2**20,
                          info=f"{len(out)} steps"))
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


def _fmt(v, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def report(results: list[Result]) -> None:
    """One table per dataset: the steps in order, then the chain total (markdown-compatible)."""
    if not results:
        return
    by = {(r.dataset, r.step, r.tool): r for r in results}
    names = [s.name for s in STEPS] + ["chain total"]
    cols = ("step", "expkit s", "scanpy s", "expkit/scanpy", "expkit cpu s", "scanpy cpu s",
            "expkit peak +MiB", "scanpy peak +MiB", "notes")
    for ds in dict.fromkeys(r.dataset for r in results):
        print(f"\n{ds}\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for step in names:
            e, s = by.get((ds, step, "expkit")), by.get((ds, step, "scanpy"))
            if e is None and s is None:
                continue
            et, st = (e.seconds if e else None), (s.seconds if s else None)
            ratio = et / st if et is not None and st else None
            notes = "; ".join(f"{t} {r.info}" for t, r in (("expkit", e), ("scanpy", s)) if r and r.info
                              and step != "chain total")
            if step == "chain total":
                notes = "abs. peak RSS " + " / ".join(f"{t} {_fmt(r.peak_abs_mb, '.0f')} MiB"
                                                      for t, r in (("expkit", e), ("scanpy", s)) if r)
            errs = "; ".join(f"{t} {r.error}" for t, r in (("expkit", e), ("scanpy", s)) if r and r.error)
            label = f"**{step}**" if step == "chain total" else step
            print(f"| {label} | {_fmt(et, '.2f')} | {_fmt(st, '.2f')} | {_fmt(ratio, '.2f')} | "
                  f"{_fmt(e.cpu_s if e else None, '.2f')} | {_fmt(s.cpu_s if s else None, '.2f')} | "
                  f"{_fmt(e.rss_mb if e else None, '.0f')} | {_fmt(s.rss_mb if s else None, '.0f')} | "
                  f"{'; '.join(x for x in (notes, errs) if x)} |")
    print()
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

    import importlib.metadata as md

    def _v(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    print(f"expkit {expkit.__version__}, torch {torch.__version__}, scanpy {_v('scanpy')}, umap-learn "
          f"{_v('umap-learn')}, leidenalg {_v('leidenalg')}, threads {args.threads}, "
          f"device {'cuda' if args.gpu and torch.cuda.is_available() else 'cpu'}, data {SHARED}")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    expkit.settings.progress = False
    results = run(args)
    print(f"{time.strftime('%H:%M:%S UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(results)


if __name__ == "__main__":
    main()
