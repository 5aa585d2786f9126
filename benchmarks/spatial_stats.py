"""Spatial label statistics: expkit beside squidpy 1.8 on the Xenium mouse brain, and a 100-sample cohort.

    .venv/bin/python benchmarks/spatial_stats.py [--no-squidpy] [--samples 100] [--cells 10000]

1. Xenium mouse brain, all 36,602 cells, expkit leiden labels (tests/data/squidpy_stats_ref/xenium_all_leiden.csv.gz,
   25 clusters), kNN graph (6 neighbours): neighbourhood enrichment with 1,000 permutations and co-occurrence
   (50 thresholds) in expkit, then the same calls in squidpy through the side venv (/work/sqvenv, a subprocess
   timed from inside, numba compilation included as a user meets it). Quality: correlation of the z-scores,
   max difference of the co-occurrence ratios.
2. A synthetic cohort: ``--samples`` samples of ``--cells`` cells (2 x 2 mm, ~20 um apart), 8 labels, two groups
   ("random": labels drawn independently; "patchy": labels from Voronoi patches with 30 % noise; the same
   expected composition), 4 batches (coordinate scale 0.9-1.1): spatial_graph_stats (radii 25, 50 um,
   100 permutations) + sample_embedding (Harmony over batch, UMAP) + compare_groups, with time and peak memory.
   Quality: the share of Moran's I statistics found different (q < 0.05; all truly differ) and of the label
   proportions (none truly differ), and the groups' separation on the first principal component.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, SHARED, measure  # noqa: E402

SQVENV = Path("/work/sqvenv/bin/python")
LABELS = ROOT / "tests" / "data" / "squidpy_stats_ref" / "xenium_all_leiden.csv.gz"

SQUIDPY_SCRIPT = r"""
import json, sys, time
import numpy as np, pandas as pd, anndata as ad, squidpy as sq
cells = pd.read_csv(sys.argv[1]); lab = pd.read_csv(sys.argv[2], dtype={"leiden": str, "cell_id": str})
cells["cell_id"] = cells["cell_id"].astype(str)
cells = cells.set_index("cell_id").loc[lab["cell_id"]]
cats = sorted(lab["leiden"].unique(), key=int)
a = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(lab["leiden"].to_numpy(), categories=cats)},
                                index=lab["cell_id"].to_numpy()))
