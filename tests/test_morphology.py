"""Phenocoder (expkit/kernels/phenocoder.py, expkit/spatial/morphology.py, expkit/spatial/_patches.py) on real
nuclei: squidpy's H&E crop of a mouse brain, nuclei from expkit's hematoxylin watershed (the table in
tests/data/embeddings/squidpy_nuclei.tsv, made by tests/data/embeddings/cases.py:nuclei_case)."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import expkit
from expkit.errors import InputError, KeyNotFoundError, ResourceError
from expkit.io.images import ImageStore
from expkit.kernels import phenocoder as K
from expkit.spatial.morphology import encode_patches, image_patches, train_patch_cvae

NUCLEI = Path(__file__).parent / "data" / "embeddings" / "squidpy_nuclei.tsv"
FAST = dict(epochs=15, seed=0)  # the defaults (latent 16, beta 1, augmentation, one cycle), fewer epochs
N_LATENT = 16
MARGIN = 0.97
SMALL = dict(n_latent_dim=4, n_dense_dim=16, filters=(8, 16, 16))
N_TRAIN = 1000


@pytest.fixture(scope="module")
def image(shared_data):
    import matplotlib.pyplot as plt

    path = shared_data / "visium_fixtures" / "squidpy_test_img.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return np.ascontiguousarray(plt.imread(path)[:, :, :3])


@pytest.fixture(scope="module")
def store(image, tmp_path_factory):
    s = ImageStore(tmp_path_factory.mktemp("pheno") / "img.h5")
    s.write("fullres", image, channels=["r", "g", "b"], overwrite=True)
    return s


def _nuclei(sample="mouse_brain"):
    obs = pd.read_csv(NUCLEI, sep="\t", index_col=0)
    obs["sample"] = sample
    a = ad.AnnData(obs=obs)
    a.obsm["spatial"] = obs[["x", "y"]].to_numpy(np.float64)
    return a


@pytest.fixture(scope="module")
def trained(store):
    expkit.settings.progress = False
    a = _nuclei()[:N_TRAIN].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    hist = train_patch_cvae(a, **FAST)
    encode_patches(a)
    return a, hist


def test_patches_are_the_image_around_each_object(store, image):
    a = _nuclei()[:300].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 24), tile=128, image_store=store)
    p = a.obsm["patches"].reshape(a.n_obs, 3, 16, 24)
    pad = np.pad(image, ((40, 40), (40, 40), (0, 0)))
    xy = a.obsm["spatial"]
    r0 = np.rint(xy[:, 1]).astype(int) - 8 + 40
    c0 = np.rint(xy[:, 0]).astype(int) - 12 + 40
    for i in (0, 17, 123, 299):
        np.testing.assert_array_equal(p[i], np.moveaxis(pad[r0[i]:r0[i] + 16, c0[i]:c0[i] + 24], -1, 0))
    one_tile = a.copy()
    image_patches(one_tile, channels="fullres/r,g,b", patch_size=(16, 24), tile=4096, image_store=store)
    np.testing.assert_array_equal(one_tile.obsm["patches"], a.obsm["patches"])
    lo, hi = a.uns["patches"]["lo"], a.uns["patches"]["hi"]
    flat = np.moveaxis(p, 1, 0).reshape(3, -1).astype(float)
    np.testing.assert_allclose(lo, np.percentile(flat, 1, axis=1))
    np.testing.assert_allclose(hi, np.percentile(flat, 99, axis=1))


def test_per_z_slices_read_their_own_image(store, image, tmp_path):
    s = ImageStore(tmp_path / "stack.h5")
    s.write("stack_z0", image, channels=["r", "g", "b"])
    s.write("stack_z1", np.ascontiguousarray(255 - image), channels=["r", "g", "b"])
    a = _nuclei()[:200].copy()
    a.obs["z"] = np.arange(a.n_obs) % 2
    image_patches(a, channels="stack_z{z}/r,g,b", z_key="z", image_store=s)
    flat = _nuclei()[:200].copy()
    image_patches(flat, channels="fullres/r,g,b", image_store=store)
    z1 = a.obs["z"].to_numpy() == 1
    np.testing.assert_array_equal(a.obsm["patches"][~z1], flat.obsm["patches"][~z1])
    inside = flat.obsm["patches"][z1] > 0  # zero padding beyond the image stays 0 in both slices
    np.testing.assert_array_equal(a.obsm["patches"][z1][inside], 255 - flat.obsm["patches"][z1][inside])
    with pytest.raises(InputError, match="z_key"):
        image_patches(a, channels="stack_z{z}/r,g,b", image_store=s, key_added="bad")
    with pytest.raises(KeyNotFoundError):
        image_patches(a, channels="nope/r,g,b", image_store=store, key_added="bad")
    assert "bad" not in a.obsm


def _error(net, x, cond):
    rec = K.reconstruct(net, x, cond, "cpu")
    return float(((rec - x) ** 2).reshape(len(x), -1).sum(1).mean())


def test_cvae_reconstructs_held_out_patches_better_than_pca(trained, store):
    a, hist = trained
    entry = a.uns["phenocoder"]
    net = K.net_from_state(entry["config"], entry["state"], "cpu")
    from expkit.spatial._patches import apply_scale

    x = apply_scale(a.obsm["patches"].reshape(a.n_obs, 3, 16, 16), a.uns["patches"]["lo"], a.uns["patches"]["hi"])
    val = np.zeros(a.n_obs, bool)
    val[np.asarray(hist["val_index"], dtype=int)] = True  # the patches held out of training
    assert 0.05 < val.mean() < 0.15
    cond = np.ones((a.n_obs, 1), np.float32)
    err_vae = _error(net, x[val], cond[val])
    err_pca = K.pca_reconstruction_error(x[~val], x[val], N_LATENT)
    # nuclei the model never saw (neither training nor early stopping): the rest of the image's nuclei
    b = _nuclei()[N_TRAIN:].copy()
    image_patches(b, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    y = apply_scale(b.obsm["patches"].reshape(b.n_obs, 3, 16, 16), a.uns["patches"]["lo"], a.uns["patches"]["hi"])
    err_vae_new = _error(net, y, np.ones((b.n_obs, 1), np.float32))
    err_pca_new = K.pca_reconstruction_error(x, y, N_LATENT)
    print(f"held-out reconstruction error: CVAE {err_vae:.3f}, PCA({N_LATENT}) {err_pca:.3f}; unseen nuclei: "
          f"CVAE {err_vae_new:.3f}, PCA {err_pca_new:.3f}")
    # seeds 0, 1, 2 at these settings: 0.953, 0.950, 0.916 of PCA's error on the validation split, 0.961,
    # 0.958, 0.960 on the unseen nuclei (benchmarks/results/embeddings.md: 0.909 at 24 x 24 px, 60 epochs)
    assert err_vae < MARGIN * err_pca and err_vae_new < MARGIN * err_pca_new
    untrained = K.build(tuple(entry["config"]["shape"]), 1, N_LATENT, entry["config"]["n_dense"], 0)
    assert _error(untrained.eval(), x[val], cond[val]) > 2 * err_pca  # without the PCA initialisation


def test_latents_separate_object_classes(trained):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    a, _ = trained
    area = a.obs["area"].to_numpy()
    small, large = area <= np.quantile(area, 1 / 3), area >= np.quantile(area, 2 / 3)
    keep = small | large
    z = a.obsm["pheno"][keep]
    acc = cross_val_score(LogisticRegression(max_iter=2000), z, large[keep], cv=5).mean()
    shuffled = cross_val_score(LogisticRegression(max_iter=2000), z, np.random.default_rng(0).permutation(
        large[keep]), cv=5).mean()
    print(f"small vs large nuclei from the latents: accuracy {acc:.3f} (shuffled labels {shuffled:.3f})")
    assert acc > 0.75 and shuffled < 0.65


def test_training_history_early_stopping_and_lr_schedule(store):
    a = _nuclei()[:400].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    kw = dict(SMALL, epochs=40, batch_size=64, lr=0.02, patience=2, lr_patience=1, schedule="plateau", seed=0)
    h = train_patch_cvae(a, **kw)
    assert h["stopped_early"] and len(h["train"]) < 40
    assert h["best_epoch"] == int(np.argmin(h["val"]))
    assert min(h["lr"]) < 0.02 and h["lr"][0] == 0.02  # halved on a plateau
    again = a.copy()
    h2 = train_patch_cvae(again, **kw)
    assert h2["val"] == h["val"]
    encode_patches(a)
    encode_patches(again)
    np.testing.assert_array_equal(a.obsm["pheno"], again.obsm["pheno"])
    cyc = train_patch_cvae(a, **SMALL, epochs=6, lr=0.01, patience=10, seed=0)["lr"]  # one cycle
    assert len(cyc) == 6 and max(cyc) <= 0.01 and cyc[-1] < 1e-4 and np.all(np.diff(cyc) < 0)  # annealed
    with pytest.raises(InputError, match="schedule"):
        train_patch_cvae(a, schedule="cosine")


def test_symmetries_and_the_pca_start(store):
    import torch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    out = K.dihedral(x, torch.arange(16) // 2).numpy()
    flips = [x[:2].numpy(), x[:2].numpy()[..., ::-1], x[:2].numpy()[..., ::-1, :], x[:2].numpy()[..., ::-1, ::-1]]
    for k in range(8):
        want = flips[k & 3] if k < 4 else np.swapaxes(flips[k & 3], 2, 3)
        np.testing.assert_array_equal(out[2 * k:2 * k + 2], want)
    assert len({out[2 * k].tobytes() for k in range(8)}) == 8
    rect = torch.arange(8 * 16, dtype=torch.float32).reshape(1, 1, 8, 16).repeat(2, 1, 1, 1)
    np.testing.assert_array_equal(K.dihedral(rect, torch.tensor([3, 7]))[1].numpy(), rect[0].flip(1, 2).numpy())
    # the untrained network is exactly the PCA of its latent size (standardisation, linear shortcuts)
    a = _nuclei()[:300].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    from expkit.spatial._patches import apply_scale

    p = apply_scale(a.obsm["patches"].reshape(-1, 3, 16, 16), a.uns["patches"]["lo"], a.uns["patches"]["hi"])
    net = K.build((3, 16, 16), 1, 6, 16, 0, filters=(8, 16, 16))
    net.init_linear(torch.as_tensor(p[:200]))
    np.testing.assert_allclose(net.mean.numpy(), p[:200].mean((0, 2, 3)), rtol=1e-5)
    cond = np.ones((300, 1), np.float32)
    assert abs(_error(net, p[200:], cond[200:]) - K.pca_reconstruction_error(p[:200], p[200:], 6)) < 1e-3
    z = K.encode(net, p[:200], cond[:200], "cpu")
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0, rtol=1e-3)  # unit-variance scores, as the prior


def test_scaling_is_the_same_at_train_and_encode_time(store):
    a = _nuclei()[:200].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    train_patch_cvae(a, **SMALL, epochs=1, seed=0)
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), scale_per_sample=False, image_store=store)
    with pytest.raises(InputError, match="same at train and encode"):
        encode_patches(a)
    b = _nuclei("other")[200:400].copy()
    image_patches(b, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    with pytest.raises(InputError, match="same scaling"):
        train_patch_cvae({"mouse_brain": a, "other": b}, n_latent_dim=4, epochs=1)
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), scale_per_sample=False, image_store=store)
    image_patches(b, channels="fullres/r,g,b", patch_size=(16, 16), scale_per_sample=False, image_store=store)
    train_patch_cvae({"mouse_brain": a, "other": b}, **SMALL, epochs=1, seed=0)
    lim = a.uns["phenocoder"]["scaling"]["limits"]["global"]
    both = np.concatenate([a.obsm["patches"], b.obsm["patches"]]).reshape(-1, 3, 16, 16)
    np.testing.assert_allclose(lim[0], np.percentile(np.moveaxis(both, 1, 0).reshape(3, -1), 1, axis=1))
    encode_patches(b)
    assert b.obsm["pheno"].shape == (200, 4)


def test_message_passing_is_the_mean_within_the_radius(trained):
    a = trained[0].copy()
    encode_patches(a, key_added="own")
    out = encode_patches(a, message_passing_radius=50, key_added="mp")
    xy = a.obsm["spatial"]
    for i in (0, 500, 999):
        near = np.nonzero(((xy - xy[i]) ** 2).sum(1) <= 50 ** 2)[0]
        np.testing.assert_allclose(a.obsm["mp"][i], a.obsm["own"][near].mean(0), rtol=1e-5, atol=1e-6)
    assert out["mean_neighbours"] > 1


def test_memory_and_missing_inputs_are_refused(store):
    a = _nuclei()[:100].copy()
    with pytest.raises(ResourceError):
        image_patches(a, channels="fullres/r,g,b", image_store=store, max_memory=1000)
    with pytest.raises(KeyNotFoundError, match="image_patches first"):
        train_patch_cvae(a)
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    with pytest.raises(ResourceError):
        train_patch_cvae(a, max_memory=1000)
    with pytest.raises(KeyNotFoundError, match="train_patch_cvae"):
        encode_patches(a)
    with pytest.raises(InputError, match="multiples of 8"):
        image_patches(a, channels="fullres/r,g,b", patch_size=(10, 16), image_store=store)


@pytest.mark.gpu
def test_cpu_and_cuda_agree(store):
    a = _nuclei()[:300].copy()
    image_patches(a, channels="fullres/r,g,b", patch_size=(16, 16), image_store=store)
    train_patch_cvae(a, **SMALL, epochs=2, seed=0)
    encode_patches(a)
    cpu = a.obsm["pheno"].copy()
    train_patch_cvae(a, **SMALL, epochs=2, seed=0, use_gpu=True)
    encode_patches(a, use_gpu=True)
    np.testing.assert_allclose(a.obsm["pheno"], cpu, rtol=1e-3, atol=1e-3)
