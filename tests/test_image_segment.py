"""Nuclei segmentation (expkit/kernels/segment.py, expkit/spatial/image_segment.py) and label images in the
ImageStore (expkit/io/images.py), on the squidpy test image, the Giotto dentate gyrus H&E and DLPFC 151673."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from expkit.errors import InputError, KeyNotFoundError
from expkit.io.images import ImageStore, get_image, scale_transform
from expkit.kernels import segment as K
from expkit.spatial.image_segment import image_segment, objects_to_adata

REF = Path(__file__).parent / "data" / "segment_ref" / "squidpy_watershed.tsv"
CROP = np.s_[600:1200, 200:800]
STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])


def _imread(path: Path) -> np.ndarray:
    import matplotlib.pyplot as plt

    return plt.imread(path)


@pytest.fixture(scope="module")
def squidpy_rgb(shared_data) -> np.ndarray:
    path = shared_data / "visium_fixtures" / "squidpy_test_img.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return _imread(path)


def _intensities(rgb):
    """As tests/reference/make_segment_ref.py (numpy only)."""
    gray = (255 - np.rint(rgb[:, :, :3].astype(np.float64).mean(axis=2))).astype(np.uint8)
    m = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)
    col = np.linalg.inv(m)[:, 0].astype(np.float32)
    od = -np.log10((rgb[:, :, :3].astype(np.float32) + 1.0) / np.float32(256.0))
    return {"gray_inv": gray, "hematoxylin": od @ col}


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.zeros(shape, np.uint8)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 200
    return img


def _canon(labels):
    """Objects as a set of (frozen) pixel sets, independent of the numbering."""
    lab = labels.ravel()
    order = np.argsort(lab, kind="stable")
    ids, starts = np.unique(lab[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {tuple(g) for i, g in zip(ids, groups) if i != 0}


# ------------------------------------------------------------------------------------------
# thresholds
# ------------------------------------------------------------------------------------------
def _between(v, t):
    fg = v >= t
    w1 = fg.mean()
    if w1 in (0.0, 1.0):
        return -1.0
    return (1 - w1) * w1 * (v[~fg].mean() - v[fg].mean()) ** 2


def test_otsu_matches_brute_force(squidpy_rgb):
    gray = _intensities(squidpy_rgb)["gray_inv"].astype(np.int64).ravel()
    t = K.otsu_threshold(gray)
    cands = np.unique(gray)[1:]
    best = max(_between(gray.astype(float), c) for c in cands)
    assert _between(gray.astype(float), t) == pytest.approx(best, rel=1e-12)
    # floats: within 0.1 % of the best split over all bin edges (Otsu uses bin centres)
    h = _intensities(squidpy_rgb[CROP])["hematoxylin"].ravel().astype(np.float64)
    th = K.otsu_threshold(h, nbins=128)
    edges = np.histogram_bin_edges(h, bins=128)[1:-1]
    best = max(_between(h, e) for e in edges)
    assert _between(h, th) >= 0.999 * best
    # two well separated modes are split between them; a constant image has no foreground
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(50, 5, 3000), rng.normal(150, 5, 1000)])
    assert np.array_equal(v >= K.otsu_threshold(v), v > 100)
    assert not (np.full(10, 7.0) >= K.otsu_threshold(np.full(10, 7.0))).any()


def test_local_threshold_finds_spots_on_a_gradient():
    img = _discs((120, 160), [(30, 30), (30, 130), (90, 40), (90, 120)], 5).astype(float) * 0.25
    img += np.linspace(0, 120, 160)[None, :]  # a background ramp brighter than the left spots
    glob = ndi.label(img >= K.otsu_threshold(img))[1]
    surf = K.local_threshold(img, 31, offset=-10, method="gaussian")
    assert ndi.label(img >= surf)[1] == 4 and glob != 4
    assert K.threshold_objects(img, thresh=K.local_threshold(img, 31, -10, "mean")).max() == 4
    # the mean surface is the window mean (reflected borders)
    m = K.local_threshold(img, 5, offset=2.0, method="mean")
    assert m[50, 60] == pytest.approx(img[48:53, 58:63].mean() - 2.0)
    with pytest.raises(ValueError):
        K.local_threshold(img, 4, 0)


# ------------------------------------------------------------------------------------------
# colour deconvolution
# ------------------------------------------------------------------------------------------
def test_hematoxylin_recovers_stain_concentrations():
    m = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)
    conc = np.array([[0.8, 0.0, 0.0], [0.0, 0.6, 0.0], [0.5, 0.3, 0.0], [0.0, 0.0, 0.0]])
    od = conc @ m
    rgb = ((256.0 * 10 ** (-od) - 1.0) / 255.0)[None]  # floats in [0, 1], exactly invertible
    np.testing.assert_allclose(K.hematoxylin(rgb)[0], conc[:, 0], atol=1e-5)
    lo, hi = K.hematoxylin_range(np.uint8)
    h = K.hematoxylin(np.random.default_rng(1).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    assert lo <= h.min() and h.max() <= hi


def test_hematoxylin_high_on_dark_purple_dentate_gyrus(shared_data):
    """Giotto's dentate gyrus H&E (deg_image2.png; deg_image.png is a blue spot-array image): the
    darkest blue-purple pixels (the granule cell layer, dense nuclei) have a hematoxylin value 1.4x
    that of the bright eosin-pink pixels, and exceed them in 90 % of pairs."""
    path = shared_data / "giotto" / "Visium_mouse_brain_DG" / "images" / "deg_image2.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    a = _imread(path)[:, :, :3]
    h = K.hematoxylin(a)
    lum, r, b = a.mean(axis=2), a[:, :, 0], a[:, :, 2]
    dark = (lum <= np.quantile(lum, 0.05)) & (b > r)
    pink = (r > b) & (lum >= np.median(lum))
    assert dark.sum() > 500 and pink.sum() > 500
    assert np.median(h[dark]) > 1.4 * np.median(h[pink])
    hd, hp = np.sort(h[dark]), np.sort(h[pink])
    auc = np.searchsorted(hp, hd).sum() / (hd.size * hp.size)
    assert auc > 0.9


# ------------------------------------------------------------------------------------------
# watershed
# ------------------------------------------------------------------------------------------
def test_watershed_splits_touching_discs():
    img = _discs((60, 80), [(30, 28), (30, 50)], 12)  # two overlapping circles, 22 px apart
    lab = K.watershed_nuclei(img, thresh=100)
    assert lab.dtype == np.int32 and lab.max() == 2
    tab = K.object_table(lab)
    union = int((img > 0).sum())
    assert tab["area"].sum() == union
    assert abs(tab["area"][0] - tab["area"][1]) <= 0.03 * union  # symmetric: halves
    assert tab["area"].min() > np.pi * 12 ** 2 * 0.75
    np.testing.assert_allclose(np.sort(tab["col"]), [28, 50], atol=0.5)  # the halves keep their centres
    np.testing.assert_allclose(tab["row"], 30, atol=0.5)
    # one disc: one object; three in a row: three; the threshold method merges touching ones
    assert K.watershed_nuclei(_discs((60, 60), [(30, 30)], 12), thresh=100).max() == 1
    three = _discs((60, 110), [(30, 25), (30, 49), (30, 73)], 13)  # overlapping
    assert K.watershed_nuclei(three, thresh=100).max() == 3
    assert K.threshold_objects(three, thresh=100).max() == 1
    # dark objects: geq=False on the inverted image gives the same objects
    assert _canon(K.watershed_nuclei(255 - img, thresh=155, geq=False)) == _canon(lab)
    assert K.watershed_nuclei(img, thresh=100, min_area=10_000).max() == 0


def test_watershed_agrees_with_skimage_counts(squidpy_rgb):
    """Reference counts from scikit-image (tests/reference/make_segment_ref.py): within 2 %, for both
    marker connectivities, with the same threshold (and the same mask)."""
    ref = pd.read_csv(REF, sep="\t", comment="#")
    assert len(ref) == 4
    for _, row in ref.iterrows():
        img = _intensities(squidpy_rgb[CROP] if row.region == "crop" else squidpy_rgb)[row.intensity]
        # skimage's foreground is img > t
        thr = np.nextafter(np.float32(row.threshold), np.float32(np.inf)) if img.dtype.kind == "f" \
            else row.threshold + 0.5
        assert int((img >= thr).sum()) == row.mask_pixels
        for conn, n_ref in ((1, row.n_objects_conn1), (2, row.n_objects_conn2)):
            n = K.watershed_nuclei(img, thresh=thr, marker_connectivity=conn).max()
            assert abs(n - n_ref) <= 0.02 * n_ref, (row.intensity, row.region, conn, n, n_ref)


def test_watershed_real_image_inside_mask_and_deterministic(squidpy_rgb):
    h = K.hematoxylin(squidpy_rgb[CROP])
    t = K.otsu_threshold(h)
    lab, markers = K.watershed_nuclei(h, return_markers=True)
    assert np.array_equal(lab, K.watershed_nuclei(h))
    assert not (lab[h < t] > 0).any()  # objects only inside the mask
    assert 1000 < lab.max() < 1300
    # every marker is inside its own object; each object is one connected piece
    assert (lab[markers > 0] > 0).all()
    pieces = sum(ndi.label(lab == i, structure=np.ones((3, 3)))[1] for i in range(1, 60))
    assert pieces == 59


def test_object_table_matches_per_object_loops():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 6, (40, 30))
    lab[lab == 4] = 0  # a missing id
    inten = rng.random((40, 30, 2))
    tab = K.object_table(lab, inten)
    assert list(tab["label"]) == [1, 2, 3, 5]
    for k, i in enumerate(tab["label"]):
        rr, cc = np.nonzero(lab == i)
        assert tab["area"][k] == rr.size
        assert tab["row"][k] == pytest.approx(rr.mean()) and tab["col"][k] == pytest.approx(cc.mean())
        np.testing.assert_allclose(tab["mean"][k], inten[rr, cc].mean(axis=0))


# ------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------
def _tiled(img, tile, overlap, **kw):
    thr = K.otsu_threshold(img)
    labels = K.segment_tiled(lambda r0, r1, c0, c1: (img[r0:r1, c0:c1], img[r0:r1, c0:c1, None]),
                             img.shape, lambda im, b: K.watershed_nuclei(im, thr, exclude_border=b, **kw),
                             tile=tile, overlap=overlap)
    arr = labels.to_array()
    return arr, labels.table()


def test_tiles_give_the_same_objects(squidpy_rgb):
    h = K.hematoxylin(squidpy_rgb[CROP])
    one, t1 = _tiled(h, 4096, 0)
    assert np.array_equal(one, K.watershed_nuclei(h))
    for tile, overlap in ((128, 40), (100, 64)):
        arr, tt = _tiled(h, tile, overlap)
        assert arr.dtype == np.uint32 and len(tt["label"]) == len(t1["label"])
        assert _canon(arr) == _canon(one)
        o1, o2 = np.lexsort((t1["col"], t1["row"])), np.lexsort((tt["col"], tt["row"]))
        np.testing.assert_allclose(tt["row"][o2], t1["row"][o1])
        np.testing.assert_allclose(tt["col"][o2], t1["col"][o1])
        np.testing.assert_array_equal(tt["area"][o2], t1["area"][o1])
        np.testing.assert_allclose(tt["mean"][o2], t1["mean"][o1])
        assert set(np.unique(arr)) == set(range(len(tt["label"]) + 1))  # ids 1..n
    # discs straddling tile corners: neither split nor doubled
    img = _discs((200, 200), [(64, 64), (64, 128), (128, 100), (20, 64)], 9).astype(np.float32)
    arr, tt = _tiled(img, 64, 24)
    assert len(tt["label"]) == 4 and np.allclose(np.sort(tt["area"]), np.sort(K.object_table(
        K.watershed_nuclei(img))["area"]))


# ------------------------------------------------------------------------------------------
# label images in the ImageStore and in uns
# ------------------------------------------------------------------------------------------
def test_label_image_store_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    seeds = rng.integers(0, 70_000, (75, 70)).astype(np.int64) + 1  # ids above 65535
    lab = np.kron(seeds, np.ones((16, 16), np.int64))[:1190, :1110]
    lab[:40] = 0
    store = ImageStore(tmp_path / "s.h5")
    store.write("seg", lab, transform=scale_transform(0.5), labels=True, pyramid=True)
    assert store.kind("seg") == "labels" and store.channels() == ["seg/label"]
    full = store.read("seg/label").array
    assert full.dtype == np.uint32 and np.array_equal(full[:, :, 0], lab)
    assert store.levels("seg")[:2] == [1, 2]
    import h5py

    with h5py.File(store.path) as f:
        lv2 = f["pyramid/seg/2"][()]
        assert f["pyramid/seg/2"].attrs["kind"] == "labels"
    assert np.array_equal(lv2[:, :, 0], lab[::2, ::2])  # nearest (top-left), never averaged
    ids = set(np.unique(lab))
    for dpp in (3.0, 7.0, 20.0):
        win = store.read("seg/label", xrange=(100, 2000), yrange=(50, 2300), dpp=dpp)
        assert win.array.dtype == np.uint32 and set(np.unique(win.array)) <= ids
    # uint16 and bool inputs are stored as uint32; bad inputs refused
    store.write("small", lab.astype(np.uint16)[:100, :100] % 1000, labels=True)
    assert store.read("small/label").array.dtype == np.uint32
    with pytest.raises(InputError, match="ids must be"):
        store.write("neg", -np.ones((10, 10), np.int32), labels=True)
    with pytest.raises(InputError, match="one channel"):
        store.write("rgb", np.zeros((10, 10, 3), np.uint8), labels=True)
    with pytest.raises(InputError, match="uint8 or uint16"):
        store.write("u32", np.zeros((10, 10), np.uint32))
    assert store.images() == ["seg", "small"]
    store.write("img", np.full((600, 600), 7, np.uint8), pyramid=True)  # ordinary images: unchanged
    assert store.kind("img") == "image" and store.read("img/0", dpp=2).array.dtype == np.uint8


def test_label_image_in_uns_is_not_rescaled(tmp_path):
    import anndata as ad

    lab = np.arange(12 * 9, dtype=np.uint32).reshape(12, 9) * 1000  # up to 107000
    a = ad.AnnData(np.zeros((1, 1)))
    a.uns["spatial"] = {"s1": {"images": {"seg": lab}, "scalefactors": {"tissue_seg_scalef": 0.25}}}
    win = get_image(a, "seg/label")
    assert win.array.dtype == np.uint32 and np.array_equal(win.array[:, :, 0], lab)
    assert win.extent[1] == pytest.approx((9 - 0.5) / 0.25)
    store = ImageStore(tmp_path / "u.h5")
    store.fill_from_uns(a)
    assert store.kind("seg") == "labels" and np.array_equal(store.read("seg/label").array[:, :, 0], lab)


# ------------------------------------------------------------------------------------------
# image_segment
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dlpfc(shared_data):
    from expkit.io import read_visium

    path = shared_data / "dlpfc" / "151673"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return read_visium(path, sample="151673")


def test_image_segment_uns_images(dlpfc, tmp_path):
    a = dlpfc.copy()
    res = image_segment(a, channel="lowres/r,g,b", hematoxylin=True)
    entry = a.uns["spatial"]["151673"]
    s = entry["scalefactors"]["tissue_lowres_scalef"]
    assert entry["scalefactors"]["tissue_segmentation_scalef"] == s
    lab = entry["images"]["segmentation"]
    assert lab.dtype == np.uint32 and lab.shape == (600, 600)
    obj = a.uns["segmentation"]["objects"]
    assert res["n_objects"] == len(obj) == lab.max() > 100
    assert list(obj.columns) == ["label", "x", "y", "area", "area_px", "intensity.r", "intensity.g",
                                 "intensity.b", "intensity.hematoxylin"]
    np.testing.assert_allclose(obj["area"], obj["area_px"] / s ** 2)
    np.testing.assert_array_equal(np.bincount(lab.ravel())[1:], obj["area_px"])
    # centroids back in lowres pixels fall in (or next to) their object
    rr = np.clip(np.rint(obj["y"] * s).astype(int), 0, 599)
    cc = np.clip(np.rint(obj["x"] * s).astype(int), 0, 599)
    assert np.mean(lab[rr, cc] == obj["label"]) > 0.9
    win = get_image(a, "segmentation/label", xrange=(2000, 6000), yrange=(3000, 7000))
    assert win.array.dtype == np.uint32 and set(np.unique(win.array)) <= set(np.unique(lab))
    p = a.uns["segmentation"]["params"]
    assert p["thresh"] == "otsu" and p["sample"] == "151673" and None not in p.values()
    a.write_h5ad(tmp_path / "a.h5ad")  # the table and the label image are h5ad-storable
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(back.uns["segmentation"]["objects"], obj, check_index_type=False)
    cells = objects_to_adata(a)
    assert cells.shape == (len(obj), 4) and list(cells.var_names) == ["r", "g", "b", "hematoxylin"]
    np.testing.assert_allclose(cells.obsm["spatial"], obj[["x", "y"]].to_numpy())
    assert cells.obs_names[0] == f"151673:obj{obj['label'].iloc[0]}"
    assert "lowres" in cells.uns["spatial"]["151673"]["images"]


def test_image_segment_store_tiled_equals_untiled(squidpy_rgb, tmp_path):
    import anndata as ad

    store = ImageStore(tmp_path / "img.h5")
    t = np.array([[0.5, 0, 10.0], [0, 0.5, -4.0], [0, 0, 1]])
    store.write("hires", squidpy_rgb[CROP], transform=t)
    a = ad.AnnData(np.zeros((1, 1)))
    r1 = image_segment(a, channel="hires/r,g,b", hematoxylin=True, image_store=store, key_added="seg")
    o1 = a.uns["seg"]["objects"]
    l1 = store.read("seg/label").array[:, :, 0]
    assert store.kind("seg") == "labels" and np.allclose(store.transform("seg"), t)
    r2 = image_segment(a, channel="hires/r,g,b", hematoxylin=True, image_store=store, key_added="seg",
                       tile=128, overlap=40)
    o2 = a.uns["seg"]["objects"]
    assert r1["n_objects"] == r2["n_objects"] == len(o2) and r1["threshold"] == r2["threshold"]
    assert _canon(store.read("seg/label").array[:, :, 0]) == _canon(l1)
    k1, k2 = o1.sort_values(["y", "x"]), o2.sort_values(["y", "x"])
    np.testing.assert_allclose(k1[["x", "y", "area"]].to_numpy(), k2[["x", "y", "area"]].to_numpy())
    # x, y: the centroids in full-resolution coordinates (inverse transform); area in full-res px^2
    com = np.array(ndi.center_of_mass(np.ones_like(l1), l1, o1["label"].to_numpy()))
    np.testing.assert_allclose(o1["x"], (com[:, 1] - 10.0) / 0.5, atol=1e-9)
    np.testing.assert_allclose(o1["y"], (com[:, 0] + 4.0) / 0.5, atol=1e-9)
    np.testing.assert_allclose(k1["area"], k1["area_px"] * 4.0)
    # method "threshold": connected components of the same mask
    h = K.hematoxylin(squidpy_rgb[CROP])
    image_segment(a, channel="hires/r,g,b", hematoxylin=True, method="threshold", image_store=store,
                  key_added="cc")
    assert len(a.uns["cc"]["objects"]) == ndi.label(h >= r1["threshold"])[1]


def test_image_segment_single_channel_and_intensities(squidpy_rgb):
    import anndata as ad

    gray = _intensities(squidpy_rgb[CROP])["gray_inv"]
    a = ad.AnnData(np.zeros((1, 1)))
    a.uns["spatial"] = {"s": {"images": {"hires": np.dstack([gray, squidpy_rgb[CROP]])},
                              "scalefactors": {"tissue_hires_scalef": 0.2}}}
    image_segment(a, channel="hires/r", intensity_channels=["g", "b"], tile=256)  # r: the gray channel
    obj = a.uns["segmentation"]["objects"]
    assert len(obj) == K.watershed_nuclei(gray).max()
    assert list(obj.columns[-2:]) == ["intensity.g", "intensity.b"]
    lab = a.uns["spatial"]["s"]["images"]["segmentation"]
    red = squidpy_rgb[CROP][:, :, 0].astype(float)
    k = obj["label"].to_numpy()
    np.testing.assert_allclose(obj["intensity.g"], ndi.mean(red, lab, k))


def test_image_segment_errors_and_empty(dlpfc, squidpy_rgb, tmp_path):
    a = dlpfc.copy()
    with pytest.raises(KeyNotFoundError, match=r"151673.*lowres/r"):
        image_segment(a, channel="hires/dapi")
    with pytest.raises(InputError, match="hematoxylin=True needs"):
        image_segment(a, channel="lowres/r", hematoxylin=True)
    with pytest.raises(InputError, match="one channel"):
        image_segment(a, channel="lowres/r,g,b")
    with pytest.raises(InputError, match="method"):
        image_segment(a, channel="lowres/r", method="cellpose")
    with pytest.raises(InputError, match="segmented image itself"):
        image_segment(a, channel="lowres/r", key_added="lowres")
    assert "segmentation" not in a.uns and "segmentation" not in a.uns["spatial"]["151673"]["images"]
    # a name taken by an intensity image: refused, nothing written
    store = ImageStore(tmp_path / "e.h5")
    store.write("hires", squidpy_rgb[:200, :200])
    store.write("other", squidpy_rgb[:200, :200])
    with pytest.raises(InputError, match="not a label image"):
        image_segment(a, channel="hires/r", image_store=store, key_added="other")
    assert store.kind("other") == "image" and "other" not in a.uns
    # no object: a warning, a label image of zeros and an empty table
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = image_segment(a, channel="hires/g", thresh=300, image_store=store)
    assert res["n_objects"] == 0 and any("no object" in str(x.message) for x in w)
    assert store.read("segmentation/label").array.max() == 0
    assert len(a.uns["segmentation"]["objects"]) == 0
