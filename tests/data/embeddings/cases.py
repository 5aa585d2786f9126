"""Real-derived inputs for the SpaCon and Phenocoder tests, benchmark and tutorials (see README.md here).

``connectome_case``: a crop of DLPFC 151673 (real counts, real coordinates, real manual layers) with a
connectivity matrix built the way wide-field functional connectivity is: the correlation over time of an
activity trace per spot. Each trace is ``a * C_c(t) + b * E(t) @ u_i + noise``: a planted community signal
``C_c`` shared by the spots of community ``c`` (4 communities, each two stripes of the section far apart,
like homotopic areas of the two hemispheres), and the real expression of the spot (``u_i``: its unit-norm
expression principal components) driving shared components ``E``; the expression part is kept only within a
distance band (pairs closer than ``band`` spot spacings), as co-activation of nearby tissue.
``nuclei_case``: the nuclei of squidpy's H&E crop of a mouse brain segmented with expkit's watershed.
"""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SPACING = 137.0  # full-resolution pixels between neighbouring Visium spot centres in 151673 (about 100 um)


def read_dlpfc(shared: Path, sample: str = "151673"):
    root = Path(shared) / "dlpfc" / sample
    with h5py.File(root / "filtered_feature_bc_matrix_top5000genes.h5", "r") as f:
        m = f["matrix"]
        x = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=tuple(m["shape"][()]))
        barcodes = [b.decode() for b in m["barcodes"][()]]
        ids = [b.decode() for b in m["features/id"][()]]
        names = [b.decode() for b in m["features/name"][()]]
    x = sp.csr_matrix(x.T, dtype=np.float32)
    pos = pd.read_csv(root / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "row", "col", "pxl_row", "pxl_col"]).set_index("barcode")
    pos = pos.loc[barcodes]
    truth = pd.read_csv(root / f"{sample}_truth.txt", sep="\t", header=None, index_col=0)[1]
    obs = pd.DataFrame({"sample": sample, "barcode": barcodes,
                        "layer": truth.reindex(barcodes).to_numpy()}, index=barcodes)
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame({"gene": names}, index=ids))
    a.var_names_make_unique()
    a.layers["counts"] = x.copy()
    a.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(np.float64)
    return a


def _expression_pcs(counts, k: int, seed: int) -> np.ndarray:
    tot = np.asarray(counts.sum(1)).ravel()
    x = sp.diags(np.median(tot) / np.maximum(tot, 1)) @ counts
    x = np.log1p(x.toarray())
    x = x[:, x.var(0) > 0]
    x = (x - x.mean(0)) / x.std(0)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x @ rng.standard_normal((x.shape[1], k + 10)))
    u, s, _ = np.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ u[:, :k]) * s[:k]


def connectome_case(shared: Path, *, n_max: int = 1200, n_communities: int = 4, n_time: int = 120,
                    a: float = 0.7, b: float = 1.0, band: float = 3.0, seed: int = 0):
    """(AnnData of the crop, connectivity n x n, planted community per spot). Module doc."""
    adata = read_dlpfc(shared)
    adata = adata[adata.obs["layer"].notna().to_numpy()].copy()
    xy = adata.obsm["spatial"]
    # a crop across all layers: the spots nearest to the section's centre along y, full width in x
    order = np.argsort(np.abs(xy[:, 1] - np.median(xy[:, 1])), kind="stable")[:n_max]
    adata = adata[np.sort(order)].copy()
    xy = adata.obsm["spatial"]
    n = adata.n_obs
    stripes = np.minimum((2 * n_communities) * (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0]),
                         2 * n_communities - 1).astype(int)
    community = stripes % n_communities
    rng = np.random.default_rng(seed)
    pcs = _expression_pcs(adata.layers["counts"], 10, seed)
    u = pcs / np.linalg.norm(pcs, axis=1, keepdims=True)
    comm = rng.standard_normal((n_communities, n_time))
    noise = rng.standard_normal((n, n_time))
    trace_c = a * comm[community] + noise
    trace_e = b * u @ rng.standard_normal((u.shape[1], n_time)) + noise
    fc_c = np.corrcoef(trace_c)
    fc_e = np.corrcoef(trace_e)
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    fc = np.where(d2 <= (band * SPACING) ** 2, np.maximum(fc_c, fc_e), fc_c)
    np.fill_diagonal(fc, 1.0)
    adata.obs["community"] = pd.Categorical(community.astype(str))
    return adata, fc, community


def nuclei_case(shared: Path, workdir: Path, *, smooth: float = 2.0):
    """(AnnData of the nuclei, its ImageStore): squidpy's H&E crop of a mouse brain (BSD-3, the squidpy test
    image) in an image store at ``workdir``, smoothed, nuclei segmented by the hematoxylin watershed of
    :func:`expkit.spatial.image_segment`, one observation per nucleus (area, mean colour, centroid)."""
    import matplotlib.pyplot as plt

    import expkit as ek
    from expkit.io.images import ImageStore

    fix = Path(shared) / "visium_fixtures"
    b = ad.read_h5ad(fix / "squidpy_test_data.h5ad")
    store = ImageStore(Path(workdir) / "nuclei.images.h5")
    store.write("fullres", plt.imread(fix / "squidpy_test_img.jpg"), channels=["r", "g", "b"], overwrite=True)
    ek.spatial.image_process(b, channels="fullres/r,g,b", method="smooth", sigma=smooth, key_added="smooth",
                             image_store=store)
    ek.spatial.image_segment(b, channel="smooth/r,g,b", method="watershed", hematoxylin=True, min_area=20,
                             intensity_channels="smooth/r,g,b", image_store=store, key_added="segmentation")
    cells = ek.spatial.objects_to_adata(b, key="segmentation", sample="mouse_brain")
    return cells, store
