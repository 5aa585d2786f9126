"""Make the scanpy reference fixtures of tests/test_neighbors.py (tests/data/scanpy_ref/nn_*.npz).

Run from the project root with the peers environment (scanpy, umap-learn; igraph + leidenalg are taken
from the project's venv, appended at the end of sys.path, when the peers venv lacks them):

    OMP_NUM_THREADS=1 /work/peers/.venv/bin/python tests/reference/make_scanpy_nn_refs.py [/path/to/shared/data]

Per dataset (DLPFC 151673, Xenium mouse brain) on the fixed PCA of tests/reference/nn_inputs.py:
``sc.pp.neighbors(method="umap", n_neighbors=15, use_rep="X_pca")`` with exact brute-force kNN (scikit-learn's
KNeighborsTransformer: scanpy's default below 8,192 cells, ``transformer="sklearn"`` above), ``sc.tl.leiden(flavor="leidenalg",
resolution=1, random_state=0)`` and ``sc.tl.umap(min_dist=0.5, random_state=0)``. Stored (small): a
checksum of the input, the kNN indices (all rows for DLPFC, every 20th row for Xenium), the kNN distances,
connectivity rows and row sums of every 8th (DLPFC) / 40th (Xenium) row, the connectivities' nnz and
total, the Leiden labels, and the UMAP's trustworthiness and kNN preservation (Xenium: on a stored subset
of 4,000 cells).

Note: the connectivities are copied right after ``sc.pp.neighbors``: ``sc.tl.umap`` prunes
``obsp['connectivities']`` in place (umap-learn zeroes the edges below max/n_epochs of the COO view it
gets, whose data array is shared with the CSR matrix).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE.parent / "data" / "scanpy_ref"
MAIN_SITE = Path("/work/main/.venv/lib/python3.11/site-packages")

try:
    import leidenalg  # noqa: F401
except ImportError:
    if MAIN_SITE.is_dir():
        sys.path.append(str(MAIN_SITE))

import anndata as ad  # noqa: E402
import scanpy as sc  # noqa: E402
import umap  # noqa: E402

import nn_inputs as N  # noqa: E402

K = 15
FILES = {"dlpfc": "nn_dlpfc151673.npz", "xenium": "nn_xenium_mouse_brain.npz"}
PLAN = {  # name: (knn row step, connectivity/distance row step, trustworthiness subset size or None)
    "dlpfc": (1, 8, None),
    "xenium": (20, 40, 4000),
}


def main(shared: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (knn_step, conn_step, n_trust) in PLAN.items():
        t0 = time.time()
        P, barcodes = N.pca_input(shared, name)
        n = P.shape[0]
        adata = ad.AnnData(obs={"barcode": barcodes})
        adata.obs_names = barcodes
        adata.obsm["X_pca"] = P
        kw = {"transformer": "sklearn"} if n >= 8192 else {}
        sc.pp.neighbors(adata, n_neighbors=K, use_rep="X_pca", method="umap", **kw)
        t_nn = time.time() - t0
        # copies now: sc.tl.umap zeroes edges below max/n_epochs of obsp['connectivities'] in place
        C = adata.obsp["connectivities"].tocsr().copy()
        D = adata.obsp["distances"].tocsr().copy()
        sc.tl.leiden(adata, resolution=1.0, random_state=0, flavor="leidenalg")
        sc.tl.umap(adata, min_dist=0.5, random_state=0)
        # kNN indices with self at column 0 (scanpy's distances hold the k-1 others per row)
        idx = np.empty((n, K), dtype=np.int64)
        dist = np.empty((n, K), dtype=np.float64)
        for i in range(n):  # reference script: clarity over speed
            cols, vals = D.indices[D.indptr[i]:D.indptr[i + 1]], D.data[D.indptr[i]:D.indptr[i + 1]]
            o = np.argsort(vals, kind="stable")
            idx[i, 0], dist[i, 0] = i, 0.0
            idx[i, 1:], dist[i, 1:] = cols[o], vals[o]
        krows = N.subset_rows(n, knn_step)
        crows = N.subset_rows(n, conn_step)
        sub = C[crows]
        Y = adata.obsm["X_umap"]
        trows = None
        if n_trust is not None:
            trows = np.sort(np.random.default_rng(0).choice(n, n_trust, replace=False))
        tw = N.trust(P, Y, trows, K)
        kp = N.knn_preservation(P, Y, trows, K)
        labels = adata.obs["leiden"].cat.codes.to_numpy().astype(np.int8)
        np.savez_compressed(
            OUT / FILES[name],
            n=n, k=K, pca_head=P[:5], pca_abssum=np.abs(P.astype(np.float64)).sum(0),
            knn_rows=krows.astype(np.uint32), knn_idx=idx[krows].astype(np.uint16),
            dist_rows=crows.astype(np.uint32), knn_dist=dist[crows].astype(np.float32),
            conn_indptr=sub.indptr.astype(np.uint32), conn_indices=sub.indices.astype(np.uint16),
            conn_data=sub.data.astype(np.float32), conn_rowsum=np.asarray(sub.sum(1)).ravel().astype(np.float32),
            conn_nnz=C.nnz, conn_total=float(C.sum(dtype=np.float64)),
            leiden=labels, trust=tw, knn_pres=kp,
            trust_rows=(np.arange(n) if trows is None else trows).astype(np.uint32),
            versions=np.array([f"scanpy {sc.__version__}", f"umap-learn {umap.__version__}",
                               f"numpy {np.__version__}"]),
        )
        print(f"{name}: n={n} neighbors {t_nn:.1f}s total {time.time() - t0:.1f}s, leiden "
              f"{labels.max() + 1} clusters, umap trust {tw:.4f} knn-pres {kp:.4f}, "
              f"{(OUT / FILES[name]).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXPKIT_SHARED_DATA", "/work/shared/data"))
    main(shared)
