"""ImageStore, images_from_uns and get_image (expkit/io/images.py)."""
from __future__ import annotations

import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expkit.errors import InputError, KeyNotFoundError
from expkit.io.images import ImageStore, get_image, images_from_uns, parse_channels, scale_transform


# ------------------------------------------------------------------------------------------
# a minimal Visium AnnData builder (the readers are written in parallel; used by test_plots too)
# ------------------------------------------------------------------------------------------
def visium_anndata(folder: Path, sample: str):
    """Build an expkit-layout AnnData from a Space Ranger folder with h5py/pandas/matplotlib."""
    import anndata as ad
    import h5py
    import matplotlib.image as mpimg
    import scipy.sparse as sp

    folder = Path(folder)
    h5 = sorted(folder.glob("filtered_feature_bc_matrix*.h5"))[0]
    with h5py.File(h5, "r") as f:
        m = f["matrix"]
        X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=tuple(m["shape"][()])).T.tocsr()
        barcodes = [b.decode() for b in m["barcodes"][()]]
        ids = [b.decode() for b in m["features/id"][()]]
        names = [b.decode() for b in m["features/name"][()]]
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    pos = pos.set_index("barcode").loc[barcodes]
    obs = pd.DataFrame({"sample": sample, "barcode": barcodes}, index=[f"{sample}:{b}" for b in barcodes])
    var = pd.DataFrame({"gene": names}, index=ids)
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    adata.var_names_make_unique()
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    adata.obsm["spatial.array"] = pos[["array_row", "array_col"]].to_numpy()
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    images = {}
    for name in ("hires", "lowres"):
        p = folder / "spatial" / f"tissue_{name}_image.png"
        if p.exists():
            img = mpimg.imread(p)  # float32 in [0, 1] for PNG
            images[name] = np.clip(np.rint(img[:, :, :3] * 255), 0, 255).astype(np.uint8)
    adata.uns["spatial"] = {sample: {"images": images, "scalefactors": sf, "metadata": {}}}
    return adata


@pytest.fixture(scope="module")
def scanpy_visium(shared_data):
    return visium_anndata(shared_data / "visium_fixtures" / "scanpy_visium_1.0.0", "v1")


# ------------------------------------------------------------------------------------------
def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_parse_channels():
    assert parse_channels("hires/r,g,b") == [("hires", "r"), ("hires", "g"), ("hires", "b")]
    assert parse_channels(["dapi/0", "if/cd31"]) == [("dapi", "0"), ("if", "cd31")]
    assert parse_channels("r,g") == [(None, "r"), (None, "g")]
    with pytest.raises(InputError):
        parse_channels("hires/")


def test_write_read_roundtrip_and_window(tmp_path):
    img = _rgb(700, 500)
    store = ImageStore(tmp_path / "s.images.h5")
    store.write("hires", img, channels=["r", "g", "b"], transform=scale_transform(0.5))
    store.write("dapi", (np.arange(300 * 200, dtype=np.uint16).reshape(300, 200) * 3), channels=["0"],
                transform=scale_transform(0.2))
    assert store.images() == ["dapi", "hires"]
    assert store.channels() == ["dapi/0", "hires/r", "hires/g", "hires/b"]
    np.testing.assert_allclose(store.transform("hires"), np.diag([0.5, 0.5, 1.0]))
    assert [f for f in os.listdir(tmp_path)] == ["s.images.h5"]  # no temporary left behind

    whole = store.read("hires/r,g,b")
    np.testing.assert_array_equal(whole.array, img)
    assert whole.extent == (-1.0, 999.0, 1399.0, -1.0)  # pixel centre (0, 0) is full-res (0, 0)

    # full-res window x in [200, 400], y in [100, 300] -> hires cols 100..200, rows 50..150
    win = store.read("hires/b,r", xrange=(200, 400), yrange=(100, 300))
    np.testing.assert_array_equal(win.array, img[50:151, 100:201][:, :, [2, 0]])
    left, right, bottom, top = win.extent
    assert left <= 200 and right >= 400 and top <= 100 and bottom >= 300
    assert right - left == pytest.approx(win.array.shape[1] / 0.5)
    arr, extent = win  # tuple-like unpacking
    assert arr is win.array and extent == win.extent
    assert win.channels == ["hires/b", "hires/r"]

    d = store.read("dapi/0", xrange=(0, 50), yrange=(0, 50))
    assert d.array.dtype == np.uint16 and d.array.shape == (11, 11, 1)


