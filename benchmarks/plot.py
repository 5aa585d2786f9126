"""Benchmark of image windows and spatial plots, and the DLPFC layer figure.

    OMP_NUM_THREADS=1 MPLBACKEND=Agg python benchmarks/plot.py [--size 25000] [--out bench_out]

1. get_image windows of a synthetic (size x size x 3) uint8 image written chunk by chunk into an
   ImageStore (never allocated whole): time and Python peak memory (tracemalloc, numpy buffers
   included) per window / dpp, against the window's own size.
2. plot_spatial of 4 samples (DLPFC 151673, 151674, each twice) as one grid coloured by the manual
   layer over the lowres H&E: time and peak memory, PNG written to --out.
3. ``dlpfc_layers_png(out)``: DLPFC 151673 and 151674 coloured by the manual layer (the figure to look at).

Shared data: $EXPKIT_SHARED_DATA or ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


def visium_anndata(folder: Path, sample: str):
    """A minimal Visium AnnData in the expkit layout (plain h5py/pandas; the real reader is
    ``expkit.io.read_visium``, used instead when available)."""
    try:
        from expkit.io import read_visium  # type: ignore

        return read_visium(folder, sample=sample)
    except Exception:
        pass
    import anndata as ad
    import h5py
    import matplotlib.image as mpimg
    import scipy.sparse as sp

    folder = Path(folder)
    h5 = sorted(folder.glob("filtered_feature_bc_matrix*.h5"))[0]
    with h5py.File(h5, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape).T.tocsr()
        barcodes = [b.decode() for b in m["barcodes"][()]]
        ids = [b.decode() for b in m["features/id"][()]]
        names = [b.decode() for b in m["features/name"][()]]
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]).set_index("barcode")
    pos = pos.loc[barcodes]
    obs = pd.DataFrame({"sample": sample, "barcode": barcodes}, index=[f"{sample}:{b}" for b in barcodes])
    var = pd.DataFrame({"gene": names}, index=pd.Index(ids).astype(str))
    var.index = pd.Index(pd.Series(var.index).where(~pd.Series(var.index).duplicated(), pd.Series(var.index) + "-dup"))
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    adata.obsm["spatial.array"] = pos[["array_row", "array_col"]].to_numpy()
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    images = {}
    for name in ("hires", "lowres"):
        p = folder / "spatial" / f"tissue_{name}_image.png"
        if p.exists():
            img = mpimg.imread(p)
            img = np.clip(np.rint(img[:, :, :3] * 255), 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img[:, :, :3]
            images[name] = img
    adata.uns["spatial"] = {sample: {"images": images, "scalefactors": sf, "metadata": {}}}
    return adata


def dlpfc(sample_id: str, name: str | None = None):
    folder = shared_data() / "dlpfc" / sample_id
    name = name or sample_id
    adata = visium_anndata(folder, name)
    truth = pd.read_csv(folder / f"{sample_id}_truth.txt", sep="\t", header=None, names=["barcode", "layer"],
                        dtype=str).set_index("barcode")["layer"]
    adata.obs["layer"] = pd.Categorical(adata.obs["barcode"].map(truth))
    return adata


def dlpfc_layers_png(out: str | Path = "dlpfc_layers.png", dpi: int = 110) -> Path:
    """DLPFC 151673 and 151674 coloured by the manual layer over their lowres H&E."""
    import matplotlib.pyplot as plt

    from expkit.pl import plot_spatial

    ads = {s: dlpfc(s) for s in ("151673", "151674")}
    fig = plot_spatial(ads, plot_embeddings={"color": "layer", "alpha": 0.85}, title="DLPFC manual layers",
                       dpi=dpi)
    out = Path(out)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


class _LazyImage:
    """A (size, size, 3) uint8 image generated band by band (never held whole); every 256 x 256
    tile differs, with some texture so that compression is not trivial."""

    def __init__(self, size: int):
        self.shape = (size, size, 3)
        self.dtype = np.dtype(np.uint8)
        c = np.arange(size)
        self.cols = np.stack([(c // 256 * 37) % 251, (c // 97) % 256, (c // 61 * 5) % 256], axis=1).astype(np.uint8)

    def __getitem__(self, rows):
        r0 = rows.start or 0
        n = min(256, self.shape[0] - r0)
        band = np.empty((n, self.shape[1], 3), dtype=np.uint8)
        band[:] = self.cols
        band[:, :, 0] += np.uint8(r0 // 256 * 11 % 251)
        band[:, ::7, 1] ^= 0x55
        return band


def _measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return res, dt, peak


def bench_windows(size: int, tmp: Path) -> list[dict]:
    from expkit.io.images import ImageStore

    store = ImageStore(tmp / "big.images.h5")
    t0 = time.perf_counter()
    store.write("full", _LazyImage(size), channels=["r", "g", "b"], compression="lzf")  # + pyramid levels
    t_write = time.perf_counter() - t0
    flat = ImageStore(tmp / "flat.images.h5")  # the same without pyramid: strided overview reads
    t0 = time.perf_counter()
    flat.write("full", _LazyImage(size), channels=["r", "g", "b"], compression="lzf", pyramid=False)
    t_flat = time.perf_counter() - t0
    rows = [{"case": f"write {size}x{size}x3 lzf + pyramid {store.levels('full')}", "seconds": round(t_write, 2),
             "file_MB": round(store.path.stat().st_size / 1e6, 1)},
            {"case": f"write {size}x{size}x3 lzf, no pyramid", "seconds": round(t_flat, 2),
             "file_MB": round(flat.path.stat().st_size / 1e6, 1)}]
    cases = [
        ("512x512 window, dpp=1", store, "full/r,g,b", (10000, 10511), (10000, 10511), 1),
        ("2048x2048 window, dpp=1", store, "full/r,g,b", (5000, 7047), (5000, 7047), 1),
        ("2048x2048 window, dpp=4 (level 4)", store, "full/r,g,b", (5000, 7047), (5000, 7047), 4),
        ("2048x2048 window, dpp=4 (no pyramid: stride)", flat, "full/r,g,b", (5000, 7047), (5000, 7047), 4),
        ("whole slide, dpp=size/1000 (pyramid)", store, "full/r,g,b", None, None, size / 1000),
        ("whole slide, dpp=size/1000 (no pyramid: stride)", flat, "full/r,g,b", None, None, size / 1000),
    ]
    for label, st, chans, xr, yr, dpp in cases:
        win, dt, peak = _measure(lambda: st.read(chans, xrange=xr, yrange=yr, dpp=dpp))
        rows.append({"case": label, "level": win.level, "shape": "x".join(map(str, win.array.shape)),
                     "seconds": round(dt, 3), "peak_MB": round(peak / 1e6, 1),
                     "window_MB": round(win.array.nbytes / 1e6, 1)})
    return rows


def bench_plot(out: Path, dpi: int = 80) -> dict:
    import matplotlib.pyplot as plt

    from expkit.pl import plot_spatial

    a, b = dlpfc("151673"), dlpfc("151674")
    ads = {"151673": a, "151674": b, "151673 (2)": a.copy(), "151674 (2)": b.copy()}
    for name, ad in list(ads.items()):
        ad.uns["spatial"] = {name: next(iter(ad.uns["spatial"].values()))}

    def run():
        fig = plot_spatial(ads, plot_embeddings={"color": "layer"}, dpi=dpi)
        fig.savefig(out / "bench_grid.png", dpi=dpi)
        plt.close(fig)

    _, dt, peak = _measure(run)
    _, dt2, peak2 = _measure(run)
    return {"case": "plot_spatial 4 DLPFC samples + savefig", "seconds_first": round(dt, 2),
            "seconds": round(dt2, 2), "peak_MB": round(peak2 / 1e6, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=25000)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for row in bench_windows(args.size, Path(tmp)):
            print(row)
    if (shared_data() / "dlpfc").is_dir():
        print(bench_plot(out))
        print("wrote", dlpfc_layers_png(out / "dlpfc_layers.png"))
    else:
        print("shared data absent: plot benchmark skipped")


if __name__ == "__main__":
    main()
