"""Image processing into the sample's image store: band-by-band exactness, grey weights, user functions,
bounded memory, aligned read-back, named errors, atomic writes."""
from __future__ import annotations

import importlib
import time
import tracemalloc

import h5py
import numpy as np
import pytest
from scipy import ndimage

import expkit
from expkit.errors import InputError, KeyNotFoundError
from expkit.io.images import ImageStore, get_image
from expkit.kernels import image_ops as K
from expkit.spatial.image_process import image_process

IP = importlib.import_module("expkit.spatial.image_process")  # the module (expkit.spatial.image_process is the function)

SAMPLE = "151673"


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    path = shared_data / "dlpfc" / SAMPLE
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return expkit.io.read_visium(path, sample=SAMPLE)


@pytest.fixture()
def store(dlpfc, tmp_path):
    st = ImageStore(tmp_path / f"{SAMPLE}.images.h5")
    st.fill_from_uns(dlpfc, SAMPLE)
    return st


@pytest.fixture(scope="module")
def dg_image(shared_data):
    path = shared_data / "giotto" / "Visium_mouse_brain_DG" / "images" / "deg_image.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGBA"))


def _lowres(adata) -> np.ndarray:
    return np.asarray(adata.uns["spatial"][SAMPLE]["images"]["lowres"])


def _ref_smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """scipy on the whole image: per channel, reflect border, truncate 4, rounded to uint8."""
    out = ndimage.gaussian_filter(img.astype(np.float64), (sigma, sigma, 0), mode="reflect", truncate=4.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _tmp_entries(store: ImageStore) -> list[str]:
    with h5py.File(store.path, "r") as f:
        return [f"{g}/{k}" for g in ("images", "pyramid") if g in f for k in f[g] if k.startswith(".tmp-")]


def _whole(store, image) -> np.ndarray:
    with h5py.File(store.path, "r") as f:
        return f["images"][image][()]


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_smooth_in_tiny_bands_equals_whole_image(dlpfc, store, sigma):
    img = _lowres(dlpfc)
    res = image_process(dlpfc, channels="lowres/r,g,b", sigma=sigma, band=16, image_store=store)
    assert res["channels"] == ["smooth/r", "smooth/g", "smooth/b"]
    out = _whole(store, "smooth")
    np.testing.assert_array_equal(out, _ref_smooth(img, sigma))
    assert not np.array_equal(out, img)
    rec = dlpfc.uns["smooth"]
    assert rec["params"]["sigma"] == sigma and rec["params"]["halo"] == int(4 * sigma + 0.5)
    assert rec["source_image"] == "lowres" and rec["version"] == expkit.__version__
    assert None not in rec["params"].values()


def test_smooth_dentate_gyrus_columns_tiled(dg_image, tmp_path, monkeypatch):
    """A non-square RGBA H&E, bands of 16 rows and column tiles of 40: still the whole-image filter."""
    st = ImageStore(tmp_path / "dg.h5")
    st.write("img", dg_image, channels=["r", "g", "b", "a"], transform=np.diag([0.5, 0.5, 1.0]))
    monkeypatch.setattr(K, "TILE", 40)
    image_process(st, channels="img/r,g,b", sigma=3.0, band=16, key_added="sm", sample="dg")
    np.testing.assert_array_equal(_whole(st, "sm"), _ref_smooth(dg_image[:, :, :3], 3.0))
    np.testing.assert_array_equal(st.transform("sm"), st.transform("img"))


def test_tempfile_route_gives_the_same_image(dlpfc, store, monkeypatch):
    monkeypatch.setattr(IP, "SINGLE_PASS", False)
    before = sorted(p.name for p in store.path.parent.iterdir())
    image_process(dlpfc, channels="lowres/r,g,b", sigma=2.0, band=64, image_store=store)
    assert dlpfc.uns["smooth"]["write"] == "temporary file"
    np.testing.assert_array_equal(_whole(store, "smooth"), _ref_smooth(_lowres(dlpfc), 2.0))
    assert sorted(p.name for p in store.path.parent.iterdir()) == before
    assert _tmp_entries(store) == []


def test_torch_gaussian_matches_scipy(dg_image):
    img = dg_image[:, :, :3]
    for sigma in (0.7, 2.5):
        a = K.gaussian(img, sigma)
        b = K._gaussian_torch(img, sigma, "cpu")
        assert np.abs(a - b).max() < 1e-3


@pytest.mark.gpu
def test_smooth_on_gpu(dlpfc, store):
    image_process(dlpfc, channels="lowres/r,g,b", sigma=2.0, band=64, image_store=store, use_gpu=True)
    diff = np.abs(_whole(store, "smooth").astype(int) - _ref_smooth(_lowres(dlpfc), 2.0))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_grey_uses_bt601_weights(dlpfc, store):
    img = _lowres(dlpfc).astype(np.float64)
    res = image_process(dlpfc, channels="lowres/r,g,b", method="grey", band=100, image_store=store)
    assert res["channels"] == ["grey/grey"]
    expected = np.rint(0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]).astype(np.uint8)
    np.testing.assert_array_equal(get_image(dlpfc, "grey/grey", image_store=store).array[..., 0], expected)


