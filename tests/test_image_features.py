"""Per-spot image features (expkit.spatial.image_features, expkit.kernels.image_features) on the real
DLPFC 151673 lowres H&E and the scanpy Visium fixture (hires + lowres), against numpy references computed
spot by spot."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expkit.errors import InputError, KeyNotFoundError
from expkit.io import read_visium
from expkit.kernels import image_features as K
from expkit.spatial.image_features import image_features

LEVELS = 8
QS = (0.1, 0.5, 0.9)
ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    return read_visium(shared_data / "dlpfc" / "151673", sample="151673")


@pytest.fixture(scope="module")
def fixture_hires(shared_data):
    return read_visium(shared_data / "visium_fixtures" / "scanpy_visium_1.0.0", sample="v1")


# ------------------------------------------------------------------------------------------------
# the references, one spot at a time
# ------------------------------------------------------------------------------------------------
def ref_crop(img, x, y, scalef, side, pad=False):
    """The crop of a spot at full-resolution (x, y): pixel k is centred at image coordinate k."""
    col, row = x * scalef, y * scalef
    r0 = int(np.floor(row - (side - 1) / 2 + 0.5))
    c0 = int(np.floor(col - (side - 1) / 2 + 0.5))
    if pad:
        big = np.pad(img, ((side, side), (side, side), (0, 0)), mode="reflect")
        return big[r0 + side:r0 + 2 * side, c0 + side:c0 + 2 * side]
    assert r0 >= 0 and c0 >= 0 and r0 + side <= img.shape[0] and c0 + side <= img.shape[1]
    return img[r0:r0 + side, c0:c0 + side]


def ref_summary(crop):
    out = []
    for c in range(crop.shape[2]):
        v = crop[:, :, c].astype(np.float64).ravel()
        out += [v.mean(), v.std()] + [np.quantile(v, q) for q in QS]
    return np.array(out)


def ref_hist(crop, bins=10, vrange=(0, 255)):
    out = []
    for c in range(crop.shape[2]):
        v = crop[:, :, c].ravel()
        out += list(np.histogram(v, bins=bins, range=vrange)[0] / v.size)
    return np.array(out)


def ref_grey_levels(crop, levels=LEVELS):
    r, g, b = (crop[:, :, c].astype(np.int64) for c in range(3))
    y = 299 * r + 587 * g + 114 * b
    return np.minimum(levels - 1, y * levels // (1000 * 255))


def ref_glcm(q, levels, dr, dc):
    """Pairs (r, c) -> (r + dr, c + dc) inside the crop, counted both ways."""
    s = q.shape[0]
    r, c = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    keep = (r + dr >= 0) & (r + dr < s) & (c + dc >= 0) & (c + dc < s)
    first, second = q[r[keep], c[keep]], q[r[keep] + dr, c[keep] + dc]
    g = np.zeros((levels, levels))
    np.add.at(g, (first, second), 1)
    np.add.at(g, (second, first), 1)
    return g / g.sum()


def ref_props(p):
    i, j = np.indices(p.shape)
    mi, mj = (p * i).sum(), (p * j).sum()
    si, sj = np.sqrt((p * (i - mi) ** 2).sum()), np.sqrt((p * (j - mj) ** 2).sum())
    corr = 1.0 if (si < 1e-15 or sj < 1e-15) else (p * (i - mi) * (j - mj)).sum() / (si * sj)
    return np.array([(p * (i - j) ** 2).sum(), (p * np.abs(i - j)).sum(), (p / (1 + (i - j) ** 2)).sum(),
                     corr, (p ** 2).sum()])


def ref_texture(crop, levels=LEVELS, distances=(1, 2)):
    q = ref_grey_levels(crop, levels)
    per_d = []
    for d in distances:
        props = [ref_props(ref_glcm(q, levels, int(round(math.sin(a) * d)), int(round(math.cos(a) * d))))
                 for a in ANGLES]
        per_d.append(np.mean(props, axis=0))
    return np.array(per_d).T.ravel()  # props major, distances minor


def _spots(adata, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(adata.n_obs, n, replace=False))


def _block(adata, key, prefix_pattern):
    cols = adata.uns[key]["columns"]
    idx = [k for k, c in enumerate(cols) if prefix_pattern(c)]
    return adata.obsm[key][:, idx]


# ------------------------------------------------------------------------------------------------
# (a) each family against the references
# ------------------------------------------------------------------------------------------------
CASES = {  # (AnnData, image, crop diameter in full-resolution px: None = the Visium spot)
    "dlpfc-spot": ("dlpfc", "lowres", None),  # crops of 4 and 9 px
    "dlpfc-wide": ("dlpfc", "lowres", 300.0),  # 14 and 27 px (an even side)
    "fixture-lowres": ("fixture", "lowres", 250.0),  # the scanpy fixture's real lowres image
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_families_match_numpy_reference(case, dlpfc, fixture_hires):
    which, image, diameter = CASES[case]
    adata = (dlpfc if which == "dlpfc" else fixture_hires).copy()
    sample = next(iter(adata.uns["spatial"]))
    entry = adata.uns["spatial"][sample]
    img, scalef = entry["images"][image], entry["scalefactors"][f"tissue_{image}_scalef"]
    diam = diameter or entry["scalefactors"]["spot_diameter_fullres"]
    res = image_features(adata, channels=f"{image}/r,g,b", spot_scale=(1.0, 2.0), diameter=diameter)
    cols = adata.uns["img.features"]["columns"]
    assert res["n_features"] == len(cols) == 2 * (3 * 5 + 3 * 10 + 5 * 2)
    assert cols[0] == f"s1:{image}/r.mean" and f"s2:{image}/b.hist9" in cols
    assert f"s2:{image}.glcm.correlation.d2" in cols and f"s1:{image}/g.q50" in cols
    assert adata.obsm["img.features"].dtype == np.float32
    for tag, s in (("s1:", 1.0), ("s2:", 2.0)):
        side = max(3, int(np.floor(diam * s * scalef + 0.5)))
        assert side in adata.uns["img.features"]["params"]["crop_side"]
        summ = _block(adata, "img.features", lambda c: c.startswith(tag) and ".glcm." not in c and ".hist" not in c)
        hist = _block(adata, "img.features", lambda c: c.startswith(tag) and ".hist" in c)
        tex = _block(adata, "img.features", lambda c: c.startswith(tag) and ".glcm." in c)
        for i in _spots(adata):
            crop = ref_crop(img, *adata.obsm["spatial"][i], scalef, side)
            np.testing.assert_allclose(summ[i], ref_summary(crop), rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(hist[i], ref_hist(crop), atol=1e-6)
            np.testing.assert_allclose(tex[i], ref_texture(crop), rtol=1e-5, atol=1e-6)


def test_blank_image_constant_crop_convention(fixture_hires):
    """The fixture's hires image is all zeros: std 0, all pixels in bin 0, GLCM correlation 1, ASM 1."""
    adata = fixture_hires.copy()
    image_features(adata, channels="hires/r,g,b")
    x = pd.DataFrame(adata.obsm["img.features"], columns=adata.uns["img.features"]["columns"])
    assert (x["hires/r.std"] == 0).all() and (x["hires/g.hist0"] == 1).all() and (x["hires/b.hist9"] == 0).all()
    for d in (1, 2):
        assert (x[f"hires.glcm.correlation.d{d}"] == 1).all() and (x[f"hires.glcm.asm.d{d}"] == 1).all()
        assert (x[f"hires.glcm.contrast.d{d}"] == 0).all() and (x[f"hires.glcm.homogeneity.d{d}"] == 1).all()
    assert adata.uns["img.features"]["params"]["crop_side"] == [13]  # 89.4 full-res px x 0.15


