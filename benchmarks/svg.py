"""Benchmark of expkit.spatial.svg_spatialde (SpatialDE2 score test) on the shared real data.

    python benchmarks/svg.py                 # every case, each in its own process (peak memory per case)
    python benchmarks/svg.py --case dlpfc    # one case: dlpfc | xenium | genes | grid100k
    python benchmarks/svg.py --case genes --genes 5000,10000   # the gene-scaling case at chosen sizes

The figures in benchmarks/results/svg.md were taken as
    OMP_WAIT_POLICY=PASSIVE python benchmarks/svg.py --case xenium --threads 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/svg.py --case genes --threads 2

Cases
- dlpfc:    DLPFC 151673, 3,639 spots x all 5,000 genes (default kernel space, method="auto" -> approx)
- xenium:   Xenium mouse brain, 36,602 cells x 248 gene-expression features (control probes and codewords dropped)
- genes:    1,500 DLPFC spots x {5k, 10k, 20k, 35k} genes resampled from the real counts (time ~ linear)
- grid100k: a synthetic 317 x 317 grid (100,489 spots) x 8 genes (memory bound check; the default
            kernel space is refused up front, then run without its 2nd SE lengthscale)

Prints wall time, peak resident memory of the process and the number of significant genes (padj < 0.05).
cpu = process CPU time (all threads). The machine is shared: timings are noisy (see docs/svg.md for the figures we measured).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _read_10x_h5(path):
    import h5py
    import scipy.sparse as sp

    with h5py.File(path, "r") as f:
        m = f["matrix"]
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=tuple(m["shape"][:])).T.tocsr()
        barcodes = m["barcodes"][:].astype(str)
        genes = m["features"]["name"][:].astype(str)
        ftype = m["features"]["feature_type"][:].astype(str)
    keep = ftype == "Gene Expression"  # Xenium also lists control probes and codewords
    return X[:, keep], barcodes, genes[keep]


def _dlpfc():
    import pandas as pd

    base = DATA / "dlpfc" / "151673"
    X, barcodes, genes = _read_10x_h5(base / "filtered_feature_bc_matrix_top5000genes.h5")
    pos = pd.read_csv(base / "spatial" / "tissue_positions_list.csv", header=None, index_col=0).loc[barcodes]
    xy = pos[[5, 4]].to_numpy(np.float64)
    X = X.astype(np.float32)
    gk = np.asarray(X.sum(0)).ravel() >= 3
    X, genes = X[:, gk], genes[gk]
    sk = np.asarray(X.sum(1)).ravel() > 10
    return X[sk], xy[sk], genes


def _adata(X, xy, genes):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    a = ad.AnnData(sp.csr_matrix(X, dtype=np.float32), var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    a.var_names_make_unique()
    a.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    return a


def _run(adata, label, **kw):
    from expkit.spatial import svg_spatialde

    t, c = time.perf_counter(), time.process_time()
    svg_spatialde(adata, progress=False, **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    u = adata.uns["spatialde"]
    reps = ", ".join(f"{k}:{v['kind']}" + (f"(r={v['rank']})" if "rank" in v else "")
                     + (f"(nnz/row={v['nnz_per_row']:.0f})" if "nnz_per_row" in v else "")
                     for k, v in u["representation"].items() if k.startswith("SE"))
    print(f"{label:<36s} spots={u['n_spots_tested']:>7d} genes={u['n_genes_tested']:>6d} "
          f"wall={wall:8.2f}s cpu={cpu:8.2f}s peak={_peak_gib():6.2f}GiB significant={int((adata.var['spatialde.padj'] < 0.05).sum()):>6d}"
          f" method={u['params']['method']} [{reps}]", flush=True)
    return wall


def case_dlpfc():
    X, xy, genes = _dlpfc()
    _run(_adata(X, xy, genes), "DLPFC 151673 all genes")


def case_xenium():
    import pandas as pd

    base = DATA / "xenium_mouse_brain"
    X, barcodes, genes = _read_10x_h5(base / "cell_feature_matrix.h5")
    cells = pd.read_csv(base / "cells.csv.gz", index_col=0)
    cells.index = cells.index.astype(str)
    xy = cells.loc[barcodes, ["x_centroid", "y_centroid"]].to_numpy(np.float64)
    _run(_adata(X, xy, genes), "Xenium mouse brain")


GENE_SIZES = (5000, 10000, 20000, 35000)


def case_genes(sizes=GENE_SIZES):
    """1,500 DLPFC 151673 spots (drawn once, seed 0, without replacement, sorted) x g genes.

    The g columns are real DLPFC gene columns drawn uniformly with replacement (seed 0, one draw per size in
    the order 5k, 10k, 20k, 35k, so a size's columns do not depend on which other sizes run) from the 5,000
    genes (those with >= 3 counts); size factors are the totals of the 5,000 real genes of the 1,500 spots,
    the same for every size. Duplicated columns are tested as separate genes.
    """
    X, xy, genes = _dlpfc()
    rng = np.random.default_rng(0)
    spots = np.sort(rng.choice(X.shape[0], 1500, replace=False))
    X, xy = X[spots], xy[spots]
    sf = np.asarray(X.sum(1)).ravel()
    draws = {g: np.random.default_rng([0, g]).choice(X.shape[1], g, replace=True) for g in GENE_SIZES}
    times = {}
    for g in sizes:
        cols = draws[g] if g in draws else np.random.default_rng([0, g]).choice(X.shape[1], g, replace=True)
        a = _adata(X[:, cols], xy, [f"g{i}" for i in range(g)])
        times[g] = _run(a, f"1500 spots x {g} genes", sizefactors=sf, use_cache=False)
        print(f"  {g} genes: {1e3 * times[g] / g:.3f} ms per gene", flush=True)
    per = {g: 1e3 * t / g for g, t in times.items()}
    print("ms per gene: " + ", ".join(f"{g}: {v:.3f}" for g, v in per.items()), flush=True)


def case_grid100k():
    side = 317
    u = np.arange(side, dtype=np.float64)
    xy = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    n = xy.shape[0]
    rng = np.random.default_rng(0)
    s = rng.gamma(5.0, 200.0, n)
    rates = [np.full(n, 1e-3), 1e-3 * np.exp(np.sin(xy[:, 0] / 20.0)), 1e-3 * np.exp(np.cos(xy[:, 1] / 60.0)),
             1e-3 * (1 + (np.hypot(xy[:, 0] - 150, xy[:, 1] - 150) < 40))]
    cols = [rng.poisson(s * r) for r in rates for _ in range(2)]
    X = np.stack(cols, 1).astype(np.float32)
    a = _adata(X, xy, [f"g{i}" for i in range(X.shape[1])])
    from expkit.errors import ResourceError
    from expkit.kernels.spatial_kernels import default_lengthscales

    ls = default_lengthscales(xy)
    try:  # the default space: its 2nd SE lengthscale (~8 spacings) is neither sparse nor low rank here
        _run(a, "synthetic grid 100k, default kernels", sizefactors=s)
    except ResourceError as err:
        print(f"default kernel space refused before starting: {err}", flush=True)
    _run(a, "synthetic grid 100k, SE without l2", sizefactors=s,
         kernel_space={"SE": [ls[0], *ls[2:]], "PER": ls})


CASES = {"dlpfc": case_dlpfc, "xenium": case_xenium, "genes": case_genes, "grid100k": case_grid100k}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genes", default=",".join(map(str, GENE_SIZES)),
                        help="case genes: comma-separated gene counts (default 5000,10000,20000,35000)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "genes":
        case_genes(tuple(int(g) for g in args.genes.split(",")))
        return
    if args.case:
        CASES[args.case]()
        return
    for name in CASES:
        subprocess.run([sys.executable, __file__, "--case", name, "--threads", str(args.threads),
                        "--genes", args.genes], check=False)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
