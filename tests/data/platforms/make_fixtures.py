"""Build the small platform fixtures of tests/test_io_platforms.py from the shared real data.

Run from the project root (writes next to this script; needs only numpy/pandas/h5py/matplotlib)::

    EXPKIT_SHARED_DATA=/path/to/shared/data python tests/data/platforms/make_fixtures.py

The shared data holds no Visium HD, MERSCOPE or CosMx output, so these fixtures put *real counts*
into *format-faithful* files (names, columns, units and id formats of the vendors' documented
outputs); the geometry (bin grid, FOV tiling), ids and a few derived columns are constructed here and
say so below. Every value is deterministic (no random numbers).

Provenance
- ``visium_hd/outs/binned_outputs/square_008um``: 48 in-tissue bins x 40 genes. Counts = the raw
  UMI counts of 48 spots of spatialLIBD DLPFC 151673 (Maynard et al. 2021; shared
  ``dlpfc/151673``), genes = the 40 genes with most counts over those spots (Ensembl ids and
  symbols from the same file). The spots are laid on an 8 x 6 grid of 8 um bins (barcodes
  ``s_008um_<row:05d>_<col:05d>-1``); ``spatial/tissue_positions.csv`` lists the whole 10 x 8 grid
  (the 32 extra bins ``in_tissue = 0``), pixel positions = grid * (8 um / microns_per_pixel) +
  an offset. ``tissue_lowres_image.png`` is a crop of the real DLPFC 151673 lowres H&E image.
  ``scalefactors_json.json`` carries the Visium HD keys (``microns_per_pixel``, ``bin_size_um``,
  ``spot_diameter_fullres`` = the bin size in full-resolution pixels, ``tissue_*_scalef``,
  ``regist_target_img_scalef``, ``fiducial_diameter_fullres``). Space Ranger writes the positions as
  ``tissue_positions.parquet``; the committed copy is the documented CSV fallback (pyarrow is an
  optional extra), the tests write the parquet version when pyarrow is importable.
- ``visium_hd/.../square_016um``: the same bins summed 2 x 2 (12 bins of 16 um, a 5 x 4 grid).
- ``merscope``: 40 cells x 30 genes + 5 ``Blank-*`` columns. Counts = Xenium mouse brain (shared
  ``xenium_mouse_brain``; Bioconductor SpatialExperiment test data) cells 1001-1040, genes = the
  30 gene-expression features with most counts over those cells (by symbol), Blank-0..4 = the
  cells' counts of the 5 "Blank Codeword" features with most counts in the whole
  dataset. ``cell_metadata.csv`` (unnamed id
  column, fov, volume, center_x, center_y, min_x, max_x, min_y, max_y; microns) takes center_x/y =
  the Xenium centroids (um); volume = cell_area * 7 (a 7-plane stack, derived), the bounding box
  = centroid +- sqrt(cell_area) / 2 (derived), fov = 0/1 by x (derived). The cell ids are 38-digit
  integers in MERSCOPE's style derived from the Xenium ids (they overflow int64: a reader must keep
  them as text). The metadata lists 2 more cells than the matrix and is in another order.
- ``cosmx``: 30 cells + 2 background rows (cell_ID 0) x 30 genes + NegPrb1..5 +
  SystemControl1..3. Counts = Xenium mouse brain cells 2001-2030 (genes as above; NegPrb = the
  5 "Negative Control Probe" features, SystemControl = the 3 "Negative Control Codeword" features
  with most counts in the whole dataset); the cell_ID 0 rows (one per FOV) hold the summed counts of cells
  2031-2040 (real counts of unassigned-like signal). ``Fixture_metadata_file.csv``: fov, cell_ID,
  Area (px^2 = cell_area / 0.12028^2), AspectRatio (1.0, derived), CenterX/Y_local_px,
  CenterX/Y_global_px (= Xenium centroid um / 0.12028 um per px, the CosMx pixel size), Width,
  Height (derived from the area); fovs = 4256-px tiles of the global frame (CosMx's FOV size),
  cell_ID numbered per FOV from 1 in x order. No metadata row for cell_ID 0, as in the exports.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("EXPKIT_SHARED_DATA", HERE.parents[3] / "shared" / "data"))
COSMX_PX_UM = 0.12028


def _read_h5(path: Path):
    with h5py.File(path, "r") as fh:
        g = fh["matrix"]
        shape = tuple(g["shape"][()])
        X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape)
        dec = lambda a: np.array([v.decode() for v in a[()]], dtype=object)  # noqa: E731
        return (X.T.tocsr(), dec(g["barcodes"]), dec(g["features/id"]), dec(g["features/name"]),
                dec(g["features/feature_type"]))


def _write_h5(path: Path, X_cells_x_genes, barcodes, ids, names) -> None:
    X = sp.csc_matrix(np.asarray(X_cells_x_genes, dtype=np.int32).T)  # genes x bins, CSC
    with h5py.File(path, "w") as fh:
        fh.attrs["filetype"] = "matrix"
        fh.attrs["software_version"] = "fixture (expkit tests/data/platforms/make_fixtures.py)"
        g = fh.create_group("matrix")
        g.create_dataset("data", data=X.data.astype(np.int32))
        g.create_dataset("indices", data=X.indices.astype(np.int64))
        g.create_dataset("indptr", data=X.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(X.shape, np.int32))
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        f = g.create_group("features")
        f.create_dataset("id", data=np.array(ids, dtype="S"))
        f.create_dataset("name", data=np.array(names, dtype="S"))
        f.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(ids), dtype="S"))
        f.create_dataset("genome", data=np.array(["GRCh38"] * len(ids), dtype="S"))


def make_visium_hd(out: Path) -> None:
    import matplotlib.image as mpimg

    X, bcs, ids, names, _ = _read_h5(SHARED / "dlpfc" / "151673" /
                                     "filtered_feature_bc_matrix_top5000genes.h5")
    spots = np.arange(100, 100 + 48 * 7, 7)  # 48 spots, every 7th from the 100th (file order)
    sub = X[spots]
    genes = np.sort(np.argsort(-np.asarray(sub.sum(axis=0)).ravel(), kind="stable")[:40])
    counts = sub[:, genes].toarray().astype(np.int64)  # 48 x 40
    ids, names = ids[genes], names[genes]
    mpp = 0.2738  # microns per full-resolution pixel (a typical Visium HD CytAssist value)
    lowres_scalef, hires_scalef = 0.1, 0.4
    x0, y0 = 1000.0, 800.0  # full-resolution pixel offset of array (0, 0)
    root = out / "visium_hd" / "outs" / "binned_outputs"
    lowres = mpimg.imread(SHARED / "dlpfc" / "151673" / "spatial" / "tissue_lowres_image.png")
    for size, factor, grid in ((8, 1, (10, 8)), (16, 2, (5, 4))):
        folder = root / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        step = size / mpp
        rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        barcodes = np.array([f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
        in_tissue = ((rows >= 1) & (rows < 1 + 8 // factor) & (cols >= 1) & (cols < 1 + 6 // factor))
        pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(int),
                            "array_row": rows, "array_col": cols,
                            "pxl_row_in_fullres": y0 + rows * step + step / 2,
                            "pxl_col_in_fullres": x0 + cols * step + step / 2})
        pos.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
        # the 48 spots fill the in-tissue 8 x 6 block of 8 um bins row by row; 16 um bins sum 2 x 2
        c8 = counts.reshape(8, 6, -1)
        if factor == 2:
            c = c8.reshape(4, 2, 3, 2, -1).sum(axis=(1, 3)).reshape(12, -1)
        else:
            c = c8.reshape(48, -1)
        _write_h5(folder / "filtered_feature_bc_matrix.h5", c, barcodes[in_tissue], ids, names)
        sf = {"spot_diameter_fullres": step, "bin_size_um": float(size), "microns_per_pixel": mpp,
              "regist_target_img_scalef": hires_scalef, "tissue_lowres_scalef": lowres_scalef,
              "fiducial_diameter_fullres": 1000.0 / mpp / 10, "tissue_hires_scalef": hires_scalef}
        with open(folder / "spatial" / "scalefactors_json.json", "w") as fh:
            json.dump(sf, fh, indent=4)
        # lowres image covering the grid: a crop of the real DLPFC lowres H&E
        w = int(np.ceil((x0 + grid[1] * step) * lowres_scalef)) + 10
        h = int(np.ceil((y0 + grid[0] * step) * lowres_scalef)) + 10
        crop = lowres[200:200 + h, 200:200 + w, :3]
        mpimg.imsave(folder / "spatial" / "tissue_lowres_image.png", np.ascontiguousarray(crop))


def _xenium():
    X, bcs, ids, names, types = _read_h5(SHARED / "xenium_mouse_brain" / "cell_feature_matrix.h5")
    cells = pd.read_csv(SHARED / "xenium_mouse_brain" / "cells.csv.gz", dtype={"cell_id": str})
    cells = cells.set_index("cell_id").loc[bcs]
    return X, bcs, names, types, cells


def _top_genes(X, rows, names, types, n):
    gex = np.flatnonzero(types == "Gene Expression")
    tot = np.asarray(X[rows][:, gex].sum(axis=0)).ravel()
    return np.sort(gex[np.argsort(-tot, kind="stable")[:n]])


def _top_features(X, types, kind, n):
    """The ``n`` features of type ``kind`` with most counts over the whole dataset (file order)."""
    idx = np.flatnonzero(types == kind)
    tot = np.asarray(X[:, idx].sum(axis=0)).ravel()
    return np.sort(idx[np.argsort(-tot, kind="stable")[:n]])


def make_merscope(out: Path) -> None:
    X, bcs, names, types, cells = _xenium()
    rows = np.arange(1000, 1042)  # cells 1001-1042 (2 of them only in the metadata)
    genes = _top_genes(X, rows[:40], names, types, 30)
    blanks = _top_features(X, types, "Blank Codeword", 5)
    folder = out / "merscope"
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{110883424764611924400221639916314000000 + int(b) * 7919}" for b in bcs[rows]]
    mat = pd.DataFrame(X[rows[:40]][:, genes].toarray().astype(int), columns=names[genes])
    for k, j in enumerate(blanks):
        mat[f"Blank-{k}"] = X[rows[:40]][:, [j]].toarray().ravel().astype(int)
    mat.insert(0, "cell", ids[:40])
    mat.to_csv(folder / "cell_by_gene.csv", index=False)
    c = cells.iloc[rows]
    half = np.sqrt(c["cell_area"].to_numpy()) / 2
    x, y = c["x_centroid"].to_numpy(), c["y_centroid"].to_numpy()
    meta = pd.DataFrame({"fov": (x > np.median(x)).astype(int), "volume": c["cell_area"].to_numpy() * 7,
                         "center_x": x, "center_y": y, "min_x": x - half, "max_x": x + half,
                         "min_y": y - half, "max_y": y + half}, index=pd.Index(ids, name=""))
    meta.iloc[::-1].to_csv(folder / "cell_metadata.csv")  # another order than the matrix


def make_cosmx(out: Path) -> None:
    X, bcs, names, types, cells = _xenium()
    rows = np.arange(2000, 2030)
    genes = _top_genes(X, rows, names, types, 30)
    neg = _top_features(X, types, "Negative Control Probe", 5)
    sysc = _top_features(X, types, "Negative Control Codeword", 3)
    c = cells.iloc[rows]
    gx = c["x_centroid"].to_numpy() / COSMX_PX_UM
    gy = c["y_centroid"].to_numpy() / COSMX_PX_UM
    fov_size = 4256
    fx, fy = np.floor(gx / fov_size), np.floor(gy / fov_size)
    tiles = sorted(set(zip(fx, fy)))
    fov = np.array([tiles.index(t) + 1 for t in zip(fx, fy)])
    order = np.lexsort((gx, fov))
    cell_id = np.zeros(len(rows), int)
    for f in np.unique(fov):
        idx = order[fov[order] == f]
        cell_id[idx] = np.arange(1, len(idx) + 1)
    cols = list(names[genes]) + [f"NegPrb{k + 1}" for k in range(len(neg))] + \
        [f"SystemControl{k + 1}" for k in range(len(sysc))]
    cnt = np.hstack([X[rows][:, genes].toarray(), X[rows][:, neg].toarray(), X[rows][:, sysc].toarray()])
    bg = np.asarray(X[2030:2040][:, np.r_[genes, neg, sysc]].sum(axis=0)).ravel()
    expr = pd.DataFrame(cnt.astype(int), columns=cols)
    expr.insert(0, "cell_ID", cell_id)
    expr.insert(0, "fov", fov)
    bgs = pd.DataFrame([bg.astype(int)] * len(np.unique(fov)), columns=cols)
    bgs.insert(0, "cell_ID", 0)
    bgs.insert(0, "fov", np.unique(fov))
    expr = pd.concat([expr, bgs]).sort_values(["fov", "cell_ID"], kind="stable")
    folder = out / "cosmx"
    folder.mkdir(parents=True, exist_ok=True)
    expr.to_csv(folder / "Fixture_exprMat_file.csv", index=False)
    area = c["cell_area"].to_numpy() / COSMX_PX_UM ** 2
    side = np.round(np.sqrt(area)).astype(int)
    ox = np.array([tiles[f - 1][0] * fov_size for f in fov])
    oy = np.array([tiles[f - 1][1] * fov_size for f in fov])
    meta = pd.DataFrame({"fov": fov, "cell_ID": cell_id, "Area": np.round(area).astype(int),
                         "AspectRatio": 1.0, "CenterX_local_px": np.round(gx - ox, 3),
                         "CenterY_local_px": np.round(gy - oy, 3), "CenterX_global_px": np.round(gx, 3),
                         "CenterY_global_px": np.round(gy, 3), "Width": side, "Height": side})
    meta.iloc[np.argsort(-gy, kind="stable")].to_csv(folder / "Fixture_metadata_file.csv", index=False)


def main() -> None:
    for name in ("visium_hd", "merscope", "cosmx"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    make_visium_hd(HERE)
    make_merscope(HERE)
    make_cosmx(HERE)


if __name__ == "__main__":
    main()
