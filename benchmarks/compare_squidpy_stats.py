"""squidpy 1.8 reference values for the spatial label statistics, and their comparison with expkit.

    # 1. the Xenium leiden labels, with expkit's own pipeline (project venv; ~7 min on 2 cores)
    .venv/bin/python benchmarks/compare_squidpy_stats.py labels
    # 2. the squidpy fixtures (side venv with squidpy 1.8: python3 -m venv /work/sqvenv; pip install squidpy==1.8.*)
    OMP_NUM_THREADS=1 /work/sqvenv/bin/python benchmarks/compare_squidpy_stats.py make
    # 3. expkit against the fixtures (project venv): max differences per statistic
    .venv/bin/python benchmarks/compare_squidpy_stats.py compare

Writes tests/data/squidpy_stats_ref/ (see its README.md for the exact squidpy calls). Inputs:
- ``xenium``: the 10x Xenium mouse brain cells (../shared/data/xenium_mouse_brain) in the window
  3000 < x < 4000, 1800 < y < 2800 (2,687 cells), labelled by expkit leiden clusters of all 36,602 cells
  (log_normalize, scale_pca 30 comps on all 248 genes, knn 15, leiden resolution 0.5, seed 0);
  squidpy's generic kNN graph (n_neighs=6).
- ``dlpfc``: DLPFC 151673, the spots with a manual layer (151673_truth.txt), (pxl_col, pxl_row)
  coordinates, squidpy's grid graph (n_neighs=6).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "tests" / "data" / "squidpy_stats_ref"
WINDOW = (3000.0, 4000.0, 1800.0, 2800.0)
N_PERMS = 1000


# ------------------------------------------------------------------------------------------------
# inputs (plain pandas: this part runs in both venvs)
# ------------------------------------------------------------------------------------------------
def natural(values):
    import re

    return sorted(values, key=lambda v: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(v))])


def make_labels() -> None:
    """Leiden clusters of all Xenium cells with expkit's pipeline -> OUT/xenium_cells.csv.gz (window only)."""
    from expkit import pp, tl
    from expkit.io import read_xenium

    a = read_xenium(SHARED / "xenium_mouse_brain", sample="xenium")
    pp.log_normalize(a, key_source=None)
    pp.scale_pca(a, n_comps=30, use_hvg=None, seed=0)
    tl.knn(a, n_neighbors=15)
    tl.leiden(a, resolution=0.5, seed=0)
    df = pd.DataFrame({"cell_id": a.obs["barcode"].astype(str).to_numpy(), "x": a.obsm["spatial"][:, 0],
                       "y": a.obsm["spatial"][:, 1], "leiden": a.obs["leiden"].astype(str).to_numpy()})
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / "xenium_all_leiden.csv.gz", index=False, columns=["cell_id", "leiden"])
    x0, x1, y0, y1 = WINDOW
    win = df[(df.x > x0) & (df.x < x1) & (df.y > y0) & (df.y < y1)]
    win.to_csv(OUT / "xenium_cells.csv.gz", index=False, float_format="%.17g")
    print(f"{len(win)} cells in the window, {win.leiden.nunique()} labels")


def make_dlpfc_cells() -> pd.DataFrame:
    folder = SHARED / "dlpfc" / "151673"
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    truth = pd.read_csv(folder / "151673_truth.txt", sep="\t", header=None, names=["barcode", "layer"])
    df = pos.merge(truth, on="barcode").dropna(subset=["layer"])
    df = df[df.in_tissue == 1]
    out = pd.DataFrame({"barcode": df.barcode, "x": df.pxl_col.astype(float), "y": df.pxl_row.astype(float),
                        "layer": df.layer})
    out.to_csv(OUT / "dlpfc_151673_cells.csv.gz", index=False, float_format="%.17g")
    return out


def load(name: str):
    """(coordinates, labels as a categorical Series in natural order) of a fixture's cells."""
    if name == "xenium":
        df = pd.read_csv(OUT / "xenium_cells.csv.gz", dtype={"leiden": str})
        lab = df["leiden"]
    else:
        df = pd.read_csv(OUT / "dlpfc_151673_cells.csv.gz")
        lab = df["layer"].astype(str)
    cats = natural(lab.unique())
    return df[["x", "y"]].to_numpy(np.float64), pd.Categorical(lab, categories=cats)


