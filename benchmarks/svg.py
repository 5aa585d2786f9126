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
- grid100k: a synthetic 317 x 317 grid (100,489 spots) x 300 simulated NB genes (200 flat, 100 with known
            patterns), the default kernel space, max_memory=4 GiB (SE: sparse / SKI / low rank)

Prints wall time, peak resident memory of the process (peak; call_peak: of the svg_spatialde call alone,
Linux, from VmHWM reset before the call) and the number of significant genes (padj < 0.05).
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


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


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

    reset = _reset_hwm()
    t, c = time.perf_counter(), time.process_time()
    svg_spatialde(adata, progress=False, **kw)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    call_peak = f" call_peak={_hwm_gib():.2f}GiB" if reset else ""
    u = adata.uns["spatialde"]
    reps = ", ".join(f"{k}:{v['kind']}" + (f"(r={v['rank']})" if "rank" in v else "")
                     + (f"(grid {v['grid']})" if "grid" in v else "")
                     + (f"(nnz/row={v['nnz_per_row']:.0f})" if "nnz_per_row" in v else "")
                     for k, v in u["representation"].items() if k.startswith("SE"))
    print(f"{label:<36s} spots={u['n_spots_tested']:>7d} genes={u['n_genes_tested']:>6d} "
          f"wall={wall:8.2f}s cpu={cpu:8.2f}s peak={_peak_gib():6.2f}GiB{call_peak} significant={int((adata.var['spatialde.padj'] < 0.05).sum()):>6d}"
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


def _grid100k_data(n_null=200, n_pattern=100, seed=0):
    """A 317 x 317 square grid (100,489 spots, spacing 1) with simulated negative-binomial counts.

    Size factors s ~ Gamma(5, 1/5) (mean 1). Gene g has mean s_i r_g exp(f_g(x_i)) with a base rate r_g
    log-uniform in [0.3, 5] counts per spot and NB dispersion 0.2 (gamma-Poisson). The first ``n_null``
    genes are flat (f = 0); the other ``n_pattern`` carry a pattern f = amp * p / sd(p), with p cycling over
    sine waves along x, y or the diagonal (period 16, 48 or 150 spots) and Gaussian blobs (radius 8, 25 or
    80 spots, centres drawn uniformly), and amp in {0.05, 0.1, 0.2, 0.4}.
    """
    side = 317
    u = np.arange(side, dtype=np.float64)
    xy = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    n = xy.shape[0]
    rng = np.random.default_rng(seed)
    s = rng.gamma(5.0, 0.2, n)
    g = n_null + n_pattern
    rate = np.exp(rng.uniform(np.log(0.3), np.log(5.0), g))
    X = np.empty((n, g), dtype=np.float32)
    amps = (0.05, 0.1, 0.2, 0.4)
    for j in range(g):  # (one column at a time: the data, not the method, are built here)
        f = 0.0
        if j >= n_null:
            k = j - n_null
            kind, scale = k % 6, (16.0, 48.0, 150.0)[(k // 6) % 3]
            if kind < 3:
                coord = (xy[:, 0], xy[:, 1], (xy[:, 0] + xy[:, 1]) / np.sqrt(2.0))[kind]
                p = np.sin(2 * np.pi * coord / scale + rng.uniform(0, 2 * np.pi))
            else:
                c = rng.uniform(0, side, 2)
                p = np.exp(-((xy - c) ** 2).sum(1) / (2 * (scale / 2) ** 2))
            f = amps[(k // 18) % 4] * (p - p.mean()) / p.std()
        lam = rng.gamma(1.0 / 0.2, 0.2 * s * rate[j] * np.exp(f))
        X[:, j] = rng.poisson(lam)
    pattern = np.r_[np.zeros(n_null, bool), np.ones(n_pattern, bool)]
    return X, xy, s, pattern


def case_grid100k(n_null=200, n_pattern=100):
    """The default kernel space on 100,489 spots (see _grid100k_data), memory budget 4 GiB."""
    X, xy, s, pattern = _grid100k_data(n_null, n_pattern)
    a = _adata(X, xy, [f"g{i}" for i in range(X.shape[1])])
    _run(a, "synthetic grid 100k, default kernels", sizefactors=s, max_memory=4.0)
    sig = (a.var["spatialde.padj"] < 0.05).to_numpy()
    print(f"  pattern genes found: {int((sig & pattern).sum())} of {int(pattern.sum())}; "
          f"flat genes called: {int((sig & ~pattern).sum())} of {int((~pattern).sum())}", flush=True)
    amp = np.array([(0.05, 0.1, 0.2, 0.4)[(k // 18) % 4] for k in range(n_pattern)])
    found = sig[pattern]
    print("  found by amplitude: " + ", ".join(f"{v}: {int(found[amp == v].sum())}/{int((amp == v).sum())}"
                                             for v in (0.05, 0.1, 0.2, 0.4)), flush=True)


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
