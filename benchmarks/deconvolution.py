"""Deconvolution benchmark: expkit (RCTD full mode, fast mode), rctd-py and flashdeconv on the same pseudo-spots.

Pseudo-spots: spacexr's real cerebellum reference (19 types x 25 cells, tests/data/deconv); 15 cells per
type are the reference, the other 10 are aggregated on a grid (expkit.spatial.deconvolution.simulate_spots).
Set A: 20 x 20 spots, ~6 cells, 25 % capture (~3600 counts per spot); set B: 30 x 30 spots, 2 % capture
(~300 counts, bins with few counts). Truth: each type's share of a spot's counts.
Then the fast mode on 1 M synthetic bins x 20 types (timing only).

Peers run in the side venv (PEER_PY, default /work/dcvenv/bin/python) by benchmarks/_deconv_peers.py.
rctd-py's Q-matrix download is unavailable offline: benchmarks/_deconv_qmat.py writes that file.
Usage: python benchmarks/deconvolution.py [--skip-peers] [--skip-1m] [--only-a] [--rctd-modes=full,doublet,multi]
  > benchmarks/results/deconvolution.md
``--only-a``: set A only, and there only expkit's RCTD mode, rctd-py and flashdeconv (the speed target of
issue 14, about a minute); ``--rctd-modes``: the RCTD modes run on set A by expkit and rctd-py (default full).
Times are wall seconds; "CPU (s)" is the process's CPU time over the run (all its threads: above the wall time
when two cores worked, about equal when the machine was busy).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._util import ROOT, measure  # noqa: E402
from expkit.spatial.deconvolution import deconvolve, simulate_spots, split_cells  # noqa: E402

PEER_PY = os.environ.get("PEER_PY", "/work/dcvenv/bin/python")
Q_FILE = Path(os.environ.get("RCTD_Q_MATRICES", "/tmp/rctd_q/q_matrices.npz"))


def metrics(est: np.ndarray, truth: np.ndarray):
    rmse = float(np.sqrt(np.nanmean((est - truth) ** 2)))
    per = [float(np.corrcoef(est[:, k], truth[:, k])[0, 1]) if est[:, k].std() > 0 else float("nan")
           for k in range(truth.shape[1])]
    per_rmse = np.sqrt(np.nanmean((est - truth) ** 2, 0))
    return rmse, float(np.nanmean(per)), per, per_rmse


def pseudo_sets():
    cells = ad.read_h5ad(ROOT / "tests" / "data" / "deconv" / "cerebellum_reference.h5ad")
    ref, pool = split_cells(cells, n_first=15, seed=0)
    a = simulate_spots(pool, n_side=20, cells_per_spot=6, capture=0.25, seed=11)
    b = simulate_spots(pool, n_side=30, cells_per_spot=6, capture=0.02, seed=12)
    return ref, {"A": a, "B": b}


MODE_LABEL = {"full": "", "doublet": " doublet", "multi": " multi"}


def run_peers(ref, spots, which, tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    spots.write_h5ad(tmp / "spots.h5ad")
    ref.write_h5ad(tmp / "reference.h5ad")
    env = dict(os.environ, MIN_CELLS="10", RCTD_Q_MATRICES=str(Q_FILE))
    out = subprocess.run([PEER_PY, str(ROOT / "benchmarks" / "_deconv_peers.py"), str(tmp), str(tmp / "peers.npz"),
                          ",".join(which)], env=env, capture_output=True, text=True)
    if out.returncode:
        print(f"<!-- peers failed: {out.stderr[-2000:]} -->")
        return {}
    res = np.load(tmp / "peers.npz", allow_pickle=True)
    return {k: res[k] for k in res.files}


def expkit_runs(ref, spots, name, results, rctd_modes=("full",), fast=True):
    runs = {}
    configs = [("rctd", {"mode": m}) for m in rctd_modes] if name == "A" else []
    if fast:
        configs += [("fast", {}), ("fast", {"spatial_weight": 0.05})]
    for method, kw in configs:
        s = spots.copy()
        if method == "rctd":
            label = "expkit rctd" + MODE_LABEL[kw["mode"]]
        else:
            label = f"expkit {method}" + (f" (spatial_weight={kw['spatial_weight']})" if kw else "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c0 = time.process_time()
            with measure(f"set {name}: {label}", results) as info:
                res = deconvolve(s, reference=ref, min_cells_per_type=10, method=method, **kw)
                info["sigma"] = res.get("sigma")
            results[-1][3]["cpu"] = time.process_time() - c0
        runs[label] = s.obsm["deconv"]
    return runs


def synthetic_1m(n_bins=1_000_000, n_types=20, n_genes=2000, umi=60, seed=0):
    """1 M bins on a 1000 x 1000 grid: random profiles, smooth random proportions, multinomial counts."""
    rng = np.random.default_rng(seed)
    prof = rng.gamma(0.3, 1.0, (n_types, n_genes))
    prof /= prof.sum(1, keepdims=True)
    side = int(np.sqrt(n_bins))
    xy = np.column_stack(np.divmod(np.arange(side * side), side)).astype(np.float64)
    logits = np.sin(xy[:, :1] / rng.uniform(30, 90, n_types) + rng.uniform(0, 6, n_types)) * 2
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)
    n = side * side
    per_type = rng.multinomial(umi, w)                       # (bins, types) counts from each type
    gcum = np.cumsum(prof, 1)
    rows, g = [], []
    for k in range(n_types):                                 # a handful of types, vectorised within each
        r = np.repeat(np.arange(n), per_type[:, k])
        rows.append(r)
        g.append(np.searchsorted(gcum[k], rng.random(len(r))).clip(max=n_genes - 1))
    rows, g = np.concatenate(rows), np.concatenate(g)
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, g)), shape=(n, n_genes))
    x.sum_duplicates()
    genes = [f"g{i}" for i in range(n_genes)]
    bins = ad.AnnData(X=x, var=pd.DataFrame(index=genes))
    bins.layers["counts"] = x
    bins.obsm["spatial"] = xy
    cells = rng.poisson(prof[np.repeat(np.arange(n_types), 40)] * 3000).astype(np.float32)
    ref = ad.AnnData(X=sp.csr_matrix(cells), var=pd.DataFrame(index=genes),
                     obs=pd.DataFrame({"cell_type": np.repeat([f"type{k}" for k in range(n_types)], 40)}))
    return ref, bins, w


def _peer_keys(name, rctd_modes, only_a):
    """The peer runs of a set: rctd-py in each RCTD mode on set A, flashdeconv on both sets."""
    if name != "A":
        return [] if only_a else ["flash"]
    return [("rctd" if m == "full" else f"rctd_{m}") for m in rctd_modes] + ["flash"]


def _add_peers(ref, spots, name, keys, runs, times, mems, cpus):
    with tempfile.TemporaryDirectory() as tmp:
        peers = run_peers(ref, spots, keys, Path(tmp) / name)
    for key in keys:
        label = "flashdeconv" if key == "flash" else "rctd-py" + MODE_LABEL[key.split("_")[1] if "_" in key else "full"]
        if key in peers:
            runs[label] = peers[key]
            times[f"set {name}: {label}"] = float(peers[f"{key}_time"])
            mems[f"set {name}: {label}"] = float(peers[f"{key}_mem"])
            cpus[f"set {name}: {label}"] = float(peers[f"{key}_cpu"])


def main(skip_peers=False, skip_1m=False, only_a=False, rctd_modes=("full",)):
    results = []
    ref, sets = pseudo_sets()
    if only_a:
        sets = {"A": sets["A"]}
    types = sorted(ref.obs["cell_type"].astype(str).unique())
    table = []
    for name, spots in sets.items():
        truth = spots.obsm["truth"][types].to_numpy()
        umi = float(np.asarray(spots.X.sum(1)).mean())
        runs = {k: v[types].to_numpy() for k, v in expkit_runs(ref, spots, name, results, rctd_modes,
                                                               fast=not only_a).items()}
        mine = [r for r in results if r[0].startswith(f"set {name}:")]
        times = {label: dt for label, dt, mem, _ in mine}
        mems = {label: mem for label, dt, mem, _ in mine}
        cpus = {label: info.get("cpu", np.nan) for label, dt, mem, info in mine}
        if not skip_peers:
            _add_peers(ref, spots, name, _peer_keys(name, rctd_modes, only_a), runs, times, mems, cpus)
        for label, est in runs.items():
            rmse, pear, per, per_rmse = metrics(est, truth)
            key = f"set {name}: {label}"
            table.append((name, umi, label, rmse, pear, times.get(key, np.nan), cpus.get(key, np.nan),
                          mems.get(key, np.nan), per, per_rmse))
        for m in rctd_modes:
            ours, peer = "expkit rctd" + MODE_LABEL[m], "rctd-py" + MODE_LABEL[m]
            if ours in runs and peer in runs:
                diff = float(np.sqrt(np.nanmean((runs[ours] - runs[peer]) ** 2)))
                table.append((name, umi, f"{ours} vs {peer} (RMSE between them)", diff, np.nan, np.nan, np.nan,
                              np.nan, None, None))
    big = None
    if not skip_1m and not only_a:
        t0 = time.perf_counter()
        r1, bins, w_true = synthetic_1m()
        gen = time.perf_counter() - t0
        with measure("1M bins x 20 types: expkit fast (incl. kNN graph)", results) as info:
            res = deconvolve(bins, reference=r1, method="fast")
            info["genes"] = res["n_genes"]
        est = bins.obsm["deconv"][[f"type{k}" for k in range(20)]].to_numpy()
        big = (results[-1][1], results[-1][2], float(np.sqrt(np.mean((est - w_true) ** 2))), gen)
    report(table, types, big)


def report(table, types, big):
    print("# Deconvolution benchmark\n")
    print("`python benchmarks/deconvolution.py` on the project machine (2 CPU cores shared with other jobs: "
          "absolute times are noisy, ratios within one run are fair). rctd-py 0.4.0 (`compile=False`, CPU, its "
          "Q-matrix file written by `benchmarks/_deconv_qmat.py`), flashdeconv 0.2.0 (defaults), in /work/dcvenv.\n")
    print("| set | counts/spot | method | RMSE | mean Pearson | time (s) | CPU (s) | peak mem (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, umi, label, rmse, pear, dt, cpu, mem, _, _ in table:
        print(f"| {name} | {umi:.0f} | {label} | {rmse:.4f} | {pear:.3f} | {dt:.1f} | {cpu:.1f} | {mem:.0f} |")
    print("\nPer cell type (set A), Pearson / RMSE:\n")
    rows = [r for r in table if r[0] == "A" and r[8] is not None]
    print("| type | " + " | ".join(r[2] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k, t in enumerate(types):
        print(f"| {t} | " + " | ".join(f"{r[8][k]:.3f} / {r[9][k]:.3f}" for r in rows) + " |")
    if big:
        print(f"\n1 M synthetic bins x 20 types x 2000 genes (~60 counts per bin): expkit fast mode {big[0]:.1f} s, "
              f"peak +{big[1]:.0f} MiB, RMSE vs truth {big[2]:.4f} (data generation {big[3]:.0f} s, not counted).")


def _modes(argv) -> tuple:
    for a in argv:
        if a.startswith("--rctd-modes="):
            modes = tuple(m for m in a.split("=", 1)[1].split(",") if m)
            bad = [m for m in modes if m not in MODE_LABEL]
            if bad:
                raise SystemExit(f"--rctd-modes: unknown mode(s) {bad}; choose from {list(MODE_LABEL)}")
            return modes
    return ("full",)


if __name__ == "__main__":
    main(skip_peers="--skip-peers" in sys.argv, skip_1m="--skip-1m" in sys.argv, only_a="--only-a" in sys.argv,
         rctd_modes=_modes(sys.argv[1:]))
