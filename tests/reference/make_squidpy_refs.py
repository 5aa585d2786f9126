"""Make the small squidpy reference fixtures in tests/data/squidpy_ref/ (run with the peers' venv).

    OMP_NUM_THREADS=1 /work/peers/.venv/bin/python tests/reference/make_squidpy_refs.py [SHARED_DATA]

Needs scanpy + squidpy (squidpy 1.8.2, scanpy 1.11.5 were used); never installed into the project venv.
Protocol (as in ../shared/reference/README.md for Moran): sc.pp.normalize_total (median target) +
sc.pp.log1p on raw counts.
- geary_151673_n300.tsv.gz: DLPFC 151673, grid graph (coord_type="grid", n_neighs=6, n_rings=1) on
  (pxl_col, pxl_row); sq.gr.spatial_autocorr(mode="geary", n_perms=None) on 300 genes
  (numpy default_rng(0).choice(5000, 300, replace=False), sorted, in file order).
- xenium_knn6_autocorr.tsv.gz: Xenium mouse brain (248 genes), generic kNN graph (n_neighs=6) on
  (x_centroid, y_centroid); Moran and Geary, all genes.
- xenium_radius20_degree.tsv.gz: out-degree per cell of sq.gr.spatial_neighbors(coord_type="generic",
  radius=20.0) on the same cells.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import squidpy as sq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _spatial_data import read_dlpfc, read_xenium  # noqa: E402

OUT = HERE.parent / "data" / "squidpy_ref"


def prep(a):
    a = a.copy()
    a.var_names = a.var["gene"].astype(str)
    a.var_names_make_unique()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return a


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    d = prep(read_dlpfc(shared, "151673"))
    sq.gr.spatial_neighbors(d, coord_type="grid", n_neighs=6, n_rings=1, spatial_key="spatial")
    pick = np.sort(np.random.default_rng(0).choice(d.n_vars, 300, replace=False))
    genes = list(d.var_names[pick])
    df = sq.gr.spatial_autocorr(d, mode="geary", genes=genes, n_perms=None, copy=True)
    df.index.name = "gene"
    df[["C", "pval_norm", "var_norm", "pval_norm_fdr_bh"]].to_csv(
        OUT / "geary_151673_n300.tsv.gz", sep="\t", float_format="%.10g")

    x = prep(read_xenium(shared))
    sq.gr.spatial_neighbors(x, coord_type="generic", n_neighs=6, spatial_key="spatial")
    m = sq.gr.spatial_autocorr(x, mode="moran", n_perms=None, copy=True)
    g = sq.gr.spatial_autocorr(x, mode="geary", n_perms=None, copy=True)
    both = pd.DataFrame({"moran_I": m["I"], "moran_pval_norm": m["pval_norm"], "moran_var_norm": m["var_norm"],
                         "geary_C": g["C"].reindex(m.index), "geary_pval_norm": g["pval_norm"].reindex(m.index),
                         "geary_var_norm": g["var_norm"].reindex(m.index)})
    both.index.name = "gene"
    both.to_csv(OUT / "xenium_knn6_autocorr.tsv.gz", sep="\t", float_format="%.10g")

    sq.gr.spatial_neighbors(x, coord_type="generic", radius=20.0, spatial_key="spatial")
    deg = np.diff(x.obsp["spatial_connectivities"].tocsr().indptr)
    pd.DataFrame({"barcode": x.obs["barcode"].to_numpy(), "degree": deg}).to_csv(
        OUT / "xenium_radius20_degree.tsv.gz", sep="\t", index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXPKIT_SHARED_DATA", "/work/shared/data")))