def test_unknown_channel_lists_available(tmp_path):
    store = ImageStore(tmp_path / "s.h5")
    store.write("lowres", _rgb(20, 20), transform=scale_transform(0.1))
    with pytest.raises(KeyNotFoundError, match=r"lowres/x.*available.*'lowres/r'"):
        store.read("lowres/x")
    with pytest.raises(KeyNotFoundError, match=r"no image 'hires'.*lowres/r"):
        store.read("hires/r")
    with pytest.raises(KeyNotFoundError):
        get_image(store, "q")


def test_dpp_chooses_resolution_and_strides(tmp_path):
    full = _rgb(800, 800, 1)
    store = ImageStore(tmp_path / "s.h5")
    store.write("full", full)  # identity transform: 1 data unit per pixel
    store.write("mid", full[::4, ::4].copy(), transform=scale_transform(0.25))
    store.write("low", full[::16, ::16].copy(), transform=scale_transform(1 / 16))
    assert store.read("r,g,b").image == "full"  # no dpp: finest
    assert store.read("r,g,b", dpp=1).image == "full"
    assert store.read("r,g,b", dpp=5).image == "mid"  # coarsest still at least as fine
    assert store.read("r,g,b", dpp=16).image == "low"
    assert store.read("r,g,b", dpp=100).image == "low"
    assert store.read("r,g,b", dpp=0.1).image == "full"  # none fine enough: finest
    # an explicit image read coarser than it is: strided, memory of the output only
    w = store.read("full/r", dpp=8)
    assert w.array.shape == (100, 100, 1) and w.dpp == 8
    np.testing.assert_array_equal(w.array[:, :, 0], full[3::8, 3::8, 0])
    assert w.extent == (-0.5, 799.5, 799.5, -0.5)


def test_pyramid_levels(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(2048, 1536, 3), dtype=np.uint8)
    store = ImageStore(tmp_path / "p.h5")
    store.write("he", base, transform=scale_transform(0.5), pyramid=True, compression="lzf")
    store.write("small", base[:100, :100].copy())  # default: no pyramid for small images
    assert store.levels("he") == [1, 2, 4] and store.levels("small") == [1]
    assert store.images() == ["he", "small"]  # levels are not images
    w1 = store.read("he/r,g,b")
    assert w1.level == 1 and w1.array.shape == (2048, 1536, 3)
    w2 = store.read("he/r,g,b", dpp=4)  # image dpp 2: the 2x level has dpp 4
    assert w2.level == 2 and w2.array.shape == (1024, 768, 3) and w2.dpp == pytest.approx(4)
    w4 = store.read("he/g", dpp=9)  # the 4x level (dpp 8), no stride
    assert w4.level == 4 and w4.array.shape == (512, 384, 1)
    # same covered area at every level
    for w in (w2, w4):
        assert w.extent == pytest.approx(w1.extent)
    # level values are block means of the image (two rounded 2x2 stages: within 1)
    ref = base[:, :, 1].reshape(512, 4, 384, 4).astype(float).mean(axis=(1, 3))
    assert np.abs(w4.array[:, :, 0] - ref).max() <= 1.0
    # a window at a coarse level lands on the same place as at the full level
    xr, yr = (1000, 1400), (2000, 2600)
    a = store.read("he/r", xrange=xr, yrange=yr, dpp=8)
    assert a.level == 4 and a.xrange[0] <= 1000 and a.xrange[1] >= 1400
    assert a.xrange[1] - a.xrange[0] <= 400 + 2 * 8
    full = store.read("he/r", xrange=(a.xrange[0] + 0.01, a.xrange[1] - 0.01),
                      yrange=(a.yrange[0] + 0.01, a.yrange[1] - 0.01))
    assert full.array.shape[0] == 4 * a.array.shape[0] and full.array.shape[1] == 4 * a.array.shape[1]
    blocks = full.array[:, :, 0].reshape(a.array.shape[0], 4, a.array.shape[1], 4).astype(float).mean(axis=(1, 3))
    assert np.abs(blocks - a.array[:, :, 0]).max() <= 1.0
    store.delete("he")
    assert store.images() == ["small"]
    # levels deeper than the band height are built by reading the previous level back, tile by
    # tile: the same values as the streamed cascade
    from expkit.io._window import _down2, _downsample_dataset

    lvl2 = _down2(base)
    out = np.zeros((512, 384, 3), np.uint8)
    _downsample_dataset(lvl2, out, chunk=7)
    np.testing.assert_array_equal(out[:, :, 1:2], w4.array)