# ------------------------------------------------------------------------------------------------
# squidpy side
# ------------------------------------------------------------------------------------------------
def squidpy_reference(name: str) -> None:
    import anndata as ad
    import scipy.sparse as sp
    import squidpy as sq
    from scipy.spatial import ConvexHull
    from squidpy.gr._ripley import _ppp

    xy, lab = load(name)
    a = ad.AnnData(obs=pd.DataFrame({"label": lab}, index=[str(i) for i in range(len(lab))]))
    a.obsm["spatial"] = xy
    if name == "xenium":
        sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    else:
        sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6)
    g = sp.csr_matrix(a.obsp["spatial_connectivities"])
    sp.save_npz(OUT / f"{name}_graph.npz", g)
    res = {}
    res["interactions"] = sq.gr.interaction_matrix(a, "label", copy=True)
    res["interactions_norm"] = sq.gr.interaction_matrix(a, "label", normalized=True, copy=True)
    cent = sq.gr.centrality_scores(a, "label", copy=True)
    cent.to_csv(OUT / f"{name}_centrality.csv")
    z = sq.gr.nhood_enrichment(a, "label", n_perms=N_PERMS, seed=0, copy=True, show_progress_bar=False)
    res["nhood_zscore"], res["nhood_count"] = z.zscore, z.counts
    occ, interval = sq.gr.co_occurrence(a, "label", copy=True)
    res["occ"], res["occ_interval"] = occ, interval
    occ2, interval2 = sq.gr.co_occurrence(a, "label", interval=np.array([0.0, 60.0, 150.0, 400.0]), copy=True)
    res["occ_fixed"], res["occ_fixed_interval"] = occ2, interval2
    for mode in ("L", "G", "F"):
        r = sq.gr.ripley(a, "label", mode=mode, n_simulations=100, seed=0, copy=True)
        obs = r[f"{mode}_stat"].pivot(index="bins", columns="label", values="stats")
        res[f"ripley_{mode}_labels"] = np.asarray(obs.columns.astype(str), dtype=str)
        res[f"ripley_{mode}_stat"] = obs.to_numpy().T
        res[f"ripley_{mode}_bins"] = r["bins"]
        # seeded simulations are all the same draw in squidpy (the generator is re-seeded per simulation):
        # the envelopes for the distribution check come from an unseeded run
        r2 = sq.gr.ripley(a, "label", mode=mode, n_simulations=100, seed=None, copy=True)
        sims = r2["sims_stat"].pivot(index="bins", columns="simulations", values="stats")
        res[f"ripley_{mode}_sims"] = sims.to_numpy().T
    hull = ConvexHull(xy)
    res["ripley_F_points"] = _ppp(hull, n_simulations=1, n_observations=1000, seed=0)
    res["labels"] = np.asarray(lab.categories.astype(str), dtype=str)
    np.savez_compressed(OUT / f"{name}_squidpy.npz", **res)
    print(f"{name}: wrote {sorted(res)}")


def make() -> None:
    import scipy
    import squidpy

    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "xenium_cells.csv.gz").exists():
        raise SystemExit("run the 'labels' step first (project venv)")
    make_dlpfc_cells()
    for name in ("xenium", "dlpfc"):
        squidpy_reference(name)
    versions = {"squidpy": squidpy.__version__, "scipy": scipy.__version__, "numpy": np.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# expkit side
# ------------------------------------------------------------------------------------------------
def expkit_adata(name: str):
    import anndata as ad
    import scipy.sparse as sp

    xy, lab = load(name)
    a = ad.AnnData(obs=pd.DataFrame({"label": lab}, index=[str(i) for i in range(len(lab))]))
    a.obsm["spatial"] = xy
    g = sp.load_npz(OUT / f"{name}_graph.npz").tocsr()
    a.obsp["spatial.connectivities"] = g
    return a


def compare() -> None:
    import expkit.spatial.stats_graph as sg
    import expkit.spatial.stats_ripley as sr

    for name in ("xenium", "dlpfc"):
        ref = np.load(OUT / f"{name}_squidpy.npz", allow_pickle=False)
        a = expkit_adata(name)
        im = sg.interaction_matrix(a, cluster_key="label")
        imn = sg.interaction_matrix(a, cluster_key="label", normalized=True, key_added="label.int_norm")
        ne = sg.nhood_enrichment(a, cluster_key="label", n_perms=N_PERMS, seed=0)
        co = sg.co_occurrence(a, cluster_key="label")
        cen = sg.centrality(a, cluster_key="label")
        ref_c = pd.read_csv(OUT / f"{name}_centrality.csv", index_col=0)
        ref_c.index = ref_c.index.astype(str)
        print(f"--- {name}: {a.n_obs} obs, {len(ref['labels'])} labels")
        print(f"interaction matrix: max |diff| {np.abs(im - ref['interactions']).max():.3g}, normalized "
              f"{np.nanmax(np.abs(imn - ref['interactions_norm'])):.3g}")
        print(f"nhood count equal: {np.array_equal(ne['count'], ref['nhood_count'])}; z corr "
              f"{np.corrcoef(ne['zscore'].ravel(), ref['nhood_zscore'].ravel())[0, 1]:.5f}, max |dz| "
              f"{np.nanmax(np.abs(ne['zscore'] - ref['nhood_zscore'])):.3f}")
        print(f"co-occurrence: max |diff| {np.abs(co['occ'] - ref['occ']).max():.3g}, interval "
              f"{np.abs(co['interval'] - ref['occ_interval']).max():.3g}")
        d = (cen.loc[ref_c.index, ref_c.columns] - ref_c).abs().max()
        print("centrality max |diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items()))
        co2 = sg.co_occurrence(a, cluster_key="label", interval=ref["occ_fixed_interval"], key_added="co2")
        print(f"co-occurrence (given interval): max |diff| {np.abs(co2['occ'] - ref['occ_fixed']).max():.3g}")
        from expkit.kernels import ripley as kr

        labs = list(ref["ripley_F_labels"])
        f_stat = np.vstack([kr.fg_stat(kr.knn_distances(a.obsm["spatial"][np.asarray(a.obs["label"]) == c],
                                                        ref["ripley_F_points"], 2).ravel(), ref["ripley_F_bins"])
                            for c in labs])
        print(f"ripley F (squidpy's random points): max |diff| {np.abs(f_stat - ref['ripley_F_stat']).max():.3g}")
        for mode in ("L", "G"):
            r = sr.ripley(a, cluster_key="label", mode=mode, n_simulations=100, seed=0)
            stat = r["stat"].loc[list(ref[f"ripley_{mode}_labels"])].to_numpy()
            print(f"ripley {mode}: max |diff| {np.abs(stat - ref[f'ripley_{mode}_stat']).max():.3g}; sims mean "
                  f"{r['sims'].mean():.4f} vs {ref[f'ripley_{mode}_sims'].mean():.4f}")


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else "compare"
    {"labels": make_labels, "make": make, "compare": compare}[step]()
