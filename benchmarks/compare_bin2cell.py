"""expkit's bins_to_cells against bin2cell (Polanski et al. 2024) on the rasterised Visium HD case.

    EXPKIT_SHARED_DATA=/work/shared/data python benchmarks/compare_bin2cell.py [--whole] [--b2c-python
        /work/b2cvenv/bin/python] [--work /tmp/b2c_compare] [--out benchmarks/results/cells.md]

The case (expkit.datasets.hd_case.rasterised_visium_hd: real Xenium mouse brain cells on a rotated 2 um
grid, nuclei label image at 0.5 um per pixel (1 um for the whole section), cells = nuclei expanded by 2 um
without merging, truth per bin) is read by each tool its own way, from the same files:

- expkit (this venv): read_visium_hd -> bins_to_cells(segmentation=<the label image in an ImageStore,
  transform for pixel centres>, expand_um=2);
- bin2cell (its own venv, called through subprocess, this same script with --side): b2c.read_visium ->
  b2c.insert_labels(the same label image as a sparse .npz, mpp = its pixel size) -> b2c.expand_labels
  (algorithm max_bin_distance, in bins: 1 = expand_um / bin size, and bin2cell's default 2) ->
  b2c.bin_to_cell. Per-bin labels come back as .npy files.

Reported: share of the cells' counts returned to the right cell (truth.csv.gz), agreement of the per-bin
assignment (share of bins with the same cell, over all bins and over the bins assigned by either), wall
time and peak resident memory (rise during the step, sampled every 10 ms) of the assignment + aggregation
(reading excluded, timed apart).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import SHARED, measure  # noqa: E402,F401  (stdlib only: usable from the side venv)
from benchmarks.cells import timed, write_section  # noqa: E402  (numpy only at import)

WINDOW = (1500.0, 1200.0, 2500.0, 2200.0)  # microns: ~4,000 cells of the section
B2C_PYTHON = "/work/b2cvenv/bin/python"


# ----------------------------------------------------------------------------------------------
# side: runs in the bin2cell venv (no expkit import)
# ----------------------------------------------------------------------------------------------
def side(case: Path, work: Path, distances) -> None:
    import bin2cell as b2c
    import scipy.sparse as sp

    meta = json.loads((case / "nuclei_labels.json").read_text())
    npz = work / "nuclei_labels.npz"
    sp.save_npz(npz, sp.csr_matrix(np.load(case / "nuclei_labels.npy")))
    square = case / "outs" / "binned_outputs" / "square_002um"
    res = {}
    rows = []
    with timed("bin2cell read_visium", rows):
        adata = b2c.read_visium(square, library_id="hd")
    adata.var_names_make_unique()
    res["read_s"], res["read_peak_mib"] = rows[-1][1], rows[-1][2]
    np.save(work / "b2c_barcodes.npy", adata.obs_names.to_numpy().astype(str))
    for d in distances:
        a = adata.copy()
        with timed(f"bin2cell insert/expand(max_bin_distance={d})/bin_to_cell", rows):
            b2c.insert_labels(a, str(npz), basis="spatial", mpp=meta["microns_per_label_pixel"], labels_key="labels")
            b2c.expand_labels(a, labels_key="labels", expanded_labels_key="labels_expanded",
                              algorithm="max_bin_distance", max_bin_distance=d)
            cdata = b2c.bin_to_cell(a, labels_key="labels_expanded", spatial_keys=["spatial"])
        res[f"d{d}"] = {"s": rows[-1][1], "peak_mib": rows[-1][2], "cpu_s": rows[-1][3], "n_cells": int(cdata.n_obs)}
        np.save(work / f"b2c_labels_d{d}.npy", a.obs["labels_expanded"].to_numpy().astype(np.int64))
        np.save(work / f"b2c_nuclei_d{d}.npy", a.obs["labels"].to_numpy().astype(np.int64))
    (work / "b2c.json").write_text(json.dumps(res, indent=2))


# ----------------------------------------------------------------------------------------------
# main: the expkit side, the metrics, the report
# ----------------------------------------------------------------------------------------------
def build_case(work: Path, whole: bool) -> Path:
    from expkit.datasets.hd_case import rasterised_visium_hd

    case = work / ("case_whole" if whole else "case_window")
    if not (case / "case.json").is_file():
        kw = {"label_um": 1.0} if whole else {"window_um": WINDOW}
        with timed(f"build case ({'whole section' if whole else 'window'})", []):
            rasterised_visium_hd(case, seed=0, **kw)
    return case


def run_expkit(case: Path, work: Path):
    from expkit.io.images import ImageStore
    from expkit.io.visium_hd import read_visium_hd
    from expkit.spatial.bins_to_cells import bins_to_cells

    rows = []
    with timed("expkit read_visium_hd", rows):
        adata = read_visium_hd(case / "outs", sample="hd", bin_size=2, load_images=False)
    meta = json.loads((case / "nuclei_labels.json").read_text())
    store = ImageStore(work / "labels_store.h5")
    store.write("nuclei", np.load(case / "nuclei_labels.npy"), labels=True, overwrite=True,
                transform=np.array(meta["transform_pixel_centres"]))
    with timed("expkit bins_to_cells(label image, expand_um=2)", rows):
        cells = bins_to_cells(adata, segmentation="nuclei", image_store=store, expand_um=2.0)
    lab = adata.obs["cell"].map(cells.obs.set_index("barcode")["label"]).astype(float).fillna(0).to_numpy()
    return adata, lab.astype(np.int64), {"read_s": rows[0][1], "s": rows[1][1], "peak_mib": rows[1][2],
                                         "cpu_s": rows[1][3], "n_cells": int(cells.n_obs)}


def metrics(label, truth_cell, counts) -> dict:
    has = truth_cell > 0
    right = has & (label == truth_cell)
    return {"share_counts_right": float(counts[right].sum() / counts[has].sum()),
            "share_cell_bins_right": float(right.sum() / has.sum()),
            "share_bins_right": float(np.mean(label == truth_cell)),
            "share_background_bins_assigned": float(np.mean(label[~has] > 0))}


def agreement(a, b) -> dict:
    either = (a > 0) | (b > 0)
    return {"all_bins": float(np.mean(a == b)), "assigned_by_either": float(np.mean((a == b)[either]))}


def compare(case: Path, work: Path, b2c_python: str, distances) -> dict:
    import pandas as pd

    adata, ek_lab, ek = run_expkit(case, work)
    subprocess.run([b2c_python, str(Path(__file__).resolve()), "--side", str(case), "--work", str(work),
                    "--distances", *map(str, distances)], check=True)
    b2c = json.loads((work / "b2c.json").read_text())
    truth = pd.read_csv(case / "truth.csv.gz")
    assert (truth["barcode"].to_numpy() == adata.obs_names.to_numpy()).all()
    bcs = np.load(work / "b2c_barcodes.npy")
    pos = pd.Series(np.arange(len(bcs)), index=bcs).loc[adata.obs_names].to_numpy()
    cid, counts = truth["cell_id"].to_numpy(), truth["counts"].to_numpy()
    out = {"case": json.loads((case / "case.json").read_text()), "expkit": {**ek, **metrics(ek_lab, cid, counts)},
           "bin2cell_read_s": b2c["read_s"]}
    for d in distances:
        lab = np.load(work / f"b2c_labels_d{d}.npy")[pos]
        out[f"bin2cell_d{d}"] = {**b2c[f"d{d}"], **metrics(lab, cid, counts), "agreement": agreement(lab, ek_lab)}
    return out


def table(res: dict, distances) -> str:
    c = res["case"]
    head = (f"**{'whole section' if c['window_um'] is None else 'window ' + str(tuple(c['window_um'])) + ' um'}**: "
            f"{c['n_cells']:,} cells, {c['n_bins_in_tissue']:,} in-tissue 2 um bins ({c['n_bins_in_cells']:,} in "
            f"cells), label image {c['labels_shape'][1]} x {c['labels_shape'][0]} px at {c['label_um']} um.\n\n"
            "| method | counts to the right cell | cell bins right | background bins assigned | "
            "same cell as expkit (all bins / assigned by either) | wall s | cpu s | peak MiB | cells |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    e = res["expkit"]
    lines = [f"| expkit bins_to_cells (expand_um=2) | {e['share_counts_right']:.4f} | {e['share_cell_bins_right']:.4f}"
             f" | {e['share_background_bins_assigned']:.4f} | 1 / 1 | {e['s']:.2f} | {e['cpu_s']:.2f} | {e['peak_mib']:.0f} | "
             f"{e['n_cells']:,} |"]
    for d in distances:
        b = res[f"bin2cell_d{d}"]
        ag = b["agreement"]
        lines.append(f"| bin2cell expand_labels(max_bin_distance={d}) | {b['share_counts_right']:.4f} | "
                     f"{b['share_cell_bins_right']:.4f} | {b['share_background_bins_assigned']:.4f} | "
                     f"{ag['all_bins']:.4f} / {ag['assigned_by_either']:.4f} | {b['s']:.2f} | {b['cpu_s']:.2f} | "
                     f"{b['peak_mib']:.0f} | {b['n_cells']:,} |")
    reads = (f"\nReading the folder: expkit read_visium_hd {e['read_s']:.2f} s, bin2cell read_visium "
             f"{res['bin2cell_read_s']:.2f} s.\n")
    return head + "\n".join(lines) + "\n" + reads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--whole", action="store_true", help="also the whole section (~4.5 M bins)")
    ap.add_argument("--b2c-python", default=B2C_PYTHON)
    ap.add_argument("--work", type=Path, default=Path("/tmp/b2c_compare"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cells.md")
    args = ap.parse_args()
    if args.side is not None:
        side(args.side, args.work, args.distances)
        return
    print(f"shared data: {SHARED}")
    args.work.mkdir(parents=True, exist_ok=True)
    parts = []
    for whole in ([False, True] if args.whole else [False]):
        case = build_case(args.work, whole)
        w = args.work / ("whole" if whole else "window")
        w.mkdir(exist_ok=True)
        res = compare(case, w, args.b2c_python, args.distances)
        (w / "results.json").write_text(json.dumps(res, indent=2))
        parts.append(table(res, args.distances))
        print(parts[-1], flush=True)
    write_section(args.out, "bin2cell", "## expkit bins_to_cells against bin2cell\n\n"
                  "`benchmarks/compare_bin2cell.py" + (" --whole" if args.whole else "") + "` (2-core CPU; bin2cell "
                  "0.3.5 with scanpy 1.11 in its own venv).\n\n" + "\n".join(parts) + NOTES)


NOTES = """
Notes: both tools look up the same label image at each bin centre (bin2cell: floor of the scaled full-resolution
coordinate, the image's own convention; expkit: the ImageStore transform of pixel centres, the same pixels).
bin2cell then expands in bin units on the array grid (a bin takes the label of the nearest labelled bin within
max_bin_distance bins, ties broken by expression PCA); expkit expands the label image itself by expand_um
(nearest object pixel) and looks the bins up in the expanded image. The truth expands the exact nucleus disks
by 2 um (nearest nucleus boundary), so max_bin_distance=1 (2 um between bin centres) is the nominal equivalent
of expand_um=2 and bin2cell's default 2 (4 um) over-expands.
"""


if __name__ == "__main__":
    main()