def test_tiles_give_the_same_features(dlpfc, monkeypatch):
    """Windows read per tile of spots (forced small here) give the features of one whole-image read."""
    F = importlib.import_module("expkit.spatial.image_features")  # the module (expkit.spatial exports the function)

    one, tiled = dlpfc.copy(), dlpfc.copy()
    image_features(one, spot_scale=(1, 3))
    monkeypatch.setattr(F, "TILE", 40)
    calls = []
    real = F._tile_features
    monkeypatch.setattr(F, "_tile_features", lambda win, *a: calls.append(win.array.shape) or real(win, *a))
    image_features(tiled, spot_scale=(1, 3))
    assert len(calls) > 20 and max(max(c[:2]) for c in calls) < 100
    np.testing.assert_array_equal(one.obsm["img.features"], tiled.obsm["img.features"])


def test_texture_matches_scikit_image(dlpfc):
    skf = pytest.importorskip("skimage.feature")
    adata = dlpfc.copy()
    img = adata.uns["spatial"]["151673"]["images"]["lowres"]
    scalef = adata.uns["spatial"]["151673"]["scalefactors"]["tissue_lowres_scalef"]
    image_features(adata, features="texture", diameter=300.0)
    side = adata.uns["img.features"]["params"]["crop_side"][0]
    props = ("contrast", "dissimilarity", "homogeneity", "correlation", "ASM")
    for i in _spots(adata):
        q = ref_grey_levels(ref_crop(img, *adata.obsm["spatial"][i], scalef, side)).astype(np.uint8)
        p = skf.graycomatrix(q, distances=[1, 2], angles=list(ANGLES), levels=LEVELS, symmetric=True, normed=True)
        want = np.array([skf.graycoprops(p, name).mean(axis=1) for name in props]).ravel()
        np.testing.assert_allclose(adata.obsm["img.features"][i], want, rtol=1e-5, atol=1e-6)