def test_atomic_create_and_add(tmp_path):
    class Failing:
        shape, dtype = (2000, 300, 3), np.dtype(np.uint8)

        def __getitem__(self, rows):
            if rows.start >= 512:
                raise RuntimeError("disk on fire")
            return np.zeros((256, 300, 3), np.uint8)

    path = tmp_path / "s.h5"
    store = ImageStore(path)
    with pytest.raises(RuntimeError):
        store.write("hires", Failing())
    assert not path.exists() and os.listdir(tmp_path) == []  # creation is all or nothing
    store.write("lowres", _rgb(30, 30), transform=scale_transform(0.05))
    with pytest.raises(RuntimeError):
        store.write("hires", Failing())
    assert store.images() == ["lowres"]  # the half-written image is invisible
    store.write("hires", _rgb(40, 40), transform=scale_transform(0.15))
    assert store.images() == ["hires", "lowres"]
    with pytest.raises(InputError, match="already exists"):
        store.write("hires", _rgb(40, 40))
    store.write("hires", _rgb(50, 50), overwrite=True, transform=scale_transform(0.15))
    assert store.shape("hires") == (50, 50, 3)
    import h5py

    with h5py.File(path, "r") as f:
        assert sorted(f["images"]) == ["hires", "lowres"]
        assert f["images/hires"].chunks == (50, 50, 3) and f["images/hires"].compression == "gzip"


