"""Make the squidpy image-feature references in tests/data/squidpy_img_ref/ (run in the squidpy venv).

    OMP_NUM_THREADS=1 /work/sqvenv/bin/python tests/reference/make_squidpy_image_features.py [SHARED_DATA]

squidpy's ``sq.im.calculate_image_features`` (summary, histogram, texture; segmentation on the squidpy
fixture) at spot_scale 1 and 2, on

* ``fixture``: squidpy's own test data (``visium_fixtures/squidpy_test_data.h5ad`` + ``squidpy_test_img.jpg``,
  a full-resolution crop: ImageContainer scale 1), all 49 spots, also with ``mask_circle=True``; the label
  image of the segmentation family is :func:`dark_labels` of the image (plain numpy/scipy, rebuilt alike by
  the tests);
* ``visium``: the scanpy Visium fixture's real lowres image (``scanpy_visium_1.0.0``, scale
  ``tissue_lowres_scalef``; its hires image is all zeros), all 100 spots;
* ``giotto``: GiottoData's dentate-gyrus crop (``giotto/Visium_mouse_brain_DG/images/deg_image.png``, RGB
  of the RGBA PNG) with the locations mapped as GiottoData's ``loadGiottoMini`` does (the image spans the
  range of the spot locations, y negated): :func:`giotto_pixels`; 200 of the 624 spots (every third-ish,
  the indices are stored), spot diameter ``spot_diameter_fullres`` x the geometric mean of the two scales.

Images are given to squidpy as uint8 arrays read from the files (scanpy's float copies would change the
summaries' scale). Each TSV (gzip) holds ``obs`` (the spot name) and squidpy's columns; the first line is a
``#`` provenance comment.
"""
from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "data" / "squidpy_img_ref"
FEATURES = ["summary", "histogram", "texture"]


def dark_labels(img: np.ndarray) -> np.ndarray:
    """Connected components (8-connectivity) of the pixels whose r + g + b lies below the 15th percentile."""
    from scipy import ndimage

    s = img[..., :3].astype(np.int64).sum(-1)
    thr = int(np.percentile(s, 15))
    lab, _ = ndimage.label(s < thr, structure=np.ones((3, 3), dtype=int))
    return lab.astype(np.uint16)


def giotto_pixels(locs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """GiottoData's mini-Visium image placement: the image's outer edges at the min/max of the locations,
    y negative downwards; returns (x, y) in image pixels, pixel k covering [k, k + 1) (squidpy's view)."""
    (x0, y0), (x1, y1) = locs.min(0), locs.max(0)
    h, w = shape
    return np.column_stack([(locs[:, 0] - x0) * w / (x1 - x0), (y1 - locs[:, 1]) * h / (y1 - y0)])


def load_cases(shared: Path):
    """(name, AnnData, uint8 image, scale, obs subset or None) per case."""
    import anndata as ad
    import scanpy as sc
    from PIL import Image

    fx = ad.read_h5ad(shared / "visium_fixtures" / "squidpy_test_data.h5ad")
    fx_img = np.asarray(Image.open(shared / "visium_fixtures" / "squidpy_test_img.jpg"))
    vis = sc.read_visium(shared / "visium_fixtures" / "scanpy_visium_1.0.0")
    vis.var_names_make_unique()
    lib = next(iter(vis.uns["spatial"]))
    vis_img = np.asarray(Image.open(shared / "visium_fixtures" / "scanpy_visium_1.0.0" / "spatial" /
                                    "tissue_lowres_image.png"))[..., :3]
    vis_scale = vis.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"]
    dg = shared / "giotto" / "Visium_mouse_brain_DG"
    dg_img = np.asarray(Image.open(dg / "images" / "deg_image.png"))[..., :3]
    locs = np.loadtxt(dg / "visium_DG_locs.txt")
    sf = json.loads((dg / "scalefactors_json.json").read_text())
    xy = giotto_pixels(locs, dg_img.shape[:2])
    (x0, y0), (x1, y1) = locs.min(0), locs.max(0)
    scale = np.sqrt(dg_img.shape[1] / (x1 - x0) * dg_img.shape[0] / (y1 - y0))
    g = ad.AnnData(np.zeros((len(xy), 1), dtype=np.float32))
    g.obs_names = [f"dg{i}" for i in range(len(xy))]
    g.obsm["spatial"] = xy
    g.uns["spatial"] = {"dg": {"images": {}, "scalefactors": {"spot_diameter_fullres":
                                                               sf["spot_diameter_fullres"] * scale}}}
    sub = np.unique(np.round(np.linspace(0, len(xy) - 1, 200)).astype(int))
    return [("fixture", fx, fx_img, 1.0, None), ("visium", vis, vis_img, vis_scale, None),
            ("giotto", g, dg_img, 1.0, list(g.obs_names[sub]))]


def features(adata, img, scale, spot_scale, labels=None, mask_circle=False) -> pd.DataFrame:
    import squidpy as sq

    ic = sq.im.ImageContainer(img, layer="image", scale=scale)
    feats, kw = list(FEATURES), {}
    if labels is not None:
        ic.add_img(labels[..., None], layer="labels")
        feats.append("segmentation")
        kw = {"segmentation": {"label_layer": "labels"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sq.im.calculate_image_features(adata, ic, layer="image", features=feats, features_kwargs=kw,
                                              spot_scale=spot_scale, mask_circle=mask_circle, copy=True,
                                              n_jobs=1, show_progress_bar=False)


def write(df: pd.DataFrame, name: str, note: str) -> None:
    import squidpy as sq

    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT / f"{name}.tsv.gz", "wt") as f:
        f.write(f"# squidpy {sq.__version__} calculate_image_features, {note}; "
                "made by tests/reference/make_squidpy_image_features.py\n")
        df.rename_axis("obs").to_csv(f, sep="\t", float_format="%.12g")


def main(shared: Path) -> None:
    for name, adata, img, scale, subset in load_cases(shared):
        a = adata if subset is None else adata[subset].copy()
        labels = dark_labels(img) if name == "fixture" else None
        for s in (1, 2):
            note = (f"case {name}, spot_scale {s}, image scale {scale!r}, {a.n_obs} spots"
                    + ("" if subset is None else f" (subset of {adata.n_obs})"))
            write(features(a, img, scale, s, labels), f"{name}_s{s}", note)
        if name == "fixture":
            write(features(a, img, scale, 1, labels, mask_circle=True), f"{name}_s1_circle",
                  f"case {name}, spot_scale 1, mask_circle=True")
    total = sum(p.stat().st_size for p in OUT.glob("*.tsv.gz"))
    print(f"wrote {len(list(OUT.glob('*.tsv.gz')))} files, {total / 1e3:.0f} kB, to {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared" / "data")