def test_float_and_uint16_images(dlpfc):
    """Kernel on the real image as uint16 (x 257) and float: ranges 0..65535 and data min..max."""
    img = dlpfc.uns["spatial"]["151673"]["images"]["lowres"]
    centres = dlpfc.obsm["spatial"][:200] * dlpfc.uns["spatial"]["151673"]["scalefactors"]["tissue_lowres_scalef"]
    x8, names, out8 = K.crop_features(img, centres, 5)
    x16, names16, out16 = K.crop_features(img.astype(np.uint16) * 257, centres, 5)
    assert names == names16 and np.array_equal(out8, out16)
    n_sum = 15
    np.testing.assert_allclose(x16[:, :n_sum], 257.0 * x8[:, :n_sum], rtol=1e-6)
    np.testing.assert_array_equal(x16[:, n_sum:], x8[:, n_sum:])  # same bins, same grey levels
    fimg = img.astype(np.float64) / 255.0
    xf, _, _ = K.crop_features(fimg, centres, 5, features="histogram", bins=7)
    lo, hi = fimg.reshape(-1, 3).min(0), fimg.reshape(-1, 3).max(0)
    for i in (0, 50, 199):
        crop = ref_crop(fimg, *dlpfc.obsm["spatial"][i], 0.045004502, 5)
        want = np.concatenate([np.histogram(crop[:, :, c], bins=7, range=(lo[c], hi[c]))[0] / 25 for c in range(3)])
        np.testing.assert_allclose(xf[i], want, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# (b) crops cut by the image border
# ------------------------------------------------------------------------------------------------
def test_outside_flag_and_reflection(dlpfc, caplog):
    adata = dlpfc[:20].copy()
    img = adata.uns["spatial"]["151673"]["images"]["lowres"]
    scalef = adata.uns["spatial"]["151673"]["scalefactors"]["tissue_lowres_scalef"]
    xy = adata.obsm["spatial"].copy()
    xy[0] = (3.0 / scalef, xy[0, 1])  # 3 px from the left edge: a 9 px crop is cut
    xy[1] = ((img.shape[1] - 2) / scalef, (img.shape[0] - 1) / scalef)  # bottom-right corner
    adata.obsm["spatial"] = xy
    with caplog.at_level("WARNING", logger="expkit"):
        res = image_features(adata, features=("summary", "histogram"), diameter=200.0)
    outside = adata.obs["img.features.outside"].to_numpy()
    assert outside.dtype == bool and outside[:2].all() and not outside[2:].any()
    assert res["n_outside"] == adata.uns["img.features"]["n_outside"] == 2
    assert adata.uns["img.features"]["params"]["padding"] == "reflect"
    assert any("2 of 20" in r.getMessage() for r in caplog.records)
    side = adata.uns["img.features"]["params"]["crop_side"][0]
    for i in (0, 1):
        crop = ref_crop(img, *xy[i], scalef, side, pad=True)
        want = np.concatenate([ref_summary(crop), ref_hist(crop)])
        np.testing.assert_allclose(adata.obsm["img.features"][i], want, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (c) biology: white matter is paler in green (eosin-rich myelin) than layers 1-3
# ------------------------------------------------------------------------------------------------
def test_white_matter_differs_in_colour(dlpfc, shared_data):
    adata = dlpfc.copy()
    truth = pd.read_csv(shared_data / "dlpfc" / "151673" / "151673_truth.txt", sep="\t", header=None,
                        index_col=0).iloc[:, 0]
    layer = truth.reindex(adata.obs["barcode"].astype(str).to_numpy()).to_numpy()
    image_features(adata, features="summary")
    g = adata.obsm["img.features"][:, adata.uns["img.features"]["columns"].index("lowres/g.mean")]
    wm, upper = g[layer == "WM"], g[np.isin(layer, ["L1", "L2", "L3"])]
    assert len(wm) > 400 and len(upper) > 1000
    cohen_d = (upper.mean() - wm.mean()) / np.sqrt((upper.var() + wm.var()) / 2)
    auc = (wm[:, None] < upper[None, :]).mean()  # P(a WM spot is darker in green than an L1-L3 spot)
    assert cohen_d > 2.0, cohen_d  # measured 2.8 (green mean 90 vs 116)
    assert auc > 0.9, auc  # measured 0.97


# ------------------------------------------------------------------------------------------------
# (d) errors, nothing written
# ------------------------------------------------------------------------------------------------
def _untouched(adata):
    return "img.features" not in adata.obsm and "img.features" not in adata.uns \
        and "img.features.outside" not in adata.obs


def test_errors_name_what_exists(dlpfc):
    adata = dlpfc[:50].copy()
    with pytest.raises(KeyNotFoundError) as exc:
        image_features(adata, channels="lowres/x")
    assert "151673" in str(exc.value) and "lowres/r" in str(exc.value)
    with pytest.raises(KeyNotFoundError) as exc:
        image_features(adata, channels="hires/r,g,b")
    assert "151673" in str(exc.value) and "lowres/g" in str(exc.value)
    with pytest.raises(InputError) as exc:
        image_features(adata, features=("summary", "sift"))
    assert "sift" in str(exc.value) and "histogram" in str(exc.value) and "texture" in str(exc.value)
    no_xy = adata.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyNotFoundError, match=r"obsm\['spatial'\]"):
        image_features(no_xy)
    no_sf = adata.copy()
    no_sf.uns["spatial"]["151673"]["scalefactors"] = {"tissue_lowres_scalef": 0.045004502}
    with pytest.raises(InputError, match="diameter="):
        image_features(no_sf)
    for a in (adata, no_xy, no_sf):
        assert _untouched(a)
    res = image_features(no_sf, diameter=100.0, features="summary", spot_scale=1.0)
    assert res["n_features"] == 15 and adata.uns is not no_sf.uns
    assert all(v is not None for v in no_sf.uns["img.features"]["params"].values())


# ------------------------------------------------------------------------------------------------
# (e) reproducible on the CPU, (f) CPU == CUDA
# ------------------------------------------------------------------------------------------------
def test_cpu_runs_identical(dlpfc):
    a, b = dlpfc.copy(), dlpfc.copy()
    image_features(a, spot_scale=(1, 3), diameter=200.0)
    image_features(b, spot_scale=(1, 3), diameter=200.0)
    assert np.array_equal(a.obsm["img.features"], b.obsm["img.features"])
    assert np.isfinite(a.obsm["img.features"]).all()


def test_scale_reads_coarser(dlpfc):
    half, full = dlpfc.copy(), dlpfc.copy()
    image_features(half, scale=0.5, features="summary", diameter=300.0)
    image_features(full, features="summary", diameter=300.0)
    assert half.uns["img.features"]["params"]["crop_side"] == [7]  # 300 x 0.045 / 2
    assert full.uns["img.features"]["params"]["crop_side"] == [14]
    corr = np.corrcoef(half.obsm["img.features"][:, 0], full.obsm["img.features"][:, 0])[0, 1]
    assert corr > 0.95, corr  # the same tissue seen at half the resolution


@pytest.mark.gpu
def test_cpu_and_cuda_agree(dlpfc):
    a, b = dlpfc.copy(), dlpfc.copy()
    image_features(a, spot_scale=(1, 2), use_gpu=False)
    image_features(b, spot_scale=(1, 2), use_gpu=True)
    np.testing.assert_allclose(a.obsm["img.features"], b.obsm["img.features"], rtol=1e-5, atol=1e-5)
    assert np.array_equal(a.obs["img.features.outside"], b.obs["img.features.outside"])


def test_image_store_reads_alike(dlpfc, tmp_path):
    """Reading through an on-disk ImageStore (as an Experiment does) gives the in-memory features; its
    errors still name the sample and the stored channels."""
    from expkit.io.images import ImageStore

    store = ImageStore(tmp_path / "151673.images.h5")
    store.fill_from_uns(dlpfc, "151673")
    mem, disk = dlpfc[:300].copy(), dlpfc[:300].copy()
    image_features(mem, spot_scale=(1, 2))
    image_features(disk, spot_scale=(1, 2), image_store=store)
    np.testing.assert_array_equal(mem.obsm["img.features"], disk.obsm["img.features"])
    assert disk.uns["img.features"]["params"]["image_store"] == str(store.path)
    with pytest.raises(KeyNotFoundError) as exc:
        image_features(disk, channels="lowres/x", image_store=store, key_added="other")
    assert "151673" in str(exc.value) and "lowres/b" in str(exc.value) and "other" not in disk.obsm


# ------------------------------------------------------------------------------------------------
# (g) flavor="squidpy" against squidpy 1.8's calculate_image_features (tests/data/squidpy_img_ref/, made by
#     tests/reference/make_squidpy_image_features.py in a side venv)
# ------------------------------------------------------------------------------------------------
SQ_REF = Path(__file__).parent / "data" / "squidpy_img_ref"


def _sq_script():
    spec = importlib.util.spec_from_file_location("make_sq_img", Path(__file__).parent / "reference" /
                                                  "make_squidpy_image_features.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sq_ref(name):
    return pd.read_csv(SQ_REF / f"{name}.tsv.gz", sep="\t", comment="#", index_col=0)


@pytest.fixture(scope="module")
def sq_cases(shared_data, tmp_path_factory):
    """(AnnData, ImageStore or None, channels, spot names aligned to the reference rows) per case."""
    import anndata as ad
    from PIL import Image

    from expkit.io.images import ImageStore

    ref = _sq_script()
    tmp = tmp_path_factory.mktemp("sqimg")
    fx = ad.read_h5ad(shared_data / "visium_fixtures" / "squidpy_test_data.h5ad")
    lib = next(iter(fx.uns["spatial"]))
    fx.uns["spatial"][lib]["images"] = {}
    img = np.asarray(Image.open(shared_data / "visium_fixtures" / "squidpy_test_img.jpg"))
    store = ImageStore(tmp / "fixture.images.h5")
    store.write("full", img)
    store.write("segmentation", ref.dark_labels(img), channels=["label"])
    vis = read_visium(shared_data / "visium_fixtures" / "scanpy_visium_1.0.0", sample="v1")
    vis.obs_names = vis.obs["barcode"].astype(str).to_numpy()
    dg = shared_data / "giotto" / "Visium_mouse_brain_DG"
    dg_img = np.asarray(Image.open(dg / "images" / "deg_image.png"))[..., :3]
    locs = np.loadtxt(dg / "visium_DG_locs.txt")
    (x0, y0), (x1, y1) = locs.min(0), locs.max(0)
    scale = np.sqrt(dg_img.shape[1] / (x1 - x0) * dg_img.shape[0] / (y1 - y0))
    sf = json.loads((dg / "scalefactors_json.json").read_text())
    g = ad.AnnData(np.zeros((len(locs), 1), dtype=np.float32))
    g.obs_names = [f"dg{i}" for i in range(len(locs))]
    g.obsm["spatial"] = ref.giotto_pixels(locs, dg_img.shape[:2])
    g.uns["spatial"] = {"dg": {"images": {}, "scalefactors": {"spot_diameter_fullres":
                                                               sf["spot_diameter_fullres"] * scale}}}
    gstore = ImageStore(tmp / "dg.images.h5")
    gstore.write("dg", dg_img)
    return {"fixture": (fx, store, "full/r,g,b"), "visium": (vis, None, "lowres/r,g,b"),
            "giotto": (g, gstore, "dg/r,g,b")}


FAMILY_TOL = {  # family -> (rtol, atol) against squidpy's float64 values
    "summary": (1e-12, 1e-9), "histogram": (0, 0), "texture": (1e-6, 1e-12), "segmentation": (1e-12, 1e-9)}


@pytest.mark.parametrize("name", ["fixture_s1", "fixture_s2", "fixture_s1_circle", "visium_s1", "visium_s2",
                                  "giotto_s1", "giotto_s2"])
def test_squidpy_flavor_matches_squidpy(name, sq_cases):
    case, tag = name.split("_", 1)
    adata, store, chans = sq_cases[case]
    want = _sq_ref(name)
    a = adata[want.index.astype(str)].copy()
    feats = ("summary", "histogram", "texture") + (("segmentation",) if case == "fixture" else ())
    image_features(a, channels=chans, features=feats, spot_scale=float(tag[1]), flavor="squidpy",
                   mask_circle=tag.endswith("circle"), image_store=store, key_added="sq")
    got = pd.DataFrame(a.obsm["sq"], index=a.obs_names, columns=a.uns["sq"]["columns"])
    assert a.obsm["sq"].dtype == np.float64 and list(got.columns) == list(want.columns)
    for fam, (rtol, atol) in FAMILY_TOL.items():
        cols = [c for c in want.columns if c.startswith(fam)]
        assert cols or fam == "segmentation"
        np.testing.assert_allclose(got[cols].to_numpy(), want[cols].to_numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"{name}: {fam}")
    params = a.uns["sq"]["params"]
    assert params["flavor"] == "squidpy" and params["padding"] == "zero"
    assert all(v is not None for v in params.values())


def test_squidpy_flavor_geometry_and_padding(sq_cases):
    """Radius round(d // 2 x spot_scale), centre int(x * scale), zeros beyond the image (flagged)."""
    adata, store, chans = sq_cases["fixture"]
    a = adata[:3].copy()
    a.obsm["spatial"] = np.array([[0.0, 0.0], [949.0, 1716.0], [400.7, 300.2]])
    image_features(a, channels=chans, features="summary", flavor="squidpy", image_store=store, key_added="g")
    assert a.uns["g"]["params"]["radius"] == [44] and a.uns["g"]["params"]["crop_side"] == [89]
    assert a.obs["g.outside"].tolist() == [True, True, False]
    x = pd.DataFrame(a.obsm["g"], columns=a.uns["g"]["columns"])
    img = store.read("full/r,g,b").array
    crop = np.zeros((89, 89, 3), dtype=np.float64)
    crop[44:, 44:] = img[:45, :45]
    assert x.loc[0, "summary_ch-1_mean"] == pytest.approx(crop[..., 1].mean(), rel=1e-12)
    inner = img[300 - 44:300 + 45, 400 - 44:400 + 45].astype(np.float64)
    assert x.loc[2, "summary_ch-0_quantile-0.5"] == np.quantile(inner[..., 0], 0.5)
    with pytest.raises(InputError, match="scale=1"):
        image_features(a, channels=chans, flavor="squidpy", scale=0.5, image_store=store)
    with pytest.raises(InputError, match="flavor"):
        image_features(a, channels=chans, flavor="scanpy", image_store=store)


def test_segmentation_family_expkit_flavor(sq_cases):
    """Default flavor: object count, covered fraction, area mean/std and mean intensity under the objects,
    against a per-spot numpy reference; a missing label channel names the sample and the key."""
    adata, store, chans = sq_cases["fixture"]
    a = adata[:12].copy()
    res = image_features(a, channels=chans, features=("summary", "segmentation"), image_store=store,
                         diameter=60.0, key_added="seg")
    cols = a.uns["seg"]["columns"]
    assert res["n_features"] == 15 + 4 + 3 and "segmentation/label.count" in cols and "full/g.objects_mean" in cols
    lab, img = store.read("segmentation/label").array[..., 0], store.read("full/r,g,b").array
    side = a.uns["seg"]["params"]["crop_side"][0]
    x = pd.DataFrame(a.obsm["seg"], columns=cols)
    for i in range(a.n_obs):
        lc = ref_crop(lab[..., None], *a.obsm["spatial"][i], 1.0, side)[..., 0]
        ic = ref_crop(img, *a.obsm["spatial"][i], 1.0, side)
        ids, areas = np.unique(lc[lc > 0], return_counts=True)
        assert x.loc[i, "segmentation/label.count"] == len(ids)
        assert x.loc[i, "segmentation/label.fraction"] == pytest.approx((lc > 0).mean(), rel=1e-6)
        if len(ids):
            np.testing.assert_allclose(x.loc[i, ["segmentation/label.area_mean", "segmentation/label.area_std"]],
                                       [areas.mean(), areas.std()], rtol=1e-6)
            assert x.loc[i, "full/b.objects_mean"] == pytest.approx(ic[..., 2][lc > 0].mean(), rel=1e-6)
    with pytest.raises(KeyNotFoundError) as exc:
        image_features(a, channels=chans, features="segmentation", segmentation_key="nuclei", image_store=store,
                       key_added="none")
    assert "nuclei/label" in str(exc.value) and lib_of(a) in str(exc.value) and "none" not in a.obsm


def lib_of(adata):
    return next(iter(adata.uns["spatial"]))


@pytest.mark.gpu
def test_squidpy_flavor_cpu_and_cuda_agree(sq_cases):
    adata, store, chans = sq_cases["fixture"]
    a, b = adata.copy(), adata.copy()
    kw = dict(channels=chans, features=("summary", "histogram", "texture", "segmentation"), flavor="squidpy",
              image_store=store)
    image_features(a, use_gpu=False, **kw)
    image_features(b, use_gpu=True, **kw)
    np.testing.assert_allclose(a.obsm["img.features"], b.obsm["img.features"], rtol=1e-9, atol=1e-9)
