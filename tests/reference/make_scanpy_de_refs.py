"""Reference values from scanpy and harmonypy for tests/test_markers.py and tests/test_integrate.py.

Run from the project root with the peers venv (scanpy, harmonypy; never installed in expkit's venv):

    OMP_NUM_THREADS=1 /work/peers/.venv/bin/python tests/reference/make_scanpy_de_refs.py [SHARED_DATA]

(--harmony-only redoes only dlpfc_pair_harmony.npz.) SHARED_DATA defaults to $EXPKIT_SHARED_DATA or
../shared/data. Writes tests/data/scanpy_ref/:
  dlpfc151673_de.npz   scanpy 1.11 rank_genes_groups on DLPFC 151673 (labelled spots, groups = manual
                       layers, layer "lognorm"), genes in var order: groups L1 and WM vs rest, scores and
                       p-values of wilcoxon (tie_correct=True) and t-test, logfoldchanges (the same for
                       both), BH q-values and pts of WM; WM vs L1 (wilcoxon) scores and p-values.
  dlpfc_pair_harmony.npz  harmonypy on the PCA (20 comps) of 151673 + 151674: first 10 corrected dims
                       (float16) with settings matching expkit's defaults ("matched"), first 3 with
                       harmonypy 2.1's own defaults ("default_first3").
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
GROUPS = ["L1", "WM"]
N_DIMS = 10  # harmonypy output stored for the first 10 of 20 corrected dimensions (size)


def _by_var(adata, key, group, field):
    rec = adata.uns[key]
    names = np.asarray(rec["names"][group]).astype(str)
    vals = np.asarray(rec[field][group])
    pos = adata.var_names.get_indexer(names)
    out = np.full(adata.n_vars, np.nan, dtype=vals.dtype)
    out[pos] = vals
    return out


def _cells_by_dims(z, n_cells: int) -> np.ndarray:
    z = np.asarray(z)
    return z if z.shape[0] == n_cells else z.T


def main(root: Path, harmony_only: bool = False) -> None:
    import harmonypy
    import scanpy as sc

    OUT.mkdir(parents=True, exist_ok=True)
    adata = dlpfc(root, "151673")
    if harmony_only:
        adata = adata[:, :10].copy()
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
            if key == "wil":  # the same for both methods: stored once
                arrays[f"{key}.{g}.logfoldchanges"] = _by_var(adata, key, g, "logfoldchanges")
        arrays[f"{key}.WM.pvals_adj"] = _by_var(adata, key, "WM", "pvals_adj")
        if key == "wil":
            arrays["wil.WM.pts"] = adata.uns[key]["pts"].reindex(adata.var_names)["WM"].to_numpy()
            arrays["wil.WM.pts_rest"] = adata.uns[key]["pts_rest"].reindex(adata.var_names)["WM"].to_numpy()
    sc.tl.rank_genes_groups(adata, "layer", groups=["WM"], reference="L1", method="wilcoxon", layer="lognorm",
                            use_raw=False, tie_correct=True, key_added="ref")
    for field in ("scores", "pvals"):
        arrays[f"ref.WM.{field}"] = _by_var(adata, "ref", "WM", field)
    if not harmony_only:
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
    h["matched"] = _cells_by_dims(ho.Z_corr, len(batch))[:, :N_DIMS].astype(np.float16)
    t0 = time.perf_counter()
    hd = harmonypy.run_harmony(emb, meta, "batch", random_state=0, verbose=False, ncores=1)
    timings["harmonypy_default"] = time.perf_counter() - t0
    h["default_first3"] = _cells_by_dims(hd.Z_corr, len(batch))[:, :3].astype(np.float16)
    np.savez_compressed(OUT / "dlpfc_pair_harmony.npz", **h)
    if harmony_only:
        return
    (OUT / "versions.json").write_text(json.dumps({
        "scanpy": sc.__version__, "harmonypy": getattr(harmonypy, "__version__", "2.1.0"),
        "anndata": __import__("anndata").__version__, "numpy": np.__version__,
        "timings_s": timings}, indent=1) + "\n")
    print(json.dumps(timings))


if __name__ == "__main__":
    default = os.environ.get("EXPKIT_SHARED_DATA", str(HERE.parents[2] / "shared" / "data"))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0] if args else default), harmony_only="--harmony-only" in sys.argv)