a.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
out = {}
t = time.perf_counter(); z = sq.gr.nhood_enrichment(a, "label", n_perms=1000, seed=0, copy=True, show_progress_bar=False)
out["nhood_s"] = time.perf_counter() - t
t = time.perf_counter(); occ, iv = sq.gr.co_occurrence(a, "label", copy=True)
out["co_occurrence_s"] = time.perf_counter() - t
import resource; out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
np.savez(sys.argv[3], zscore=z.zscore, count=z.counts, occ=occ, interval=iv)
print(json.dumps(out))
"""


def xenium(run_squidpy: bool) -> None:
    import anndata as ad

    import expkit.spatial.stats_graph as sg
    from expkit.spatial import spatial_neighbors

    cells = pd.read_csv(SHARED / "xenium_mouse_brain" / "cells.csv.gz")
    lab = pd.read_csv(LABELS, dtype={"leiden": str, "cell_id": str})
    cells["cell_id"] = cells["cell_id"].astype(str)
    cells = cells.set_index("cell_id").loc[lab["cell_id"]]
    cats = sorted(lab["leiden"].unique(), key=int)
    a = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(lab["leiden"].to_numpy(), categories=cats)},
                                    index=lab["cell_id"].to_numpy()))
    a.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    spatial_neighbors(a, n_neighs=6)
    print(f"## Xenium mouse brain: {a.n_obs} cells, {len(cats)} leiden labels, kNN graph (6)")
    res = []
    with measure("expkit nhood_enrichment (1,000 permutations)", res):
        ne = sg.nhood_enrichment(a, cluster_key="label", n_perms=1000, seed=0)
    with measure("expkit co_occurrence (50 thresholds)", res):
        co = sg.co_occurrence(a, cluster_key="label")
    ours = res[0][1] + res[1][1]
    print(f"expkit total: {ours:.2f} s")
    if not run_squidpy:
        return
    if not SQVENV.exists():
        print(f"squidpy skipped: {SQVENV} not found")
        return
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "sq.py", Path(tmp) / "sq.npz"
        script.write_text(SQUIDPY_SCRIPT)
        t0 = time.perf_counter()
        proc = subprocess.run([str(SQVENV), str(script), str(SHARED / "xenium_mouse_brain" / "cells.csv.gz"),
                               str(LABELS), str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print("squidpy failed:", proc.stderr[-2000:])
            return
        sq = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = np.load(out)
        z, zr = ne["zscore"], ref["zscore"]
        ok = np.isfinite(z) & np.isfinite(zr)
        print(f"squidpy nhood_enrichment (1,000 permutations)     {sq['nhood_s']:8.2f} s")
        print(f"squidpy co_occurrence (50 thresholds)             {sq['co_occurrence_s']:8.2f} s   "
              f"(squidpy process max RSS {sq['max_rss_mb']:.0f} MiB; subprocess wall {wall:.0f} s)")
        theirs = sq["nhood_s"] + sq["co_occurrence_s"]
        print(f"squidpy total: {theirs:.2f} s; speed-up {theirs / ours:.1f}x "
              f"(nhood {sq['nhood_s'] / res[0][1]:.1f}x, co-occurrence {sq['co_occurrence_s'] / res[1][1]:.1f}x)")
        print(f"quality: nhood counts equal {np.array_equal(ne['count'], ref['count'])}, z-score correlation "
              f"{np.corrcoef(z[ok], zr[ok])[0, 1]:.5f}; co-occurrence max |diff| "
              f"{np.abs(co['occ'] - ref['occ']).max():.2e}")


def synthetic_sample(rng: np.random.Generator, n: int, patchy: bool, scale: float, k: int = 8):
    import anndata as ad

    xy = rng.random((n, 2)) * 2000.0 * scale
    if patchy:
        seeds = rng.random((60, 2)) * 2000.0 * scale
        from scipy.spatial import cKDTree

        patch = cKDTree(seeds).query(xy)[1]
        lab = rng.integers(0, k, 60)[patch]
        noise = rng.random(n) < 0.3
        lab[noise] = rng.integers(0, k, int(noise.sum()))
    else:
        lab = rng.integers(0, k, n)
    a = ad.AnnData(obs=pd.DataFrame({"celltype": pd.Categorical([f"t{v}" for v in lab],
                                                                categories=[f"t{i}" for i in range(k)])},
                                    index=[str(i) for i in range(n)]))
    a.obsm["spatial"] = xy
    return a


def cohort(n_samples: int, n_cells: int) -> None:
    from expkit.spatial.cohort import compare_groups, sample_embedding, spatial_graph_stats

    print(f"\n## Synthetic cohort: {n_samples} samples x {n_cells} cells, 8 labels, 2 groups, 4 batches")
    rng = np.random.default_rng(0)
    samples = {}
    for i in range(n_samples):
        patchy = i % 2 == 1
        a = synthetic_sample(rng, n_cells, patchy, scale=0.9 + 0.2 * ((i // 2) % 4) / 3)
        a.obs["group"] = "patchy" if patchy else "random"
        a.obs["batch"] = f"batch{(i // 2) % 4}"
        samples[f"s{i:03d}"] = a
    res = []
    with measure("spatial_graph_stats (radii 25, 50; 100 perms)", res) as info:
        stats = spatial_graph_stats(samples, cluster_key="celltype", radii=(25, 50), n_perms=100, seed=0)
        info["rows"] = len(stats)
    with measure("sample_embedding (16 PCs, Harmony, UMAP)", res):
        emb = sample_embedding(stats, n_dim=16, batch_key="batch", umap=True, seed=0)
    with measure("compare_groups (rank test, BH)", res) as info:
        diff = compare_groups(stats, group_key="group", groups=("random", "patchy"))
        info["statistics"] = len(diff)
    total = sum(r[1] for r in res)
    print(f"cohort total {total:.1f} s, peak +{max(r[2] for r in res):.0f} MiB above the start")
    moran = diff[diff.statistic == "moran"]
    prop = diff[diff.statistic == "proportion"]
    pc1 = emb.obsm["pca"][:, 0]
    g = emb.obs["group"].to_numpy() == "patchy"
    gap = abs(pc1[g].mean() - pc1[~g].mean()) / np.sqrt((pc1[g].var() + pc1[~g].var()) / 2)
    print(f"quality: Moran's I found different (q < 0.05) {(moran.qval < 0.05).mean():.0%} of {len(moran)}; "
          f"proportions found different {(prop.qval < 0.05).mean():.0%} of {len(prop)} (none truly differ); "
          f"PC1 separation of the groups {gap:.1f} pooled sd")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--no-squidpy", action="store_true")
    p.add_argument("--samples", type=int, default=100, help="cohort size (0: no cohort)")
    p.add_argument("--cells", type=int, default=10000)
    p.add_argument("--skip-xenium", action="store_true")
    args = p.parse_args()
    import torch

    print(f"# spatial_stats benchmark ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU)")
    if not args.skip_xenium:
        xenium(not args.no_squidpy)
    if args.samples > 0:
        cohort(args.samples, args.cells)


if __name__ == "__main__":
    main()
