"""The rasterised Visium HD case built from the real Xenium mouse brain cells (expkit.datasets.hd_case)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from expkit.datasets.hd_case import rasterised_visium_hd
from expkit.errors import InputError
from expkit.io.visium_hd import read_visium_hd

WINDOW = (2000.0, 1500.0, 2300.0, 1800.0)  # ~300 cells of the Xenium section, microns


@pytest.fixture(scope="module")
def xenium(shared_data):
    path = shared_data / "xenium_mouse_brain"
    if not (path / "cell_feature_matrix.h5").is_file():
        pytest.skip(f"{path} lacks the Xenium files")
    return path


@pytest.fixture(scope="module")
def case(xenium, tmp_path_factory):
    out = tmp_path_factory.mktemp("hd_case")
    info = rasterised_visium_hd(out, xenium=xenium, window_um=WINDOW, seed=3)
    adata = read_visium_hd(info["outs"], sample="hd", bin_size=2)
    truth = pd.read_csv(info["truth"])
    return out, info, adata, truth


def _xenium_counts(xenium, ids):
    with h5py.File(xenium / "cell_feature_matrix.h5", "r") as fh:
        g = fh["matrix"]
        X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=tuple(g["shape"][()]))
        bcs = np.array([int(v) for v in g["barcodes"][()]])
        gex = np.array([v == b"Gene Expression" for v in g["features/feature_type"][()]])
    X = X.T.tocsr()[:, gex]
    pos = pd.Series(np.arange(len(bcs)), index=bcs)
    return X[pos.loc[ids].to_numpy()]


def _bins_um(adata, info):
    return adata.obsm["spatial"] * info["microns_per_pixel"] + np.array(info["image_origin_um"])


def test_reads_with_read_visium_hd(case):
    out, info, adata, truth = case
    assert adata.n_obs == info["n_bins_in_tissue"] == len(truth)
    assert adata.n_vars == 248
    assert (adata.obs_names.to_numpy() == truth["barcode"].to_numpy()).all()
    assert adata.obs_names[0].startswith("s_002um_") and adata.obs_names[0].endswith("-1")
    sf = adata.uns["spatial"]["hd"]["scalefactors"]
    assert sf["bin_size_um"] == 2.0 and sf["microns_per_pixel"] == pytest.approx(0.2738)
    assert set(adata.uns["spatial"]["hd"]["images"]) == {"hires", "lowres"}
    assert 200 < info["n_cells"] < 500
    pos = pd.read_csv(info["square"] / "spatial" / "tissue_positions.csv")
    assert list(pos.columns) == ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                                 "pxl_col_in_fullres"]
    assert len(pos) == info["n_bins_grid"] > adata.n_obs  # the grid lists out-of-tissue bins too
    # the grid is rotated against the image by rotation_deg: along a row, y drifts by tan(angle)
    row0 = pos[pos["array_row"] == pos["array_row"].min()].sort_values("array_col")
    slope = np.polyfit(row0["pxl_col_in_fullres"], row0["pxl_row_in_fullres"], 1)[0]
    assert np.degrees(np.arctan(slope)) == pytest.approx(0.3, abs=1e-6)


def test_true_bins_sum_to_the_xenium_counts(case, xenium):
    out, info, adata, truth = case
    cells = pd.read_csv(info["cells"])
    cid = truth["cell_id"].to_numpy()
    X = sp.csr_matrix(adata.X).astype(np.int64)
    ids = cells["cell_id"].to_numpy()
    col = pd.Series(np.arange(len(ids)), index=ids)
    has = cid > 0
    member = sp.csr_matrix((np.ones(has.sum()), (col.loc[cid[has]].to_numpy(), np.flatnonzero(has))),
                           shape=(len(ids), adata.n_obs))
    summed = (member @ X).toarray()
    real = _xenium_counts(xenium, ids).toarray()
    with_bins = cells["n_bins"].to_numpy() > 0
    assert with_bins.mean() > 0.99
    np.testing.assert_array_equal(summed[with_bins], real[with_bins])
    assert (summed[~with_bins] == 0).all()
    assert np.asarray(X.sum(axis=1)).ravel().tolist() == truth["counts"].tolist()
    bg = truth.loc[~has, "counts"]
    assert 0.1 < bg.mean() < 0.3 and (bg > 0).mean() < 0.3  # sparse background, Poisson(0.2)
    assert info["counts_total"] == int(X.sum())


def test_assignment_is_the_exact_nearest_boundary_rule(case):
    out, info, adata, truth = case
    cells = pd.read_csv(info["cells"])
    rng = np.random.default_rng(0)
    pick = rng.choice(adata.n_obs, size=4000, replace=False)
    p = _bins_um(adata, info)[pick]
    c = cells[["x_um", "y_um"]].to_numpy()
    d = np.hypot(p[:, None, 0] - c[None, :, 0], p[:, None, 1] - c[None, :, 1]) - \
        cells["nucleus_radius_um"].to_numpy()[None]
    best = d.argmin(axis=1)
    dmin = d[np.arange(len(p)), best]
    want = np.where(dmin <= info["expand_um"], cells["cell_id"].to_numpy()[best], 0)
    np.testing.assert_array_equal(truth["cell_id"].to_numpy()[pick], want)
    np.testing.assert_array_equal(truth["in_nucleus"].to_numpy()[pick], (dmin <= 0).astype(int))
    assert 0.1 < (want > 0).mean() < 0.6


def _polygons(path):
    with open(path) as fh:
        gj = json.load(fh)
    assert gj["type"] == "FeatureCollection"
    rings, ids = [], []
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = np.asarray(f["geometry"]["coordinates"][0], dtype=float)
        assert ring.shape[1] == 2 and (ring[0] == ring[-1]).all()
        rings.append(ring)
        ids.append(f["properties"]["cell_id"])
    return rings, np.asarray(ids)


def _inside(rings, ids, xy):
    from matplotlib.path import Path as MPath

    hit = np.zeros(len(xy), dtype=np.int64)
    for ring, cid in zip(rings, ids):  # test-side check, one polygon at a time
        lo, hi = ring.min(axis=0), ring.max(axis=0)
        sel = np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1))
        hit[sel[MPath(ring).contains_points(xy[sel])]] = cid
    return hit


def test_geojson_polygons_lie_over_their_bins(case):
    out, info, adata, truth = case
    xy = adata.obsm["spatial"]
    cid, nuc = truth["cell_id"].to_numpy(), truth["in_nucleus"].to_numpy() == 1
    rings, ids = _polygons(info["cell_geojson"])
    assert len(ids) == info["n_cell_polygons"] and len(set(ids.tolist())) == len(ids)
    hit = _inside(rings, ids, xy)
    assert (hit[cid > 0] == cid[cid > 0]).mean() > 0.99
    assert (hit[cid == 0] == 0).mean() > 0.999
    rings, ids = _polygons(info["nucleus_geojson"])
    hit = _inside(rings, ids, xy)
    assert (hit[nuc] == cid[nuc]).mean() > 0.98
    assert (hit[~nuc] == 0).mean() > 0.995


def test_label_image_labels_the_nucleus_bins(case):
    out, info, adata, truth = case
    lab = np.load(out / "nuclei_labels.npy")
    meta = json.loads((out / "nuclei_labels.json").read_text())
    assert lab.dtype == np.uint32 and list(lab.shape) == meta["shape"]
    s = meta["labels_scalef"]
    assert s == pytest.approx(0.2738 / 0.5)
    xy = adata.obsm["spatial"]
    got = lab[np.floor(xy[:, 1] * s).astype(int), np.floor(xy[:, 0] * s).astype(int)]
    cid, nuc = truth["cell_id"].to_numpy(), truth["in_nucleus"].to_numpy() == 1
    assert (got[nuc] == cid[nuc]).mean() > 0.95
    assert (got[cid == 0] == 0).mean() > 0.999
    cells = pd.read_csv(info["cells"])
    assert set(np.unique(lab).tolist()) <= set(cells["cell_id"].tolist()) | {0}
    # area of each label ~ its nucleus disk
    area = np.bincount(lab.ravel())[cells["cell_id"].to_numpy()] * 0.25
    disk = np.pi * cells["nucleus_radius_um"].to_numpy() ** 2
    alone = cells["n_nucleus_bins"].to_numpy() > 0
    assert np.median(area[alone] / disk[alone]) == pytest.approx(1.0, abs=0.05)


def _arrays(out):
    sq = out / "outs" / "binned_outputs" / "square_002um"
    with h5py.File(sq / "filtered_feature_bc_matrix.h5", "r") as fh:
        m = [fh["matrix"][k][()] for k in ("data", "indices", "indptr", "barcodes")]
    return m + [np.load(out / "nuclei_labels.npy"), pd.read_csv(out / "truth.csv.gz").to_numpy(),
                (out / "outs" / "segmented_outputs" / "cell_segmentations.geojson").read_bytes(),
                (sq / "spatial" / "tissue_positions.csv").read_bytes(),
                (sq / "spatial" / "tissue_lowres_image.png").read_bytes()]


def test_same_seed_same_files(xenium, tmp_path):
    win = (2000.0, 1500.0, 2120.0, 1620.0)
    a = rasterised_visium_hd(tmp_path / "a", xenium=xenium, window_um=win, seed=7)
    rasterised_visium_hd(tmp_path / "b", xenium=xenium, window_um=win, seed=7)
    rasterised_visium_hd(tmp_path / "c", xenium=xenium, window_um=win, seed=8)
    A, B, C = _arrays(tmp_path / "a"), _arrays(tmp_path / "b"), _arrays(tmp_path / "c")
    for x, y in zip(A, B):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
    assert not np.array_equal(A[0], C[0])  # other seed: other multinomial draws
    assert np.array_equal(A[4], C[4]) and A[6] == C[6]  # same geometry
    assert a["n_cells"] > 20


def test_bad_input(xenium, tmp_path):
    with pytest.raises(InputError, match="no Xenium cell"):
        rasterised_visium_hd(tmp_path, xenium=xenium, window_um=(0, 0, 10, 10))
    with pytest.raises(InputError, match="bin_um"):
        rasterised_visium_hd(tmp_path, xenium=xenium, bin_um=3)
    with pytest.raises(InputError, match="not found"):
        rasterised_visium_hd(tmp_path, xenium=tmp_path / "nowhere")
    assert not any(tmp_path.iterdir())
