"""expkit.pl on real Visium data: geometry of spots over images, crops, colours, baseline images.

Baselines: tests/baseline_images/*.png; regenerate with EXPKIT_UPDATE_BASELINES=1 (then look at them).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402
from matplotlib.testing.compare import compare_images  # noqa: E402

from expkit.errors import KeyNotFoundError  # noqa: E402
from expkit.io.images import ImageStore  # noqa: E402
from expkit.pl import (category_colors, plot_embedding, plot_proportions, plot_qc, plot_spatial,  # noqa: E402
                       plot_spatial_grid, set_category_colors)
from test_images import visium_anndata  # noqa: E402

BASELINES = Path(__file__).parent / "baseline_images"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def v1(shared_data):
    return visium_anndata(shared_data / "visium_fixtures" / "scanpy_visium_1.0.0", "v1")


def _dlpfc(shared_data, sid):
    folder = shared_data / "dlpfc" / sid
    ad = visium_anndata(folder, sid)
    truth = pd.read_csv(folder / f"{sid}_truth.txt", sep="\t", header=None, names=["barcode", "layer"],
                        dtype=str).set_index("barcode")["layer"]
    ad.obs["layer"] = pd.Categorical(ad.obs["barcode"].map(truth))
    return ad


@pytest.fixture(scope="module")
def d73(shared_data):
    return _dlpfc(shared_data, "151673")


@pytest.fixture(scope="module")
def d74(shared_data):
    return _dlpfc(shared_data, "151674")


def check_image(fig, name: str, tmp_path: Path, tol: float = 6.0, dpi: int = 40):
    out = tmp_path / name
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    base = BASELINES / name
    if os.environ.get("EXPKIT_UPDATE_BASELINES"):
        BASELINES.mkdir(exist_ok=True)
        shutil.copy(out, base)
    assert base.exists(), f"missing baseline {base} (EXPKIT_UPDATE_BASELINES=1 to create)"
    err = compare_images(str(base), str(out), tol=tol)
    assert err is None, err


def _canvas(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3]


def _pixel_at(buf, ax, x, y) -> np.ndarray:
    dx, dy = ax.transData.transform((x, y))
    return buf[int(round(buf.shape[0] - dy - 0.5)), int(round(dx - 0.5))]


# ------------------------------------------------------------------------------------------
# geometry: a spot lands on the image pixel that covers it, at its true size
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", ["hires", "lowres", "store"])
def test_spot_lands_on_its_image_pixel(v1, image, tmp_path):
    """The fixture's hires image is all black; "store" puts random pixels (every neighbour differs)
    at the hires scale into an ImageStore, so a half-pixel shift would show."""
    ad = v1
    sf = ad.uns["spatial"]["v1"]["scalefactors"]
    store = None
    if image == "store":
        s = sf["tissue_hires_scalef"]
        img = np.random.default_rng(0).integers(0, 256, size=(2000, 2000, 3), dtype=np.uint8)
        store = ImageStore(tmp_path / "rand.h5")
        store.write("rand", img, transform=np.diag([s, s, 1.0]))
        image = "rand"
    else:
        s = sf[f"tissue_{image}_scalef"]
        img = ad.uns["spatial"]["v1"]["images"][image]
    k = 7
    x, y = ad.obsm["spatial"][k]
    i, j = int(round(y * s)), int(round(x * s))
    half = 12 / s  # a window of ~24 image pixels around the spot
    xr, yr = (x - half, x + half), (y - half, y + half)

    fig = plot_spatial(ad, channels=f"{image}/r,g,b", image_store=store, plot_embeddings={"visible": False}, xrange=xr,
                       yrange=yr, figsize=(4, 4), dpi=100, interpolation="nearest", legend=False)
    ax = fig.axes[0]
    assert ax.yaxis_inverted()
    buf = _canvas(fig)
    spot = ax.transData.transform((x, y))
    centre = ax.transData.transform((j / s, i / s))  # centre of image pixel (i, j) in full-res coords
    px = abs(ax.transData.transform((1 / s, 0))[0] - ax.transData.transform((0, 0))[0])
    assert px > 8  # one image pixel spans several display pixels
    assert np.all(np.abs(spot - centre) <= 0.5 * px + 1e-6)  # the spot centre is inside pixel (i, j)
    for ox in (-0.3, 0.0, 0.3):  # the rendered colour around the pixel centre is that pixel's colour
        for oy in (-0.3, 0.0, 0.3):
            np.testing.assert_array_equal(_pixel_at(buf, ax, (j + ox) / s, (i + oy) / s), img[i, j])

    # now with the spots: a circle of the true diameter, centred on the spot
    fig2 = plot_spatial(ad, channels=f"{image}/r,g,b", image_store=store, plot_embeddings={"color": None},
                        xrange=xr, yrange=yr,
                        figsize=(4, 4), dpi=100, interpolation="nearest", legend=False)
    ax2 = fig2.axes[0]
    coll = [c for c in ax2.collections if isinstance(c, EllipseCollection)][0]
    buf2 = _canvas(fig2)
    spot_rgb = (np.asarray(coll.get_facecolor()[0][:3]) * 255).round()
    d = sf["spot_diameter_fullres"]
    for dx, dy in ((0, 0), (0.4 * d, 0), (0, -0.4 * d), (-0.3 * d, 0.3 * d)):
        np.testing.assert_allclose(_pixel_at(buf2, ax2, x + dx, y + dy), spot_rgb, atol=2)
    # just outside the circle, the image shows again (a neighbour spot is >= 100 um = ~1.1 d away)
    u, v = x + 0.56 * d, y
    np.testing.assert_array_equal(_pixel_at(buf2, ax2, u, v), img[int(round(v * s)), int(round(u * s))])


def test_crop_reads_only_its_window(v1, tmp_path):
    class Spy(ImageStore):
        reads = []

        def read(self, channels, xrange=None, yrange=None, dpp=None):
            w = super().read(channels, xrange, yrange, dpp)
            Spy.reads.append(w)
            return w

    store = Spy(tmp_path / "v1.images.h5")
    store.fill_from_uns(v1)
    s = v1.uns["spatial"]["v1"]["scalefactors"]["tissue_hires_scalef"]
    xr, yr = (3000.0, 4000.0), (4000.0, 4600.0)
    fig = plot_spatial(v1, image_store=store, xrange=xr, yrange=yr, figsize=(4, 3), dpi=60,
                       plot_embeddings={"color": "in_tissue" if "in_tissue" in v1.obs else None})
    assert len(Spy.reads) == 1
    w = Spy.reads[0]
    assert w.image == "hires"  # the panel is fine enough to ask for the hires image
    h, wd = w.array.shape[:2]
    assert h <= (yr[1] - yr[0]) * s + 2 and wd <= (xr[1] - xr[0]) * s + 2
    assert w.xrange[0] <= xr[0] and w.xrange[1] >= xr[1]
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx(xr) and ax.get_ylim() == pytest.approx((yr[1], yr[0]))
    # a zoomed-out view of the same store uses the lowres image
    Spy.reads.clear()
    plot_spatial(v1, image_store=store, figsize=(2, 2), dpi=40)
    assert Spy.reads[0].image == "lowres"
    # the store named in uns (how the Experiment points a sample at its image file), no images in memory
    ad = v1.copy()
    ad.uns["spatial"]["v1"] = {"scalefactors": dict(ad.uns["spatial"]["v1"]["scalefactors"]),
                               "image_store": str(store.path)}
    fig = plot_spatial(ad, xrange=xr, yrange=yr, figsize=(4, 3), dpi=60, interpolation="nearest")
    ref = plot_spatial(v1, image_store=store, xrange=xr, yrange=yr, figsize=(4, 3), dpi=60, interpolation="nearest")
    np.testing.assert_array_equal(_canvas(fig), _canvas(ref))


def test_fluorescence_channels(tmp_path, v1):
    store = ImageStore(tmp_path / "if.h5")
    a = np.zeros((100, 100, 2), np.uint16)
    a[:50, :, 0] = 4000  # dapi: top half
    a[:, 50:, 1] = 9000  # cd31: right half
    store.write("if", a, channels=["dapi", "cd31"], transform=np.diag([0.02, 0.02, 1.0]))
    fig = plot_spatial(v1, image_store=store, channels="if/dapi,cd31",
                       channel_colors={"dapi": "blue", "if/cd31": "red"}, plot_embeddings=False,
                       xrange=(0, 5000), yrange=(0, 5000), figsize=(3, 3), dpi=60, interpolation="nearest")
    ax = fig.axes[0]
    buf = _canvas(fig)
    np.testing.assert_array_equal(_pixel_at(buf, ax, 1000, 1000), [0, 0, 255])  # dapi only
    np.testing.assert_array_equal(_pixel_at(buf, ax, 4000, 1000), [255, 0, 255])  # both
    np.testing.assert_array_equal(_pixel_at(buf, ax, 4000, 4000), [255, 0, 0])  # cd31 only
    np.testing.assert_array_equal(_pixel_at(buf, ax, 1000, 4000), [0, 0, 0])
    with pytest.raises(KeyNotFoundError, match="if/dapi"):
        plot_spatial(v1, image_store=store, channels="if/nope")


# ------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------
def test_colour_by_gene_symbol_var_name_and_layer(d73):
    ad = d73
    gid = ad.var_names[ad.var["gene"] == "MBP"][0]
    f1 = plot_spatial(ad, plot_embeddings={"color": "MBP"}, layer="counts", channels=False)
    f2 = plot_spatial(ad, plot_embeddings={"color": gid}, layer="counts", channels=False)
    c1 = [c for c in f1.axes[0].collections if isinstance(c, EllipseCollection)][0].get_facecolor()
    c2 = [c for c in f2.axes[0].collections if isinstance(c, EllipseCollection)][0].get_facecolor()
    np.testing.assert_array_equal(c1, c2)
    assert len(f1.axes) == 2  # panel + colorbar
    assert f1.axes[1].get_ylim()[1] == pytest.approx(ad[:, gid].layers["counts"].max())
    with pytest.raises(KeyNotFoundError, match="151673.*NOTAGENE"):
        plot_spatial(ad, plot_embeddings={"color": "NOTAGENE"})
    with pytest.raises(KeyNotFoundError, match="layer 'nope'"):
        plot_spatial(ad, plot_embeddings={"color": "MBP"}, layer="nope")


def _layer_colors(fig) -> dict:
    out = {}
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            for h, t in zip(leg.legend_handles, leg.get_texts()):
                out[t.get_text()] = matplotlib.colors.to_hex(h.get_markerfacecolor())
    for leg in fig.legends:
        for h, t in zip(leg.legend_handles, leg.get_texts()):
            out[t.get_text()] = matplotlib.colors.to_hex(h.get_markerfacecolor())
    return out


def test_palette_stable_across_samples_and_calls(d73, d74):
    a, b = d73.copy(), d74.copy()
    b.obs["layer"] = pd.Categorical(b.obs["layer"].astype(object).where(b.obs["layer"] != "L1"))  # b lacks L1
    # drawn together: one legend, the union of categories
    grid = plot_spatial_grid({"151673": a, "151674": b}, plot_embeddings={"color": "layer"}, dpi=30)
    union = _layer_colors(grid)
    assert sorted(union) == ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
    # every spot of either panel has its category's legend colour
    for ax, ad in zip(grid.axes, (a, b)):
        coll = [c for c in ax.collections if isinstance(c, EllipseCollection)][0]
        fc = [matplotlib.colors.to_hex(c) for c in coll.get_facecolor()]
        labels = ad.obs["layer"].astype(object).to_numpy()
        miss = pd.isna(labels)
        order = np.concatenate([np.flatnonzero(miss), np.flatnonzero(~miss)])
        for lab, col in zip(labels[order], fc):
            assert col == (union[lab] if isinstance(lab, str) else matplotlib.colors.to_hex("#d3d3d3"))
    # separate calls after storing the experiment-wide palette: identical colours
    mapping = set_category_colors([a, b], "layer")
    assert mapping == union
    assert a.uns["layer.colors"] == b.uns["layer.colors"] == mapping
    ca = _layer_colors(plot_spatial(a, plot_embeddings={"color": "layer"}, channels=False))
    cb = _layer_colors(plot_spatial(b, plot_embeddings={"color": "layer"}, channels=False))
    assert "L1" not in cb and all(cb[k] == ca[k] == mapping[k] for k in cb)
    # the default rule is deterministic: natural sort of the names
    cols = category_colors(["10", "2", "1"])
    assert list(cols) == ["1", "2", "10"] and cols == category_colors(["1", "10", "2"])
    # an explicit palette wins
    assert _layer_colors(plot_spatial(a, plot_embeddings={"color": "layer", "palette": {"WM": "black"}},
                                      channels=False))["WM"] == "#000000"


# ------------------------------------------------------------------------------------------
# baseline images (low dpi, small PNGs)
# ------------------------------------------------------------------------------------------
def test_image_spatial_categorical(d73, tmp_path):
    fig = plot_spatial(d73, plot_embeddings={"color": "layer"}, figsize=(4, 3.6))
    check_image(fig, "spatial_categorical.png", tmp_path)


def test_image_spatial_continuous(d73, tmp_path):
    fig = plot_spatial(d73, plot_embeddings={"color": "MBP", "cmap": "magma", "alpha": 0.9}, layer="counts",
                       figsize=(4, 3.6))
    check_image(fig, "spatial_continuous.png", tmp_path)


def test_image_spatial_grid(d73, d74, tmp_path):
    fig = plot_spatial({"151673": d73, "151674": d74}, plot_embeddings={"color": "layer", "alpha": 0.85})
    check_image(fig, "spatial_grid.png", tmp_path, dpi=30)


def _pca(ad, n=2):
    import scipy.sparse as sp

    X = ad.layers["counts"]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = np.log1p(X / X.sum(axis=1, keepdims=True).clip(1) * 1e4)
    top = np.argsort(-X.var(axis=0), kind="stable")[:300]
    X = X[:, top] - X[:, top].mean(axis=0)
    u, s, vt = np.linalg.svd(X, full_matrices=False)
    pcs = u[:, :n] * s[:n]
    signs = np.sign(vt[:n][np.arange(n), np.argmax(np.abs(vt[:n]), axis=1)])
    return pcs * signs


def test_image_embedding(d73, tmp_path):
    ad = d73.copy()
    ad.obsm["pca"] = _pca(ad)
    fig = plot_embedding(ad, basis="pca", color="layer", figsize=(4, 3.2))
    check_image(fig, "embedding_layer.png", tmp_path)
    fig = plot_embedding(ad, basis="pca", color="MBP", layer="counts", figsize=(4, 3.2))
    assert len(fig.axes) == 2  # colorbar
    with pytest.raises(KeyNotFoundError, match="umap"):
        plot_embedding(ad, basis="umap")


def test_image_proportions(d73, d74, tmp_path):
    obs = pd.concat([d73.obs, d74.obs])
    fig = plot_proportions(obs, groupby="layer", by="sample", figsize=(3.5, 3.2))
    check_image(fig, "proportions.png", tmp_path)
    ax = fig.axes[0]
    heights = {}
    for p in ax.patches:
        heights.setdefault(round(p.get_x() + p.get_width() / 2), []).append(p.get_height())
    for h in heights.values():
        assert sum(h) == pytest.approx(1.0)
    # counts, from a dict of AnnData
    fig = plot_proportions({"151673": d73, "151674": d74}, groupby="layer", normalize=False)
    total = sum(p.get_height() for p in fig.axes[0].patches)
    assert total == d73.obs["layer"].notna().sum() + d74.obs["layer"].notna().sum()


def test_plot_qc(d73):
    ad = d73.copy()
    X = ad.layers["counts"]
    ad.obs["qc.n_counts"] = np.asarray(X.sum(axis=1)).ravel()
    ad.obs["qc.n_genes"] = np.asarray((X > 0).sum(axis=1)).ravel()
    mito = ad.var["gene"].str.startswith("MT-").to_numpy()
    ad.obs["qc.pct_mito"] = 100 * np.asarray(X[:, mito].sum(axis=1)).ravel() / ad.obs["qc.n_counts"]
    fig = plot_qc(ad)
    assert [a.get_title() for a in fig.axes] == ["qc.n_counts", "qc.n_genes", "qc.pct_mito"]
    fig = plot_qc(ad, kind="hist", groupby="layer", keys=["qc.n_genes"])
    assert len(fig.axes) == 1
    with pytest.raises(KeyNotFoundError, match="qc.n_counts"):
        plot_qc(d73)


def test_ax_argument_and_returns_figure(d73):
    fig, axes = plt.subplots(1, 2)
    out = plot_spatial(d73, ax=axes[1], plot_embeddings={"color": "layer"})
    assert out is fig and axes[1].collections
    out = plot_proportions(d73.obs, groupby="layer", ax=axes[0])
    assert out is fig
