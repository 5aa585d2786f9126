"""bins_to_cells on a rasterised Visium HD case built from the real Xenium mouse brain cells
(expkit.datasets.hd_case: real per-cell counts spread over the 2 um bins of known cells), and in an Experiment."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import expkit as ek
import expkit.io as eio
from expkit.errors import InputError, KeyNotFoundError, ResourceError
from expkit.io.images import ImageStore
from expkit.spatial.bins_to_cells import bins_to_cells

WINDOW = (3900.0, 2700.0, 4100.0, 2900.0)  # 200 x 200 um of the densest part of the section


@pytest.fixture(scope="module")
def case(shared_data, tmp_path_factory):
    from expkit.datasets.hd_case import rasterised_visium_hd

    out = tmp_path_factory.mktemp("hdcase")
    info = rasterised_visium_hd(out, xenium=shared_data / "xenium_mouse_brain", window_um=WINDOW,
                                label_um=0.2738, parquet=False)
    return info


def _bins(case):
    return eio.read_visium_hd(case["outs"], sample="hd", bin_size=2)


def _label_transform(case) -> np.ndarray:
    # the case's convention: label pixel = floor(full-res * s); expkit's: pixel k covers [k - 0.5, k + 0.5)
    s = case["labels_scalef"]
    return np.array([[s, 0, -0.5], [0, s, -0.5], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def store(case, tmp_path_factory):
    st = ImageStore(tmp_path_factory.mktemp("hdstore") / "images.h5")
    st.write("nuclei", np.load(case["labels"]), labels=True, transform=_label_transform(case))
    return st


def _truth(case, bins):
    t = pd.read_csv(case["truth"]).set_index("barcode").reindex(bins.obs["barcode"].to_numpy())
    return t["cell_id"].fillna(0).astype(np.int64).to_numpy()


def _predicted(bins, cells, key="cell", by="label"):
    pred = np.zeros(bins.n_obs, dtype=np.int64)
    hit = bins.obs[key].notna().to_numpy()
    names = bins.obs[key][hit].astype(str)
    pred[hit] = cells.obs.set_index("barcode").loc[names, by].astype(np.int64).to_numpy() if by else \
        names.astype(np.int64).to_numpy()
    return pred


def _share_right(bins, pred, true):
    cnt = np.asarray(bins.X.sum(axis=1)).ravel()
    return float(cnt[(pred == true) & (true > 0)].sum() / cnt[true > 0].sum())


@pytest.mark.parametrize("which, expand", [("cell_geojson", 0.0), ("nucleus_geojson", 2.0)])
def test_polygons_return_counts_to_their_cells(case, which, expand):
    bins = _bins(case)
    cells = bins_to_cells(bins, polygons=case[which], expand_um=expand)
    pred = _predicted(bins, cells, by=None)  # polygon ids are the Xenium cell ids
    share = _share_right(bins, pred, _truth(case, bins))
    assert share >= 0.99, share
    # provenance: the bins of each cell sum to its counts
    grouped = pd.Series(np.asarray(bins.X.sum(axis=1)).ravel()).groupby(bins.obs["cell"].to_numpy(), observed=True)
    sums = grouped.sum().reindex(cells.obs_names)
    np.testing.assert_allclose(sums.to_numpy(), np.asarray(cells.X.sum(axis=1)).ravel(), rtol=1e-5)
    assert (cells.obs["n_bins"].to_numpy() == bins.obs["cell"].value_counts().reindex(cells.obs_names).to_numpy()).all()
    assert cells.uns["bins_to_cells"]["share_counts_assigned"] > 0.9
    assert cells.uns["bins_to_cells"]["params"]["expand_um"] == expand


def test_label_image_and_tiling(case, store):
    bins = _bins(case)
    cells = bins_to_cells(bins, segmentation="nuclei", image_store=store, expand_um=2.0)
    true = _truth(case, bins)
    pred = _predicted(bins, cells)
    # a label image locates boundaries to a label pixel (0.27 um), the polygons exactly: slightly below them
    assert _share_right(bins, pred, true) >= 0.98
    how = bins.obs["cell.how"]
    assert set(how.cat.categories) == {"unassigned", "segmented", "expanded", "dropped"}
    assert (how[bins.obs["cell"].isna()].isin(["unassigned", "dropped"])).all()
    # tiles of 37 um (many tile edges through cells) give the same assignment as one tile
    small = _bins(case)
    cells_small = bins_to_cells(small, segmentation="nuclei", image_store=store, expand_um=2.0, tile_um=37.0)
    same = np.mean(_predicted(small, cells_small) == pred)
    assert same >= 0.999, same
    # centroids lie inside the window of the case (full-resolution pixels)
    xy = bins.obsm["spatial"]
    assert (cells.obsm["spatial"] >= xy.min(0) - 1).all() and (cells.obsm["spatial"] <= xy.max(0) + 1).all()


def test_min_bins_drops_small_cells(case):
    bins = _bins(case)
    cells = bins_to_cells(bins, polygons=case["cell_geojson"], expand_um=0.0, min_bins=20)
    assert (cells.obs["n_bins"] >= 20).all()
    assert (bins.obs["cell.how"] == "dropped").any()
    assert bins.obs["cell"][bins.obs["cell.how"] == "dropped"].isna().all()


def test_bad_inputs_name_the_problem_and_write_nothing(case, store):
    bins = _bins(case)
    before = set(bins.obs.columns)
    sf = bins.uns["spatial"]["hd"]["scalefactors"]
    with pytest.raises(InputError, match="exactly one of"):
        bins_to_cells(bins)
    with pytest.raises(KeyNotFoundError, match="no label image 'cells'"):
        bins_to_cells(bins, segmentation="cells", image_store=store)
    # polygons in microns read as pixels: refused with the transform that fits
    geo = json.loads(Path(case["cell_geojson"]).read_text())
    ring = np.asarray(geo["features"][0]["geometry"]["coordinates"][0])
    vertices = pd.DataFrame({"cell_id": np.repeat(np.arange(len(geo["features"])), [
        len(f["geometry"]["coordinates"][0]) for f in geo["features"]])})
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in geo["features"]])
    vertices["x"], vertices["y"] = xy[:, 0] * sf["microns_per_pixel"], xy[:, 1] * sf["microns_per_pixel"]
    assert ring.shape[1] == 2
    with pytest.raises(InputError, match="polygons_unit='um'"):
        bins_to_cells(bins, polygons=vertices)
    cells = bins_to_cells(bins.copy(), polygons=vertices, polygons_unit="um", expand_um=0.0)
    assert cells.n_obs == len(geo["features"]) or cells.n_obs > 0.95 * len(geo["features"])
    # the bin size must be known
    no_size = bins.copy()
    del no_size.uns["spatial"]["hd"]["scalefactors"]["bin_size_um"]
    no_size.uns["spatial"]["hd"]["metadata"].pop("bin_size_um", None)
    with pytest.raises(InputError, match="bin size is not known"):
        bins_to_cells(no_size, segmentation="nuclei", image_store=store)
    # a segmentation of another place: all bins outside -> error; partly outside -> warning with the share
    far = ImageStore(store.path.with_name("far.h5"))
    lab = np.load(case["labels"])
    t = _label_transform(case)
    far.write("nuclei", lab, labels=True, transform=t @ np.array([[1, 0, -1e6], [0, 1, 0], [0, 0, 1.0]]))
    with pytest.raises(InputError, match="no bin lies over"):
        bins_to_cells(bins, segmentation="nuclei", image_store=far)
    half = ImageStore(store.path.with_name("half.h5"))
    half.write("nuclei", lab[:, : lab.shape[1] // 2], labels=True, transform=t)
    with pytest.warns(UserWarning, match="of the bins lie outside"):
        bins_to_cells(bins.copy(), segmentation="nuclei", image_store=half)
    with pytest.raises(ResourceError, match="GiB"):
        bins_to_cells(bins, segmentation="nuclei", image_store=store, max_memory=1e-4)
    assert set(bins.obs.columns) == before


def test_in_an_experiment_cells_become_linked_samples(case, tmp_path):
    table = pd.DataFrame([dict(sample="hd", modality="spatial-bin", batch="b1", group="tumour", taxa="mmu",
                               location=str(case["outs"]), **{"reader.bin_size": "2"})])
    expm = ek.create_experiment(table, tmp_path / "e")
    store = expm.spatial_bin.image_store("hd")
    store.write("nuclei", np.load(case["labels"]), labels=True, transform=_label_transform(case))
    out = expm.spatial_bin.bins_to_cells(run_on_samples=True, segmentation="nuclei", expand_um=2.0, min_bins=3)
    cells = expm.spatial_cell["hd"]
    assert out["hd"] is cells and cells.obs_names[0].startswith("hd:")
    row = expm.samples.set_index(["modality", "sample"]).loc[("spatial-cell", "hd")]
    assert row["derived_from"] == "spatial-bin:hd" and row["group"] == "tumour" and row["batch"] == "b1"
    assert expm.spatial_cell.image_store("hd").path == store.path  # images shared, not copied
    expm.save()
    assert not (tmp_path / "e" / "images" / "spatial-cell").exists()
    again = ek.load_experiment(tmp_path / "e")
    cells2 = again.spatial_cell["hd"]
    assert cells2.n_obs == cells.n_obs and again.spatial_cell.image_store("hd").path == store.path
    assert again.spatial_bin["hd"].obs["cell"].notna().sum() == cells.obs["n_bins"].sum()
    assert cells2.uns["spatial"]["hd"]["images"] == {}  # on disk the images are the bins sample's only
    win = again.spatial_cell.get_image(run_on_samples=["hd"], channels="hires/r,g,b")["hd"]
    assert win.array.ndim == 3
    # running again replaces the derived sample; a same-named sample of other origin is refused
    again.spatial_bin.bins_to_cells(run_on_samples=["hd"], segmentation="nuclei", expand_um=0.0)
    assert again.spatial_cell["hd"].obs["n_bins_segmented"].equals(again.spatial_cell["hd"].obs["n_bins"])
    assert (again.samples["modality"] == "spatial-cell").sum() == 1
    again.remove_sample("hd", "spatial-cell")
    again.add_sample("hd", "spatial-cell", adata=cells2.copy(), taxa="mmu")
    with pytest.raises(InputError, match="not made from spatial-bin:hd"):
        again.spatial_bin.bins_to_cells(run_on_samples=["hd"], segmentation="nuclei")
