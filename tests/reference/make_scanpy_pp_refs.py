"""Make the small scanpy reference fixtures used by tests/test_pp.py (CI has no scanpy).

Run from the repository root with a Python that has scanpy and scikit-misc (never the expkit venv):

    /work/peers/.venv/bin/python tests/reference/make_scanpy_pp_refs.py

It reads the shared real data (EXPKIT_SHARED_DATA, default ../shared/data) with the same plain loaders
as the tests (tests/_pp_data.py) and writes tests/data/scanpy_ref/<dataset>.npz:

- ``norm_*``: normalize_total (median target) + log1p on a fixed random sample of stored entries, the
  target sum and the row sums of the log-normalised matrix on 1000 sampled rows;
- ``hvg_*``: highly_variable_genes(flavor="seurat_v3", n_top_genes=2000 (Xenium: 100), layer="counts"),
  batch-aware (batch_key="batch") on the two DLPFC sections merged on their common genes, where
  ``hvg_mask_paper`` is flavor="seurat_v3_paper" (batches first, then median rank);
- ``pca_*``: on scanpy's own HVGs of the log-normalised data, pp.scale(max_value=10) then
  pp.pca(n_comps=50, svd_solver="arpack"): variance, variance ratio and the first 10 loadings (float32);
- ``qc_*`` (MOB): calculate_qc_metrics with the ribosomal protein genes as qc_vars (the table holds no
  mitochondrial gene; flags by symbol from Ensembl 98, see tests/_pp_data.annotation).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import _pp_data as D  # noqa: E402
import scanpy as sc  # noqa: E402

SHARED = Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
OUT = ROOT / "tests" / "data" / "scanpy_ref"
N_LOADINGS = 10
N_SAMPLE = 4000


def _norm_refs(a) -> dict:
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=None)
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    sc.pp.log1p(b)
    x = b.X.tocsr()
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(x.nnz, size=min(N_SAMPLE, x.nnz), replace=False))
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[pick]
    return {"norm_rows": rows.astype(np.int32), "norm_cols": x.indices[pick].astype(np.int32),
            "norm_lognorm": x.data[pick].astype(np.float32),
            "norm_target_sum": np.float64(np.median(totals[totals > 0])),
            "norm_sum_rows": (sum_rows := np.sort(rng.choice(x.shape[0], size=min(1000, x.shape[0]),
                                                              replace=False)).astype(np.int32)),
            "norm_rowsums": np.asarray(x[sum_rows].sum(axis=1, dtype=np.float64)).ravel()}, b


def _hvg_refs(a, n_top: int, batch_key: str | None = None) -> dict:
    b = a.copy()
    sc.pp.highly_variable_genes(b, flavor="seurat_v3", n_top_genes=n_top, layer="counts", batch_key=batch_key)
    out = {"hvg_mask": b.var["highly_variable"].to_numpy(bool),
           "hvg_vars_norm": b.var["variances_norm"].to_numpy(np.float32),
           "hvg_rank": b.var["highly_variable_rank"].to_numpy(np.float32),
           "hvg_n_top": np.int64(n_top)}
    if batch_key is not None:
        out["hvg_nbatches"] = b.var["highly_variable_nbatches"].to_numpy(np.int64)
        c = a.copy()  # Seurat's own batch order: number of batches first, then median rank
        sc.pp.highly_variable_genes(c, flavor="seurat_v3_paper", n_top_genes=n_top, layer="counts",
                                    batch_key=batch_key)
        out["hvg_mask_paper"] = c.var["highly_variable"].to_numpy(bool)
    return out


def _pca_refs(lognormed, mask, n_comps: int = 50) -> dict:
    b = lognormed[:, mask].copy()
    sc.pp.scale(b, max_value=10)
    sc.pp.pca(b, n_comps=n_comps, svd_solver="arpack", random_state=0)
    return {"pca_mask": np.asarray(mask, bool), "pca_variance": b.uns["pca"]["variance"].astype(np.float64),
            "pca_variance_ratio": b.uns["pca"]["variance_ratio"].astype(np.float64),
            "pca_loadings": b.varm["PCs"][:, :N_LOADINGS].astype(np.float32)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"scanpy {sc.__version__}; shared data {SHARED}")

    # DLPFC 151673 alone
    x, obs, ids, names = D.dlpfc(SHARED, "151673")
    a = D.to_anndata(x, obs, ids, names)
    refs, lognormed = _norm_refs(a)
    refs.update(_hvg_refs(a, 2000))
    refs.update(_pca_refs(lognormed, refs["hvg_mask"]))
    np.savez_compressed(OUT / "dlpfc_151673.npz", n_vars=np.int64(len(ids)), **refs)

    # both DLPFC sections, common genes, batch-aware HVGs
    x, obs, ids, names, batch = D.dlpfc_merged(SHARED)
    a = D.to_anndata(x, obs, ids, names, batch)
    refs, lognormed = _norm_refs(a)
    refs.update(_hvg_refs(a, 2000, batch_key="batch"))
    refs.update(_pca_refs(lognormed, refs["hvg_mask"]))
    np.savez_compressed(OUT / "dlpfc_merged.npz", n_vars=np.int64(len(ids)), **refs)

    # Xenium mouse brain: 248 genes, PCA on all of them
    x, obs, ids, names = D.xenium(SHARED)
    a = D.to_anndata(x, obs, ids, names)
    refs, lognormed = _norm_refs(a)
    refs.update(_hvg_refs(a, 100))
    refs.update(_pca_refs(lognormed, np.ones(a.n_vars, bool)))
    np.savez_compressed(OUT / "xenium_mouse_brain.npz", n_vars=np.int64(len(ids)), **refs)

    # mouse olfactory bulb: symbols only; qc with the ribosomal protein genes
    x, obs, symbols = D.mob(SHARED)
    a = D.to_anndata(x, obs, symbols)
    ann = D.annotation(SHARED, "mouse")
    a.var["ribo"] = a.var_names.isin(set(ann.loc[ann["ribo"], "gene_name"].dropna()))
    refs, _ = _norm_refs(a)
    refs.update(_hvg_refs(a, 2000))
    q = a.copy()
    sc.pp.calculate_qc_metrics(q, qc_vars=["ribo"], inplace=True, percent_top=None, log1p=False)
    refs.update({"qc_total_counts": q.obs["total_counts"].to_numpy(np.float64),
                 "qc_n_genes": q.obs["n_genes_by_counts"].to_numpy(np.int64),
                 "qc_pct_ribo": q.obs["pct_counts_ribo"].to_numpy(np.float64),
                 "qc_n_cells": q.var["n_cells_by_counts"].to_numpy(np.int64),
                 "qc_ribo_mask": a.var["ribo"].to_numpy(bool)})
    np.savez_compressed(OUT / "mob_rep11.npz", n_vars=np.int64(len(symbols)), **refs)
    for f in sorted(OUT.glob("*.npz")):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
