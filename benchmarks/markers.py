"""Time and peak memory of expkit.tl.markers (Wilcoxon, t-test) and expkit.tl.integrate (Harmony),
next to scanpy / harmonypy when they are importable.

    OMP_NUM_THREADS=1 python benchmarks/markers.py [--shared ../shared/data] [--threads 1] [--out FILE]

Datasets: DLPFC 151673 (3,611 labelled spots x 5,000 genes, groups = the 7 manual layers), Xenium mouse
brain (36,602 cells x 248 genes, groups = k-means (k=12, seed 0) on the PCA of the log-normalised
counts) and, for Harmony, the PCA (20 comps) of DLPFC 151673 + 151674 (7,312 spots, 2 batches).
Each case runs in a fresh process; peak memory is the rise of the process high-water mark (VmHWM,
reset through /proc/self/clear_refs after the data are loaded), so it counts torch and numpy buffers.
Run it with the peers venv (scanpy, harmonypy, torch and the repository on sys.path) to get both columns.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return float(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _xenium(shared: Path):
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from sklearn.cluster import KMeans

    from _de_helpers import lognorm, pca

    with h5py.File(shared / "xenium_mouse_brain" / "cell_feature_matrix.h5", "r") as f:
        m = f["matrix"]
        mat = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=tuple(m["shape"][()]))
        ftype = m["features/feature_type"][()].astype(str)
        ids = m["features/id"][()].astype(str)
        names = m["features/name"][()].astype(str)
        barcodes = m["barcodes"][()].astype(str)
    keep = ftype == "Gene Expression"
    X = sp.csr_matrix(mat.T.tocsr()[:, keep].astype(np.float32))
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame({"gene": names[keep]}, index=ids[keep]))
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    a.layers["lognorm"] = lognorm(a.X)
    emb = pca(a.layers["lognorm"].toarray(), 20)
    a.obs["cluster"] = pd.Categorical(KMeans(12, n_init=1, random_state=0).fit_predict(emb).astype(str))
    return a


def _load(case: str, shared: Path):
    from _de_helpers import dlpfc, dlpfc_pair_pca

    if case == "dlpfc":
        return dlpfc(shared, "151673"), "layer"
    if case.startswith("xenium"):
        return _xenium(shared), "cluster"
    emb, batch, _ = dlpfc_pair_pca(shared)
    return (emb, batch), None


def _run(case: str, tool: str, method: str, shared: str, threads: int, q) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        data, groupby = _load(case, Path(shared))
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        if method == "harmony":
            import numpy as np
            import pandas as pd

            emb, batch = data
            if tool.startswith("expkit"):
                import anndata as ad

                from expkit.tl import integrate

                a = ad.AnnData(np.zeros((len(batch), 1), dtype=np.float32), obs=pd.DataFrame({"batch": batch}))
                a.obsm["pca"] = emb
                t0 = time.perf_counter()
                integrate(a, seed=0, dtype="float32" if tool == "expkit-f32" else "float64")
            else:
                import harmonypy

                harmonypy.run_harmony(emb, pd.DataFrame({"batch": batch}), "batch", theta=2.0, lamb=1.0,
                                      max_iter_kmeans=20, epsilon_cluster=1e-5, epsilon_harmony=1e-4,
                                      random_state=0, verbose=False, ncores=threads)
        elif tool == "expkit":
            from expkit.tl import markers

            markers(data, groupby=groupby, method=method, layer="lognorm")
        else:
            import scanpy as sc

            sc.tl.rank_genes_groups(data, groupby, method=method, layer="lognorm", use_raw=False,
                                    tie_correct=True, pts=True)
        q.put({"case": case, "tool": tool, "method": method, "seconds": round(time.perf_counter() - t0, 2),
               "peak_mib": round(_status("VmHWM") - base, 1)})
    except Exception as e:  # report and go on
        q.put({"case": case, "tool": tool, "method": method, "error": repr(e)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("EXPKIT_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--cases", default="dlpfc,xenium,dlpfc_pair")
    args = ap.parse_args()
    import importlib.util

    tools = ["expkit"]
    others = {"markers": "scanpy", "harmony": "harmonypy"}
    plan = []
    for case in args.cases.split(","):
        methods = ["harmony"] if case == "dlpfc_pair" else ["wilcoxon", "t-test"]
        for method in methods:
            extra = ["expkit-f32"] if method == "harmony" else []
            for tool in tools + extra + [others["harmony" if method == "harmony" else "markers"]]:
                if not tool.startswith("expkit") and importlib.util.find_spec(tool) is None:
                    continue
                plan.append((case, tool, method))
    ctx = mp.get_context("spawn")
    rows = []
    print(f"{'case':<11} {'method':<9} {'tool':<10} {'seconds':>8} {'peak MiB':>9}")
    for case, tool, method in plan:
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(case, tool, method, args.shared, args.threads, q))
        p.start()
        row = q.get()
        p.join()
        rows.append(row)
        if "error" in row:
            print(f"{case:<11} {method:<9} {tool:<10} error: {row['error']}")
        else:
            print(f"{case:<11} {method:<9} {tool:<10} {row['seconds']:>8.2f} {row['peak_mib']:>9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
