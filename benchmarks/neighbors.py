"""Neighbour-graph benchmark: kNN + fuzzy graph, Leiden, UMAP on the Xenium brain and DLPFC 151673.

    python benchmarks/neighbors.py [--gpu] [--sets xenium,dlpfc]

Each step prints wall time and peak resident memory above the start (benchmarks/_util.measure); with
``--gpu`` also the peak CUDA memory. scanpy's steps run next to expkit's in the same process when scanpy
is importable (e.g. ``/work/peers/.venv/bin/python benchmarks/neighbors.py``; set ``BENCH_EXTRA_SITE`` to
a site-packages folder appended to sys.path for missing igraph/leidenalg). Input: the fixed PCA of
tests/reference/nn_inputs.py (50 components), n_neighbors=15, exact kNN on both sides. Steps are the
``STEPS`` list of ``(name, expkit_fn, scanpy_fn)``, each fn taking ``(adata, ctx)``; benchmarks/preprocess.py
imports the same step functions to time the whole chain qc -> ... -> scale_pca -> knn -> leiden -> umap
(there expkit's kNN reads ``obsm['pca']``, scanpy's ``obsm['X_pca']``, as here).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reference"))
if os.environ.get("BENCH_EXTRA_SITE"):
    sys.path.append(os.environ["BENCH_EXTRA_SITE"])

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._util import SHARED, max_rss_mb, measure  # noqa: E402

import expkit as ek  # noqa: E402
import nn_inputs as N  # noqa: E402

ek.settings.progress = False
logging.getLogger("expkit").setLevel(logging.WARNING)
K = 15  # n_neighbors on both sides
RESOLUTION = 1.0  # Leiden resolution on both sides
SEED = 0


def _adata(P, barcodes):
    a = ad.AnnData(obs={"barcode": barcodes})
    a.obs_names = barcodes
    a.obsm["pca"] = P
    a.obsm["X_pca"] = P
    return a


def _e_knn(a, ctx):
    import expkit.tl as tl

    return tl.knn(a, n_neighbors=K, use_rep=ctx.get("use_rep", "pca"), use_gpu=ctx["use_gpu"])


def _e_leiden(a, ctx):
    import expkit.tl as tl

    return tl.leiden(a, resolution=RESOLUTION, seed=SEED)


def _e_umap(a, ctx):
    import expkit.tl as tl

    return tl.umap(a, seed=SEED, use_gpu=ctx["use_gpu"])


def _s_knn(a, ctx):
    import scanpy as sc

    kw = {"transformer": "sklearn"} if a.n_obs >= 8192 else {}  # exact kNN on both sides
    sc.pp.neighbors(a, n_neighbors=K, use_rep="X_pca", method="umap", key_added="sc", **kw)


def _s_leiden(a, ctx):
    import leidenalg  # noqa: F401  (scanpy's flavour; ImportError skips the step)

    import scanpy as sc

    sc.tl.leiden(a, resolution=RESOLUTION, random_state=SEED, flavor="leidenalg", n_iterations=-1, directed=True,
                 neighbors_key="sc", key_added="sc.leiden")


def _s_umap(a, ctx):
    import scanpy as sc

    sc.tl.umap(a, min_dist=0.5, random_state=SEED, neighbors_key="sc")


# (name, expkit fn, scanpy fn); fns take (adata, ctx) like benchmarks/preprocess.py's Step
STEPS = [
    ("knn + fuzzy graph (exact, k=15)", _e_knn, _s_knn),
    ("leiden (RBConfiguration, resolution 1)", _e_leiden, _s_leiden),
    ("umap (min_dist 0.5)", _e_umap, _s_umap),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--sets", default="xenium,dlpfc")
    args = p.parse_args()
    import torch

    try:
        import scanpy as sc
    except ImportError:  # pragma: no cover - CI has no scanpy
        sc = None

    for name in args.sets.split(","):
        P, barcodes = N.pca_input(SHARED, name)
        print(f"\n== {name}: {P.shape[0]} x {P.shape[1]} (PCA), n_neighbors={K}, torch threads "
              f"{torch.get_num_threads()}")
        adata = _adata(P, barcodes)
        ctx = {"dataset": name, "use_gpu": args.gpu}
        runs = [("expkit " + n, e) for n, e, _ in STEPS]
        if sc is not None:
            runs += [("scanpy " + n, f) for n, _, f in STEPS]
        for label, step in runs:
            if args.gpu and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                with measure(label) as info:
                    cpu0 = time.process_time()
                    out = step(adata, ctx)
                    info["cpu"] = f"{time.process_time() - cpu0:.1f}s"  # CPU time: robust on a shared machine
                    if isinstance(out, dict) and "n_clusters" in out:
                        info["clusters"] = out["n_clusters"]
            except ImportError as err:
                print(f"{label}: skipped ({err})")
                continue
            if args.gpu and torch.cuda.is_available() and label.startswith("expkit"):
                print(f"{'':<48} cuda peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        if sc is not None and "sc.leiden" in adata.obs:
            from sklearn.metrics import adjusted_rand_score

            print(f"leiden ARI expkit vs scanpy: {adjusted_rand_score(adata.obs['leiden'], adata.obs['sc.leiden']):.3f}")
        if sc is not None and "X_umap" in adata.obsm:
            rows = None if adata.n_obs <= 5000 else np.sort(np.random.default_rng(0).choice(adata.n_obs, 4000,
                                                                                           replace=False))
            print(f"umap trustworthiness (k={K}{'' if rows is None else ', 4000 cells'}): expkit "
                  f"{N.trust(P, adata.obsm['umap'], rows, K):.4f}  scanpy {N.trust(P, adata.obsm['X_umap'], rows, K):.4f}")
    print(f"\nprocess peak RSS: {max_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
