"""Benchmark: spatial graphs and Moran's I on the shared real data, with squidpy beside when available.

    OMP_NUM_THREADS=1 python benchmarks/spatial_graph.py [--shared ../shared/data]
        [--peers-python /work/peers/.venv/bin/python] [--gpu] [--repeat 3]

Cases (each in a fresh subprocess; the time is the best of ``--repeat`` warm calls, the first call is
reported separately; the permutation case runs once; memory is the increase of the process's peak RSS over its peak after loading the data,
plus the tracemalloc peak of the call, which sees numpy/scipy but not torch allocations):
- knn6 / radius20: spatial_neighbors on the 36,602-cell Xenium mouse brain (kNN k=6; radius 20 um);
- grid: spatial_neighbors on DLPFC 151673 (hex grid, n_neighs=6) from pixel coordinates;
- moran_dlpfc: Moran's I of all 5,000 genes of DLPFC 151673 (median normalize_total + log1p, grid graph);
- moran_xenium: Moran's I of the 248 Xenium genes over the kNN k=6 graph;
- moran_dlpfc_perm: Moran's I with 100 permutations on 500 DLPFC genes.
squidpy runs the same cases (its own spatial_neighbors / spatial_autocorr) in the peers' interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["knn6", "radius20", "grid", "moran_dlpfc", "moran_xenium", "moran_dlpfc_perm"]

CHILD = r"""
import json, os, resource, sys, time, tracemalloc, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, os.path.join(ROOT, "tests")); sys.path.insert(0, ROOT)
from _spatial_data import read_dlpfc, read_xenium, normalize_log1p
import numpy as np

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def load(case):
    if case in ("knn6", "radius20", "moran_xenium"):
        a = read_xenium(SHARED)
    else:
        a = read_dlpfc(SHARED, "151673")
    if case.startswith("moran"):
        a.X = normalize_log1p(a.X)
    return a

a = load(CASE)
genes = None
if CASE == "moran_dlpfc_perm":
    genes = list(a.var_names[np.sort(np.random.default_rng(0).choice(a.n_vars, 500, replace=False))])
if TOOL == "expkit":
    from expkit.spatial import spatial_neighbors, spatial_autocorr
    use_gpu = GPU
    graph = {"knn6": dict(coord_type="generic", n_neighs=6), "radius20": dict(coord_type="generic", radius=20.0),
             "grid": dict(coord_type="grid", n_neighs=6, grid_source="coords")}
    if CASE.startswith("moran"):
        spatial_neighbors(a, **(graph["knn6"] if CASE == "moran_xenium" else graph["grid"]))
        perms = 100 if CASE == "moran_dlpfc_perm" else None
        run = lambda: spatial_autocorr(a, mode="moran", genes=genes, n_perms=perms, seed=0, use_gpu=use_gpu)
    else:
        run = lambda: spatial_neighbors(a, use_gpu=use_gpu, **graph[CASE])
    def sync():
        if use_gpu:
            import torch; torch.cuda.synchronize()
else:
    import squidpy as sq
    a.var_names = a.var["gene"].astype(str); a.var_names_make_unique()
    if genes is not None:
        genes = list(a.var_names[np.sort(np.random.default_rng(0).choice(a.n_vars, 500, replace=False))])
    graph = {"knn6": dict(coord_type="generic", n_neighs=6), "radius20": dict(coord_type="generic", radius=20.0),
             "grid": dict(coord_type="grid", n_neighs=6, n_rings=1)}
    if CASE.startswith("moran"):
        sq.gr.spatial_neighbors(a, **(graph["knn6"] if CASE == "moran_xenium" else graph["grid"]))
        perms = 100 if CASE == "moran_dlpfc_perm" else None
        run = lambda: sq.gr.spatial_autocorr(a, mode="moran", genes=genes, n_perms=perms, seed=0, n_jobs=1,
                                             copy=True, show_progress_bar=False)
    else:
        run = lambda: sq.gr.spatial_neighbors(a, **graph[CASE])
    sync = lambda: None
base = rss_mb()
tracemalloc.start()
t = time.perf_counter(); run(); sync(); first = time.perf_counter() - t
_, tm_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
times = []
for _ in range(REPEAT):
    t = time.perf_counter(); run(); sync(); times.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"first_s": first, "best_s": min(times) if times else first,
                               "peak_rss_increase_mb": max(0.0, rss_mb() - base),
                               "tracemalloc_peak_mb": tm_peak / 2**20, "n_obs": a.n_obs, "n_vars": a.n_vars}))
"""


def run_case(python: str, tool: str, case: str, shared: Path, gpu: bool, repeat: int) -> dict:
    code = (f"ROOT={str(ROOT)!r}; SHARED={str(shared)!r}; CASE={case!r}; TOOL={tool!r}; GPU={gpu!r}; "
            f"REPEAT={repeat!r}\n" + CHILD)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.environ.get("EXPKIT_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--peers-python", default=None, help="interpreter with squidpy (default: this one if it has it)")
    p.add_argument("--gpu", action="store_true", help="run expkit with use_gpu=True")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    args = p.parse_args()
    shared = Path(args.shared).resolve()
    peers = args.peers_python
    if peers is None:
        try:
            import squidpy  # noqa: F401

            peers = sys.executable
        except ImportError:
            peers = None
    print(f"{'tool':<12} {'case':<18} {'first s':>9} {'best s':>9} {'dRSS MB':>9} {'tracemalloc MB':>15}",
          flush=True)

    def show(tool, case, r):
        if "error" in r:
            print(f"{tool:<12} {case:<18} ERROR {r['error']}", flush=True)
            return
        print(f"{tool:<12} {case:<18} {r['first_s']:>9.3f} {r['best_s']:>9.3f} {r['peak_rss_increase_mb']:>9.1f} "
              f"{r['tracemalloc_peak_mb']:>15.1f}", flush=True)

    for case in args.cases:
        repeat = 0 if case.endswith("_perm") else args.repeat  # long: one call
        show("expkit" + ("-gpu" if args.gpu else ""), case,
             run_case(sys.executable, "expkit", case, shared, args.gpu, repeat))
        if peers:
            show("squidpy", case, run_case(peers, "squidpy", case, shared, False, repeat))


if __name__ == "__main__":
    main()
