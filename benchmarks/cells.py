"""bins_to_cells (expkit.spatial.bins_to_cells): the rasterised Xenium Visium HD case end to end, and a
10 M-bin synthetic slide.

    EXPKIT_SHARED_DATA=/work/shared/data python benchmarks/cells.py [--whole] [--no-synthetic]
        [--side-bins 3200] [--work /tmp/cells_bench] [--out benchmarks/results/cells.md]

(a) The case of expkit.datasets.hd_case.rasterised_visium_hd (real Xenium mouse brain cells and counts, a
    window of ~4,000 cells and with --whole the whole section): read_visium_hd, then bins_to_cells from the
    nuclei label image (expand_um=2; in an ImageStore with the pixel-centre transform) and from the Space
    Ranger-style cell GeoJSON (already expanded: expand_um=0). Time, peak memory (rise of the resident
    memory during the call, benchmarks/_util.measure), share of the cells' counts returned to the right cell.
(b) A synthetic slide of side x side 2 um bins (default 3,200^2 = 10.24 M, 6.4 mm): cells on a jittered
    square grid (7.9 um pitch, ~650 k cells), nucleus radius from resampled real Xenium nucleus areas (capped
    at 0.45 pitch), each cell the counts of a random real Xenium cell thinned binomially to 25 % (~4 UMI per
    2 um bin, a Visium HD-like depth), spread over its bins as in (a); label image at 1 um per pixel. Only
    bins_to_cells is measured (the AnnData and the label store are built first).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import SHARED, measure  # noqa: E402


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers of a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else "# bins -> cells (Visium HD)\n"
    block = f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->\n"
    pat = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n?", re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block
    path.write_text(new)


@contextmanager
def timed(label: str, rows: list):
    """benchmarks/_util.measure (wall time, peak memory rise) plus the process CPU time, appended to ``rows``
    as (label, wall s, peak MiB, cpu s)."""
    c0, inner = time.process_time(), []
    with measure(label, inner):
        yield
    rows.append((label, inner[-1][1], inner[-1][2], time.process_time() - c0))


def share_right(label, truth_cell, counts) -> float:
    has = truth_cell > 0
    return float(counts[has & (label == truth_cell)].sum() / counts[has].sum())


def _labels_of_bins(adata, cells, key="cell"):
    lab = adata.obs[key].map(cells.obs.set_index("barcode")["label"]).astype(float).fillna(0)
    return lab.to_numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------
# (a) the rasterised Xenium case
# ----------------------------------------------------------------------------------------------
def case_rows(case: Path, work: Path) -> list:
    import pandas as pd

    from expkit.io.images import ImageStore
    from expkit.io.visium_hd import read_visium_hd
    from expkit.spatial.bins_to_cells import bins_to_cells

    info = json.loads((case / "case.json").read_text())
    what = "whole section" if info["window_um"] is None else "window"
    rows, out = [], []
    with timed(f"{what}: read_visium_hd", rows):
        adata = read_visium_hd(case / "outs", sample="hd", bin_size=2, load_images=False)
    truth = pd.read_csv(case / "truth.csv.gz")
    cid, counts = truth["cell_id"].to_numpy(), truth["counts"].to_numpy()
    out.append((f"{what}: read_visium_hd", rows[-1][1], rows[-1][3], rows[-1][2], None, None))
    meta = json.loads((case / "nuclei_labels.json").read_text())
    store = ImageStore(work / f"labels_{what[0]}.h5")
    store.write("nuclei", np.load(case / "nuclei_labels.npy"), labels=True, overwrite=True,
                transform=np.array(meta["transform_pixel_centres"]))
    runs = [("label image, expand_um=2", dict(segmentation="nuclei", image_store=store, expand_um=2.0)),
            ("cell GeoJSON, expand_um=0", dict(polygons=case / "outs" / "segmented_outputs" /
                                                "cell_segmentations.geojson", expand_um=0.0)),
            ("nucleus GeoJSON, expand_um=2", dict(polygons=case / "outs" / "segmented_outputs" /
                                                   "nucleus_segmentations.geojson", expand_um=2.0))]
    for name, kw in runs:
        a = adata.copy()
        with timed(f"{what}: bins_to_cells({name})", rows):
            cells = bins_to_cells(a, **kw)
        if "polygons" in kw:  # polygon cells are named by the GeoJSON cell_id
            lab = a.obs["cell"].astype(object).fillna(0).astype(np.int64).to_numpy()
        else:
            lab = _labels_of_bins(a, cells)
        out.append((f"{what}: bins_to_cells({name})", rows[-1][1], rows[-1][3], rows[-1][2],
                    share_right(lab, cid, counts), int(cells.n_obs)))
    return out, info


# ----------------------------------------------------------------------------------------------
# (b) a 10 M-bin synthetic slide
# ----------------------------------------------------------------------------------------------
def synthetic_slide(side: int, work: Path, seed: int = 0, pitch: float = 7.9, thin: float = 0.25):
    """(bins AnnData, ImageStore with the 1 um label image 'nuclei', truth cell per bin, n cells)."""
    import anndata as ad
    import scipy.sparse as sp

    from expkit.datasets import hd_case as H
    from expkit.io.images import ImageStore

    rng = np.random.default_rng(seed)
    mpp, bin_um = 0.2738, 2.0
    real = H._read_xenium(H.default_xenium(), None)
    extent = side * bin_um
    g = np.arange(pitch / 2, extent, pitch)
    cx, cy = np.meshgrid(g, g)
    xy = np.stack([cx.ravel(), cy.ravel()], axis=1) + rng.uniform(-0.3, 0.3, (cx.size, 2)) * pitch
    pick = rng.integers(0, len(real.ids), size=len(xy))
    X = real.X[pick].tocsr()
    X.data = rng.binomial(X.data, thin)
    X.eliminate_zeros()
    cells = H._Cells(np.arange(1, len(xy) + 1, dtype=np.int64), xy, np.minimum(real.r[pick], 0.45 * pitch), X,
                     real.gene_ids, real.gene_names)
    bins = H._Grid(np.array([bin_um / 2, bin_um / 2]), bin_um, 0.0, (side, side))
    owner, _ = H._owners(bins, cells.xy, cells.r, 2.0)
    counts, _, _ = H._counts(cells, owner, rng, 0.2)
    lab_grid = H._Grid(np.array([0.5, 0.5]), 1.0, 0.0, (int(extent), int(extent)))
    lab_owner, _ = H._owners(lab_grid, cells.xy, cells.r, 0.0)
    labels = np.where(lab_owner >= 0, lab_owner + 1, 0).astype(np.uint32).reshape(lab_grid.shape)
    del lab_owner
    s = mpp / 1.0
    store = ImageStore(work / "synthetic_labels.h5")
    store.write("nuclei", labels, labels=True, overwrite=True,
                transform=np.array([[s, 0, -0.5], [0, s, -0.5], [0, 0, 1.0]]))
    del labels
    rows, cols = np.divmod(np.arange(side * side), side)
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    adata.obs_names = H._barcodes(bins, 2)
    adata.obsm["spatial"] = bins.centres(rows, cols) / mpp
    adata.uns["spatial"] = {"synthetic": {"images": {}, "metadata": {"bin_size_um": 2.0},
                                          "scalefactors": {"bin_size_um": 2.0, "microns_per_pixel": mpp,
                                                           "spot_diameter_fullres": bin_um / mpp}}}
    truth = np.where(owner >= 0, owner + 1, 0)
    return adata, store, truth, len(xy)


def synthetic_rows(side: int, work: Path) -> list:
    from expkit.spatial.bins_to_cells import bins_to_cells

    t0 = time.perf_counter()
    adata, store, truth, n_cells = synthetic_slide(side, work)
    print(f"synthetic slide built in {time.perf_counter() - t0:.1f} s: {adata.n_obs:,} bins, {n_cells:,} cells, "
          f"{adata.X.nnz:,} non-zero counts", flush=True)
    counts = np.asarray(adata.X.sum(axis=1)).ravel()
    rows = []
    name = f"synthetic {side}x{side} bins ({adata.n_obs / 1e6:.2f} M), {n_cells:,} cells: label image, expand_um=2"
    with timed(name, rows):
        cells = bins_to_cells(adata, segmentation="nuclei", image_store=store, expand_um=2.0, sample="synthetic")
    lab = _labels_of_bins(adata, cells)
    return [(name, rows[-1][1], rows[-1][3], rows[-1][2], share_right(lab, truth, counts), int(cells.n_obs))]


def _table(rows) -> str:
    lines = ["| step | wall s | cpu s | peak MiB | counts to the right cell | cells |", "|---|---|---|---|---|---|"]
    for name, t, cpu, peak, share, n in rows:
        lines.append(f"| {name} | {t:.2f} | {cpu:.2f} | {peak:.0f} | {'' if share is None else f'{share:.4f}'} | "
                     f"{'' if n is None else f'{n:,}'} |")
    return "\n".join(lines) + "\n"


SYNTHETIC_NOTE = ("- synthetic: {side} x {side} bins of 2 um, cells on a jittered 7.9 um grid, nuclei of resampled "
                  "real Xenium areas (radius capped at 0.45 pitch), counts of random real Xenium cells thinned to "
                  "25 %, label image at 1 um per pixel; only the bins_to_cells call is timed")


def main() -> None:
    from benchmarks.compare_bin2cell import build_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--whole", action="store_true", help="also the whole Xenium section (~4.5 M grid bins)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--side-bins", type=int, default=3200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cells_bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cells.md")
    args = ap.parse_args()
    print(f"shared data: {SHARED}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for whole in ([False, True] if args.whole else [False]):
        case = build_case(args.work, whole)
        r, info = case_rows(case, args.work)
        rows += r
        notes.append(f"- {'whole section' if whole else 'window ' + str(tuple(info['window_um'])) + ' um'}: "
                     f"{info['n_cells']:,} cells, {info['n_bins_in_tissue']:,} in-tissue bins "
                     f"({info['n_bins_in_cells']:,} in cells), label image {info['label_um']} um per pixel")
    if not args.no_synthetic:
        rows += synthetic_rows(args.side_bins, args.work)
        notes.append(SYNTHETIC_NOTE.format(side=args.side_bins))
    text = _table(rows)
    print(text)
    cmd = "benchmarks/cells.py" + (" --whole" if args.whole else "") + (" --no-synthetic" if args.no_synthetic else "")
    write_section(args.out, "cells", f"## bins_to_cells end to end\n\n`{cmd}` (2-core CPU, shared).\n\n" + text +
                  "\n" + "\n".join(notes) + "\n\nCounts to the right cell: share of the counts of the true cell "
                  "bins (truth.csv.gz) whose bin was given to its true cell.\n")


if __name__ == "__main__":
    main()