def test_user_functions(dlpfc, store):
    img = _lowres(dlpfc)
    image_process(dlpfc, channels="lowres/r,g,b", method=lambda b: 255 - b, key_added="inv", band=16,
                  image_store=store)
    np.testing.assert_array_equal(_whole(store, "inv"), 255 - img)
    # a function with a 5x5 footprint, given its halo: bands of 16 rows match the whole image
    image_process(dlpfc, channels="lowres/g", method=lambda b: ndimage.maximum_filter(b, (5, 5, 1), mode="reflect"),
                  halo=2, key_added="max5", band=16, image_store=store)
    assert store.channels()[-1] == "max5/g"
    ref = ndimage.maximum_filter(img[:, :, 1:2], (5, 5, 1), mode="reflect")
    np.testing.assert_array_equal(_whole(store, "max5"), ref)
    # float output into uint16, clipped and rounded
    image_process(dlpfc, channels="lowres/r", method=lambda b: b * 300.5, key_added="big", dtype="uint16",
                  image_store=store)
    big = _whole(store, "big")
    assert big.dtype == np.uint16
    np.testing.assert_array_equal(big[..., 0], np.clip(np.rint(img[..., 0] * 300.5), 0, 65535))


# ---------------------------------------------------------------------------------------------- memory
class _CountingStore(ImageStore):
    """An ImageStore recording the rows of every windowed read."""

    def __init__(self, path):
        super().__init__(path)
        self.rows: list[int] = []

    def read(self, channels, xrange=None, yrange=None, dpp=None):
        win = super().read(channels, xrange, yrange, dpp)
        self.rows.append(win.array.shape[0])
        return win


class _Synthetic:
    """A lazy 8192 x 8192 uint8 image (smooth stripes + a little noise), produced band by band."""

    shape, dtype = (8192, 8192), np.dtype(np.uint8)

    def __getitem__(self, key):
        r = np.arange(*key.indices(self.shape[0]))[:, None]
        c = np.arange(self.shape[1])[None, :]
        v = 128 + 60 * np.sin(r / 37.0) * np.cos(c / 53.0) + (((r * 7 + c * 13) % 17) - 8)
        return v.astype(np.uint8)


