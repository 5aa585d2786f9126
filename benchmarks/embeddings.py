"""Learned spatial embeddings: SpaCon (expression + connectivity) and Phenocoder (nuclei image patches).

    python benchmarks/embeddings.py [--spacon-venv /work/spaconvenv] [--n-spots 1200] [--epochs 5]

SpaCon: the real-derived DLPFC connectome case of tests/data/embeddings/cases.py (151673 spots, planted
communities); expkit's SpaCon (neighbour sampling, fanouts 20/10/10) and, where the side venv has it, the
``spacon`` package's own network (``spacon.model.SpaCon``) trained full-batch on the same features and graphs
(torch-geometric's NeighborLoader needs pyg-lib or torch-sparse, which have no wheel for that torch); both
feature sets are clustered by the same fusion + Leiden. Quality: ARI against the planted communities
(alpha=1), ARI against the manual layers (alpha=0) and the agreement of the two implementations.
Phenocoder: the 1,829 nuclei of squidpy's H&E crop (expkit's watershed), train_patch_cvae at its defaults
(24 x 24 patches, latent 16); quality: the reconstruction error (posterior means decoded) of the validation
patches held out of training against a PCA of the same size fitted on the training patches, and how well the
latents tell small from large nuclei (5-fold logistic regression accuracy; PCA scores of the same size).
The ``phenocoder`` reference is not on the package index: not compared.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data" / "embeddings"))

from benchmarks._util import SHARED, measure  # noqa: E402

REFERENCE = r'''
import json, sys, time
import numpy as np, torch
from spacon.model import SpaCon
d = np.load(sys.argv[1])
torch.manual_seed(int(sys.argv[3]))
x = torch.as_tensor(d["x"]); spa = torch.as_tensor(d["spa"]); con = torch.as_tensor(d["con"])
model = SpaCon([x.shape[1]] + [int(v) for v in d["hidden"]])
opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
t0 = time.perf_counter()
model.train()
for step in range(int(sys.argv[4])):
    opt.zero_grad()
    _, _, re = model(x, con, spa)
    loss = torch.nn.functional.mse_loss(x, re, reduction="sum")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
model.eval()
with torch.no_grad():
    f_con, f_spa, _ = model(x, con, spa)
np.savez(sys.argv[2], con=f_con.numpy(), spa=f_spa.numpy(), seconds=time.perf_counter() - t0)
'''


def _edges(a):
    import scipy.sparse as sp

    a = sp.csr_matrix(a) + sp.identity(a.shape[0], format="csr")
    coo = a.tocoo()
    return np.stack([coo.col, coo.row]).astype(np.int64)  # source -> target


def bench_spacon(args, results):
    from sklearn.metrics import adjusted_rand_score as ari

    import expkit
    from cases import connectome_case
    from expkit.spatial import connectome as C

    expkit.settings.progress = False
    adata, fc, comm = connectome_case(SHARED, n_max=args.n_spots)
    layers = adata.obs["layer"].astype(str).to_numpy()
    C.add_connectivity(adata, matrix=fc, key="fc", threshold=0.3)
    hidden = (128, 64, 32)
    with measure(f"expkit SpaCon embed ({adata.n_obs} spots, {args.epochs} epochs)", results) as info:
        out = C.spatial_connectome_embed(adata, connectivity_key="fc", threshold=0.3, k_cutoff=15, hidden=hidden,
                                         fanouts=(20, 10, 10), batch_size=64, epochs=args.epochs, seed=0)
        info["edges_con"] = out["n_connection_edges"]
    scores = {}
    for alpha, res in ((1.0, 0.1), (0.0, 0.2)):
        C.spatial_connectome_cluster(adata, alpha=alpha, resolution=res, seed=0, key_added=f"ek{alpha:g}")
    scores["expkit"] = {"ari_communities_alpha1": ari(comm, adata.obs["ek1"]),
                        "ari_layers_alpha0": ari(layers, adata.obs["ek0"]),
                        "ari_communities_alpha0": ari(comm, adata.obs["ek0"])}
    py = Path(args.spacon_venv) / "bin" / "python"
    if py.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            import torch

            x = C._features(adata, None, "counts", 50, 2000, 0, torch.device("cpu"))
            spa = C._spatial_graph(adata, 15, None, torch.device("cpu"))
            con = C._connection_graph(adata, "fc", 0.3)
            np.savez(f"{tmp}/in.npz", x=x, spa=_edges(spa), con=_edges(con), hidden=np.array(hidden))
            Path(f"{tmp}/ref.py").write_text(REFERENCE)
            steps = args.epochs * int(np.ceil(adata.n_obs / 64))
            t0 = time.perf_counter()
            run = subprocess.run([str(py), f"{tmp}/ref.py", f"{tmp}/in.npz", f"{tmp}/out.npz", "0", str(steps)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                print("spacon reference failed:", run.stderr[-2000:])
            else:
                ref = np.load(f"{tmp}/out.npz")
                print(f"{'spacon package (full batch, ' + str(steps) + ' steps)':<48} {float(ref['seconds']):8.2f} s   "
                      f"(process {time.perf_counter() - t0:.1f} s)")
                adata.obsm["ref.spa"], adata.obsm["ref.con"] = ref["spa"], ref["con"]
                for alpha, res in ((1.0, 0.1), (0.0, 0.2)):
                    C.spatial_connectome_cluster(adata, alpha=alpha, resolution=res, seed=0, embedding_key="ref",
                                                 key_added=f"ref{alpha:g}")
                scores["spacon package"] = {"ari_communities_alpha1": ari(comm, adata.obs["ref1"]),
                                            "ari_layers_alpha0": ari(layers, adata.obs["ref0"]),
                                            "ari_communities_alpha0": ari(comm, adata.obs["ref0"])}
                scores["agreement expkit vs package"] = {
                    "alpha1": ari(adata.obs["ek1"], adata.obs["ref1"]),
                    "alpha0": ari(adata.obs["ek0"], adata.obs["ref0"])}
    for k, v in scores.items():
        print(f"  {k}: " + ", ".join(f"{a}={b:.3f}" for a, b in v.items()))
    return scores


def bench_phenocoder(args, results):
    import anndata as ad
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    import expkit
    from expkit.io.images import ImageStore
    from expkit.kernels import phenocoder as K
    from expkit.spatial._patches import apply_scale
    from expkit.spatial.morphology import encode_patches, image_patches, train_patch_cvae

    expkit.settings.progress = False
    obs = pd.read_csv(Path(__file__).resolve().parents[1] / "tests/data/embeddings/squidpy_nuclei.tsv",
                      sep="\t", index_col=0)
    obs["sample"] = "mouse_brain"
    a = ad.AnnData(obs=obs)
    a.obsm["spatial"] = obs[["x", "y"]].to_numpy(np.float64)
    side, k = args.patch, args.latent
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(Path(tmp) / "img.h5")
        img = plt.imread(SHARED / "visium_fixtures" / "squidpy_test_img.jpg")[:, :, :3]
        store.write("fullres", np.ascontiguousarray(img), channels=["r", "g", "b"])
        with measure(f"expkit image_patches ({a.n_obs} nuclei, {side}x{side})", results):
            image_patches(a, channels="fullres/r,g,b", patch_size=(side, side), image_store=store)
    kw = {k_: v for k_, v in (("beta", args.beta), ("lr", args.lr)) if v is not None}
    cpu0 = time.process_time()
    with measure(f"expkit train_patch_cvae (<= {args.pheno_epochs} epochs, latent {k}, {kw or 'defaults'})",
                 results) as info:
        hist = train_patch_cvae(a, n_latent_dim=k, epochs=args.pheno_epochs, seed=args.seed, **kw)
        info["best_epoch"] = hist["best_epoch"] + 1
        info["epochs_run"] = len(hist["train"])
    cpu = time.process_time() - cpu0
    print(f"  train_patch_cvae CPU time {cpu:.1f} s (process, all threads)")
    encode_patches(a)
    entry = a.uns["phenocoder"]
    net = K.net_from_state(entry["config"], entry["state"], "cpu")
    x = apply_scale(a.obsm["patches"].reshape(a.n_obs, 3, side, side), a.uns["patches"]["lo"], a.uns["patches"]["hi"])
    val = np.zeros(a.n_obs, bool)
    val[np.asarray(hist["val_index"], int)] = True
    cond = np.ones((a.n_obs, 1), np.float32)
    rec = K.reconstruct(net, x[val], cond[val], "cpu")
    err_vae = float(((rec - x[val]) ** 2).reshape(val.sum(), -1).sum(1).mean())
    err_pca = K.pca_reconstruction_error(x[~val], x[val], k)
    area = a.obs["area"].to_numpy()
    small, large = area <= np.quantile(area, 1 / 3), area >= np.quantile(area, 2 / 3)
    keep = small | large
    acc = cross_val_score(LogisticRegression(max_iter=2000), a.obsm["pheno"][keep], large[keep], cv=5).mean()
    flat = x.reshape(a.n_obs, -1)
    from sklearn.decomposition import PCA

    pcs = PCA(k, random_state=0).fit(flat[~val]).transform(flat)
    acc_pca = cross_val_score(LogisticRegression(max_iter=2000), pcs[keep], large[keep], cv=5).mean()
    scores = {"heldout_mse_cvae": err_vae, "heldout_mse_pca": err_pca, "ratio": err_vae / err_pca,
              "small_vs_large_acc_cvae": acc, "small_vs_large_acc_pca": acc_pca, "train_cpu_s": cpu}
    print("  phenocoder: " + ", ".join(f"{a_}={b:.3f}" for a_, b in scores.items()))
    return scores


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--spacon-venv", default="/work/spaconvenv")
    p.add_argument("--n-spots", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--patch", type=int, default=24)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--pheno-epochs", type=int, default=60)
    p.add_argument("--beta", type=float, default=None, help="default: train_patch_cvae's")
    p.add_argument("--lr", type=float, default=None, help="default: train_patch_cvae's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["spacon", "phenocoder"], default=None)
    args = p.parse_args()
    results: list = []
    out = {}
    if args.only in (None, "spacon"):
        out["spacon"] = bench_spacon(args, results)
    if args.only in (None, "phenocoder"):
        out["phenocoder"] = bench_phenocoder(args, results)
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