class _CountingFile(io.RawIOBase):
    """A file object counting the bytes h5py reads through it."""

    def __init__(self, path):
        self.f = open(path, "rb")
        self.nread = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, off, whence=0):
        return self.f.seek(off, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        n = self.f.readinto(b)
        self.nread += n or 0
        return n

    def close(self):
        self.f.close()
        super().close()


class _CountingStore(ImageStore):
    def __init__(self, path):
        super().__init__(path)
        self.files = []

    def _open(self, mode="r"):
        import h5py

        if mode != "r":
            return super()._open(mode)
        fobj = _CountingFile(self.path)
        self.files.append(fobj)
        return h5py.File(fobj, "r")


class _LazyBig:
    """(n, n) uint8 image made band by band, every 256x256 tile different (never allocated whole)."""

    def __init__(self, n):
        self.shape, self.dtype = (n, n), np.dtype(np.uint8)
        self.cols = ((np.arange(n) // 256) * 37 % 251).astype(np.uint8)

    def __getitem__(self, rows):
        r0 = rows.start
        band = np.empty((min(256, self.shape[0] - r0), self.shape[1]), np.uint8)
        band[:] = self.cols + np.uint8((r0 // 256) * 11 % 251)
        band[:, ::7] ^= 0x55  # some texture so that compressed chunks are not trivial
        return band


@pytest.mark.parametrize("n", [6000, pytest.param(25000, marks=pytest.mark.slow)])
def test_window_reads_only_its_chunks(tmp_path, n):
    src = _LazyBig(n)
    path = tmp_path / "big.h5"
    ImageStore(path).write("big", src, channels=["0"], compression="lzf", pyramid=False)
    file_size = path.stat().st_size
    store = _CountingStore(path)
    store.images()  # metadata read
    x0, y0, size = n // 2 + 100, n // 3 + 50, 512
    tracemalloc.start()
    win = store.read("big/0", xrange=(x0, x0 + size - 1), yrange=(y0, y0 + size - 1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert win.array.shape == (size, size, 1)
    expect = np.empty((size, size), np.uint8)
    band_rows = {}
    for i in range(size):
        r = y0 + i
        b0 = r - r % 256
        if b0 not in band_rows:
            band_rows[b0] = src[slice(b0, b0 + 256)]
        expect[i] = band_rows[b0][r - b0, x0:x0 + size]
    np.testing.assert_array_equal(win.array[:, :, 0], expect)
    # a 512x512 window overlaps at most 3x3 chunks of 256x256 (64 KiB raw each)
    nread = store.files[-1].nread
    assert nread < 9 * 256 * 256 + 64 * 1024, (nread, file_size)
    assert nread < file_size / 20
    assert peak < 4 * win.array.nbytes + 2 * 1024 * 1024, peak


def test_images_from_uns_and_get_image(scanpy_visium, tmp_path):
    ad = scanpy_visium
    sf = ad.uns["spatial"]["v1"]["scalefactors"]
    imgs = images_from_uns(ad)
    assert [i[0] for i in imgs] == ["hires", "lowres"]
    for name, arr, chans, t in imgs:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and chans == ["r", "g", "b"]
        assert t[0, 0] == pytest.approx(sf[f"tissue_{name}_scalef"])
    store = ImageStore(tmp_path / "v1.images.h5")
    assert store.fill_from_uns(ad) == ["hires", "lowres"]
    xr, yr = (2000, 3000), (4000, 5200)
    for chans in ("hires/r,g,b", "lowres/g"):
        a = get_image(ad, chans, xrange=xr, yrange=yr)
        b = get_image(store, chans, xrange=xr, yrange=yr)
        np.testing.assert_array_equal(a.array, b.array)
        assert a.extent == pytest.approx(b.extent)
    # the pixel covering a known spot: hires pixel (round(y*s), round(x*s))
    x, y = ad.obsm["spatial"][0]
    s = sf["tissue_hires_scalef"]
    w = get_image(store, "hires/r,g,b", xrange=(x, x), yrange=(y, y))
    assert w.array.shape[:2] == (1, 1)
    np.testing.assert_array_equal(w.array[0, 0], ad.uns["spatial"]["v1"]["images"]["hires"][round(y * s), round(x * s)])
    # auto resolution by dpp on the AnnData too
    assert get_image(ad, "r,g,b", dpp=1 / s).image == "hires"
    assert get_image(ad, "r,g,b", dpp=30).image == "lowres"
    with pytest.raises(KeyNotFoundError, match="hires/r"):
        get_image(ad, "hires/z")
    # an AnnData pointing at its store (uns['spatial'][sample]['image_store']) reads from the store
    ad2 = ad.copy()
    ad2.uns["spatial"]["v1"] = {"scalefactors": dict(sf), "image_store": str(store.path)}
    np.testing.assert_array_equal(get_image(ad2, "lowres/g", xrange=xr, yrange=yr).array,
                                  get_image(store, "lowres/g", xrange=xr, yrange=yr).array)
    with pytest.raises(KeyNotFoundError, match="no sample 'nope'"):
        get_image(ad, "hires/r", sample="nope")


def test_lowres_only_sample(shared_data):
    ad = visium_anndata(shared_data / "dlpfc" / "151673", "151673")
    assert [i[0] for i in images_from_uns(ad)] == ["lowres"]
    w = get_image(ad, "r,g,b", dpp=2)  # nothing that fine: the finest there is
    assert w.image == "lowres" and w.array.shape == (600, 600, 3)


def test_import_expkit_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, expkit, expkit.io.images; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