def test_large_image_memory_bounded(tmp_path):
    st = _CountingStore(tmp_path / "big.h5")
    st.write("hires", _Synthetic(), channels=["0"], compression="lzf", pyramid=False)
    band, sigma = 256, 2.0
    halo = K.gaussian_radius(sigma)
    tracemalloc.start()
    t0 = time.perf_counter()
    res = image_process(st, channels="hires/0", sigma=sigma, band=band, sample="synthetic")
    secs = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"8192^2 uint8, sigma {sigma}, band {band}: {secs:.1f} s, traced peak {peak / 2**20:.1f} MiB")
    assert res["channels"] == ["smooth/0"]
    assert max(st.rows) <= band + 2 * halo
    assert peak < 64 * 2**20  # the image is 64 MiB; one band + halo (+ f's float64 tile) is ~20 MiB
    # spot check two bands against the whole-band filter computed independently
    with h5py.File(st.path, "r") as f:
        for r0 in (0, 4096):
            a0, a1 = max(0, r0 - halo), r0 + 256 + halo
            src = f["images"]["hires"][a0:a1]
            ref = ndimage.gaussian_filter(src.astype(np.float64), (sigma, sigma, 0), mode="reflect", truncate=4.0)
            ref = np.clip(np.rint(ref[r0 - a0:r0 - a0 + 256]), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(f["images"]["smooth"][r0:r0 + 256], ref)


# ---------------------------------------------------------------------------------------------- alignment
def test_read_back_aligned_with_the_source(dlpfc, store):
    image_process(dlpfc, channels="lowres/r,g,b", sigma=2.0, band=32, image_store=store)
    x, y = dlpfc.obsm["spatial"][100]
    d = dlpfc.uns["spatial"][SAMPLE]["scalefactors"]["spot_diameter_fullres"]
    xr, yr = (x - 2 * d, x + 2 * d), (y - 2 * d, y + 2 * d)
    src = get_image(dlpfc, "lowres/r,g,b", xrange=xr, yrange=yr, image_store=store)
    sm = get_image(dlpfc, "smooth/r,g,b", xrange=xr, yrange=yr, image_store=store)
    assert sm.extent == src.extent and sm.array.shape == src.array.shape
    np.testing.assert_array_equal(store.transform("smooth"), store.transform("lowres"))
    s = dlpfc.uns["spatial"][SAMPLE]["scalefactors"]["tissue_lowres_scalef"]
    r0, c0 = int(np.floor(yr[0] * s + 0.5)), int(np.floor(xr[0] * s + 0.5))
    ref = _ref_smooth(_lowres(dlpfc), 2.0)
    np.testing.assert_array_equal(sm.array, ref[r0:r0 + sm.array.shape[0], c0:c0 + sm.array.shape[1]])


def test_in_memory_images(dlpfc, store):
    ad = dlpfc.copy()
    res = image_process(ad, channels="lowres/r,g,b", sigma=2.0, band=50)
    assert res["target"] == "uns" and res["channels"] == ["smooth/r", "smooth/g", "smooth/b"]
    assert "smooth" in ad.uns["spatial"][SAMPLE]["images"]
    x, y = ad.obsm["spatial"][7]
    mem = get_image(ad, "smooth/r,g,b", xrange=(x - 200, x + 200), yrange=(y - 200, y + 200))
    image_process(dlpfc, channels="lowres/r,g,b", sigma=2.0, image_store=store)
    disk = get_image(dlpfc, "smooth/r,g,b", xrange=(x - 200, x + 200), yrange=(y - 200, y + 200),
                     image_store=store)
    assert mem.extent == disk.extent
    np.testing.assert_array_equal(mem.array, disk.array)
    np.testing.assert_array_equal(np.asarray(dlpfc.uns["spatial"][SAMPLE]["images"]["lowres"]), _lowres(ad))
    image_process(ad, channels="lowres/r,g,b", method="grey")
    assert ad.uns["grey"]["channels"] == ["grey/0"]  # in-memory images name channels by count


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_named(dlpfc, store):
    with pytest.raises(KeyNotFoundError, match=r"151673.*lowres/x.*lowres/r"):
        image_process(dlpfc, channels="lowres/x", image_store=store)
    with pytest.raises(KeyNotFoundError, match=r"151673.*hires"):
        image_process(dlpfc, image_store=store)  # default channels hires/r,g,b: DLPFC ships lowres only
    image_process(dlpfc, channels="lowres/r,g,b", image_store=store)
    with pytest.raises(InputError, match=r"151673.*'smooth' already exists"):
        image_process(dlpfc, channels="lowres/r,g,b", image_store=store)
    image_process(dlpfc, channels="lowres/r,g,b", sigma=3.0, overwrite=True, image_store=store)
    assert dlpfc.uns["smooth"]["params"]["sigma"] == 3.0
    with pytest.raises(InputError, match="crop_it"):
        def crop_it(b):
            return b[1:]
        image_process(dlpfc, channels="lowres/r", method=crop_it, key_added="c", image_store=store)
    with pytest.raises(InputError, match="source image"):
        image_process(dlpfc, channels="lowres/r", key_added="lowres", overwrite=True, image_store=store)
    with pytest.raises(InputError, match="method"):
        image_process(dlpfc, channels="lowres/r", method="sharpen", image_store=store)
    with pytest.raises(InputError, match="grey"):
        image_process(dlpfc, channels="lowres/r,g", method="grey", key_added="g2", image_store=store)
    with pytest.raises(InputError, match="sigma"):
        image_process(dlpfc, channels="lowres/r", sigma=0, key_added="s0", image_store=store)
    with pytest.raises(InputError, match="dtype"):
        image_process(dlpfc, channels="lowres/r", dtype="float32", key_added="f", image_store=store)
    assert store.images() == ["lowres", "smooth"]


@pytest.mark.parametrize("route", [True, False])
def test_failing_function_leaves_nothing(dlpfc, store, monkeypatch, route):
    monkeypatch.setattr(IP, "SINGLE_PASS", route)
    before_files = sorted(p.name for p in store.path.parent.iterdir())
    before_images = store.images()
    calls = {"n": 0}

    def breaks_later(b):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom in band 5")
        return b

    def bad_shape_later(b):
        calls["n"] += 1
        return b if calls["n"] < 5 else b[:, :-1]

    for fn, exc in ((breaks_later, RuntimeError), (bad_shape_later, InputError)):
        calls["n"] = 0
        with pytest.raises(exc):
            image_process(dlpfc, channels="lowres/r,g,b", method=fn, key_added="half", band=32, image_store=store)
        assert calls["n"] == 5
        assert store.images() == before_images and "half" not in dlpfc.uns
        assert _tmp_entries(store) == []
        assert sorted(p.name for p in store.path.parent.iterdir()) == before_files
    ad = dlpfc.copy()
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        image_process(ad, channels="lowres/r,g,b", method=breaks_later, key_added="half", band=32)
    assert sorted(ad.uns["spatial"][SAMPLE]["images"]) == ["lowres"]
