"""Reference values from scanpy and harmonypy for tests/test_markers.py and tests/test_integrate.py.

Run from the project root with the peers venv (scanpy, harmonypy; never installed in expkit's venv):

    OMP_NUM_THREADS=1 /work/peers/.venv/bin/python tests/reference/make_scanpy_de_refs.py [SHARED_DATA]

SHARED_DATA defaults to $EXPKIT_SHARED_DATA or ../shared/data. Writes tests/data/scanpy_ref/:
  dlpfc151673_de.npz   scanpy 1.11 rank_genes_groups on DLPFC 151673 (labelled spots, groups = manual
                       layers, layer "lognorm"), genes in var order, for groups L1, L4, WM vs rest
                       (wilcoxon tie_correct=True and t-test) and WM vs L1 (wilcoxon).
  dlpfc_pair_harmony.npz  harmonypy on the PCA (20 comps) of 151673 + 151674: corrected embedding
                       (float16) with settings matching expkit's defaults, and with harmonypy's own defaults.
  versions.json        the versions used.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _de_helpers import dlpfc, dlpfc_pair_pca  # noqa: E402

OUT = HERE.parent / "data" / "scanpy_ref"
GROUPS = ["L1", "L4", "WM"]


def _by_var(adata, key, group, field):
    rec = adata.uns[key]
    names = np.asarray(rec["names"][group]).astype(str)
    vals = np.asarray(rec[field][group])
    pos = adata.var_names.get_indexer(names)
    out = np.full(adata.n_vars, np.nan, dtype=vals.dtype)
    out[pos] = vals
    return out


def main(root: Path) -> None:
    import harmonypy
    import scanpy as sc

    OUT.mkdir(parents=True, exist_ok=True)
    adata = dlpfc(root, "151673")
    arrays = {"uid": np.asarray(adata.var_names, dtype="U")}
    timings = {}
    for method, key in (("wilcoxon", "wil"), ("t-test", "tt")):
        t0 = time.perf_counter()
        sc.tl.rank_genes_groups(adata, "layer", method=method, layer="lognorm", use_raw=False,
                                tie_correct=True, pts=True, key_added=key, corr_method="benjamini-hochberg")
        timings[method] = time.perf_counter() - t0
        for g in GROUPS:
            arrays[f"{key}.{g}.scores"] = _by_var(adata, key, g, "scores")
            arrays[f"{key}.{g}.pvals"] = _by_var(adata, key, g, "pvals")
            arrays[f"{key}.{g}.pvals_adj"] = _by_var(adata, key, g, "pvals_adj")
            arrays[f"{key}.{g}.logfoldchanges"] = _by_var(adata, key, g, "logfoldchanges")
        if key == "wil":
            pts = adata.uns[key]["pts"].reindex(adata.var_names)
            pts_rest = adata.uns[key]["pts_rest"].reindex(adata.var_names)
            for g in GROUPS:
                arrays[f"wil.{g}.pts"] = pts[g].to_numpy()
                arrays[f"wil.{g}.pts_rest"] = pts_rest[g].to_numpy()
    sc.tl.rank_genes_groups(adata, "layer", groups=["WM"], reference="L1", method="wilcoxon", layer="lognorm",
                            use_raw=False, tie_correct=True, key_added="ref")
    for field in ("scores", "pvals", "pvals_adj", "logfoldchanges"):
        arrays[f"ref.WM.{field}"] = _by_var(adata, "ref", "WM", field)
    np.savez_compressed(OUT / "dlpfc151673_de.npz", **arrays)

    emb, batch, _ = dlpfc_pair_pca(root)
    import pandas as pd

    meta = pd.DataFrame({"batch": batch})
    h = {}
    t0 = time.perf_counter()
    ho = harmonypy.run_harmony(emb, meta, "batch", theta=2.0, lamb=1.0, sigma=0.1, max_iter_harmony=10,
                               max_iter_kmeans=20, epsilon_cluster=1e-5, epsilon_harmony=1e-4,
                               random_state=0, verbose=False, ncores=1)
    timings["harmonypy_matched"] = time.perf_counter() - t0
    h["matched"] = np.asarray(ho.Z_corr).T.astype(np.float16)
    t0 = time.perf_counter()
    hd = harmonypy.run_harmony(emb, meta, "batch", random_state=0, verbose=False, ncores=1)
    timings["harmonypy_default"] = time.perf_counter() - t0
    h["default"] = np.asarray(hd.Z_corr).T.astype(np.float16)
    np.savez_compressed(OUT / "dlpfc_pair_harmony.npz", **h)
    (OUT / "versions.json").write_text(json.dumps({
        "scanpy": sc.__version__, "harmonypy": getattr(harmonypy, "__version__", "2.1.0"),
        "anndata": __import__("anndata").__version__, "numpy": np.__version__,
        "timings_s": timings}, indent=1) + "\n")
    print(json.dumps(timings))


if __name__ == "__main__":
    default = os.environ.get("EXPKIT_SHARED_DATA", str(HERE.parents[2] / "shared" / "data"))
    main(Path(sys.argv[1] if len(sys.argv) > 1 else default))
