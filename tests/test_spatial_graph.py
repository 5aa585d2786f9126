"""spatial_neighbors / spatial_components on real data (DLPFC Visium, Xenium mouse brain)."""
from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components, shortest_path

from _spatial_data import read_dlpfc, read_xenium
from expkit.errors import InputError, KeyNotFoundError, ResourceError
from expkit.kernels import spatial_graph as K
from expkit.spatial.graph import spatial_components, spatial_neighbors

REF = Path(__file__).resolve().parent / "data" / "squidpy_ref"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    return read_dlpfc(shared_data, "151673")


@pytest.fixture(scope="module")
def xenium(shared_data):
    return read_xenium(shared_data)


def _lattice_interior(array_rc: np.ndarray) -> np.ndarray:
    """Spots whose 6 hexagonal lattice neighbours are all present (brute force over positions)."""
    present = {(int(r), int(c)) for r, c in array_rc}
    return np.array([all((r + dr, c + dc) in present for dr, dc in K.HEX_OFFSETS) for r, c in array_rc])


def test_hex_grid_degrees(dlpfc):
    a = dlpfc.copy()
    summary = spatial_neighbors(a, coord_type="grid", n_neighs=6)
    assert summary["grid_source"] == "array"
    g = a.obsp["spatial.connectivities"]
    assert sp.isspmatrix_csr(g) and g.dtype == np.float32
    assert set(np.unique(g.data)) == {1.0}
    assert g.diagonal().sum() == 0
    assert (g != g.T).nnz == 0  # the hexagonal lattice graph is symmetric
    deg = np.diff(g.indptr)
    interior = _lattice_interior(a.obsm["spatial.array"])
    assert interior.sum() > 3000
    assert np.all(deg[interior] == 6)
    assert np.all(deg[~interior] < 6) and deg.max() == 6
    # every edge joins lattice neighbours: |drow| = 1 and |dcol| = 1, or drow = 0 and |dcol| = 2
    coo = g.tocoo()
    arr = a.obsm["spatial.array"]
    dr = np.abs(arr[coo.row, 0] - arr[coo.col, 0])
    dc = np.abs(arr[coo.row, 1] - arr[coo.col, 1])
    assert np.all(((dr == 1) & (dc == 1)) | ((dr == 0) & (dc == 2)))
    d = a.obsp["spatial.distances"]
    assert (d != g).nnz == 0  # grid distances are ring numbers (1 for the first ring), like squidpy
    nb = a.uns["spatial.neighbors"]
    assert nb["connectivities_key"] == "spatial.connectivities"
    assert nb["params"]["coord_type"] == "grid" and nb["params"]["n_neighs"] == 6


@pytest.mark.parametrize("n_rings", [1, 2, 3])
def test_grid_from_array_equals_grid_from_pixels(dlpfc, n_rings):
    a = dlpfc.copy()
    spatial_neighbors(a, coord_type="grid", n_rings=n_rings, grid_source="array")
    ga, da = a.obsp["spatial.connectivities"].copy(), a.obsp["spatial.distances"].copy()
    spatial_neighbors(a, coord_type="grid", n_rings=n_rings, grid_source="coords")
    assert a.uns["spatial.neighbors"]["params"]["grid_source"] == "coords"
    assert (a.obsp["spatial.connectivities"] != ga).nnz == 0
    assert (a.obsp["spatial.distances"] != da).nnz == 0


def test_rings_are_graph_distances(dlpfc):
    a = dlpfc.copy()
    spatial_neighbors(a, coord_type="grid", n_rings=1)
    g1 = a.obsp["spatial.connectivities"]
    spatial_neighbors(a, coord_type="grid", n_rings=3)
    d3 = a.obsp["spatial.distances"]
    src = np.arange(0, a.n_obs, 97)
    sp_d = shortest_path(g1, unweighted=True, indices=src)
    expect = np.where((sp_d >= 1) & (sp_d <= 3), sp_d, 0)
    assert np.array_equal(d3[src].toarray(), expect)
    interior_deg = np.bincount(np.diff(a.obsp["spatial.connectivities"].indptr))
    assert interior_deg.nonzero()[0].max() == 36  # 6 + 12 + 18 lattice spots within 3 rings


def test_auto_coord_type_and_set_diag(dlpfc):
    a = dlpfc.copy()
    assert spatial_neighbors(a)["coord_type"] == "grid"
    b = ad.AnnData(obs=a.obs.copy())
    b.obsm["spatial"] = a.obsm["spatial"]
    assert spatial_neighbors(b, n_neighs=4)["coord_type"] == "generic"
    assert np.all(np.diff(b.obsp["spatial.connectivities"].indptr) == 4)
    spatial_neighbors(a, set_diag=True, key_added="sd")
    g = a.obsp["sd.connectivities"]
    assert np.all(g.diagonal() == 1) and a.obsp["sd.distances"].diagonal().sum() == 0
    with pytest.raises(InputError):
        spatial_neighbors(a, coord_type="grid", radius=100.0)
    with pytest.raises(KeyNotFoundError):
        spatial_neighbors(b, coord_type="grid", grid_source="array")


def test_generic_knn_xenium(xenium):
    a = xenium.copy()
    t = time.perf_counter()
    spatial_neighbors(a, coord_type="generic", n_neighs=10)
    elapsed = time.perf_counter() - t
    assert elapsed < 60  # a few tenths of a second on an idle core
    g, d = a.obsp["spatial.connectivities"], a.obsp["spatial.distances"]
    assert np.all(np.diff(g.indptr) == 10)
    assert g.diagonal().sum() == 0
    # exactness against chunked brute force on a subset (CPU brute-force kernel, float64)
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(a.n_obs, 3000, replace=False))
    c = a.obsm["spatial"][sub]
    i_kd, d_kd = K.knn(c, 10, CPU)
    i_bf, d_bf = K.knn(c, 10, CPU, method="brute", chunk_bytes=1 << 22)
    np.testing.assert_allclose(d_kd, d_bf, rtol=0, atol=1e-9)
    full = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(np.sort(full, axis=1)[:, :10], d_kd, atol=1e-9)
    # distances in the matrix are the Euclidean lengths of the edges
    coo = d.tocoo()
    xy = a.obsm["spatial"]
    np.testing.assert_allclose(coo.data, np.linalg.norm(xy[coo.row] - xy[coo.col], axis=1), rtol=1e-12)


def test_radius_graph_vs_brute_force(xenium):
    rng = np.random.default_rng(1)
    sub = np.sort(rng.choice(xenium.n_obs, 2500, replace=False))
    a = xenium[sub].copy()
    c = a.obsm["spatial"]
    full = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    for radius, lo, hi in ((60.0, 0.0, 60.0), ((25.0, 80.0), 25.0, 80.0)):
        spatial_neighbors(a, coord_type="generic", radius=radius)
        expect = sp.csr_matrix((full <= hi) & (full >= lo))
        got = a.obsp["spatial.connectivities"]
        assert (got.astype(bool) != expect).nnz == 0
        dd = a.obsp["spatial.distances"].tocoo()
        np.testing.assert_allclose(dd.data, full[dd.row, dd.col], rtol=1e-12)
    r_kd = K.radius_edges(c, 60.0, CPU)
    r_bf = K.radius_edges(c, 60.0, CPU, method="brute", chunk_bytes=1 << 20)
    assert np.array_equal(r_kd[0], r_bf[0]) and np.array_equal(r_kd[1], r_bf[1])
    np.testing.assert_allclose(r_kd[2], r_bf[2], atol=1e-9)


def test_radius_graph_too_large_raises_before_building(xenium):
    with pytest.raises(ResourceError):
        K.radius_edges(xenium.obsm["spatial"], 5000.0, CPU, max_bytes=1 << 30)


def test_radius_graph_full_xenium_vs_squidpy(xenium):
    f = REF / "xenium_radius20_degree.tsv.gz"
    if not f.exists():
        pytest.skip("squidpy radius fixture missing (tests/reference/make_squidpy_refs.py)")
    a = xenium.copy()
    t = time.perf_counter()
    spatial_neighbors(a, radius=20.0)
    assert time.perf_counter() - t < 60
    ref = pd.read_csv(f, sep="\t", dtype={"barcode": str})
    assert list(ref["barcode"]) == list(a.obs["barcode"])
    assert np.array_equal(np.diff(a.obsp["spatial.connectivities"].indptr), ref["degree"].to_numpy())


def _two_sections(shared_data):
    a, b = read_dlpfc(shared_data, "151673"), read_dlpfc(shared_data, "151674")
    genes = a.var_names.intersection(b.var_names)
    m = ad.concat([a[:, genes], b[:, genes]], merge="same")
    m.obs["sample"] = pd.Categorical(m.obs["sample"])
    return a, b, m


@pytest.mark.parametrize("kind", ["grid", "knn", "radius"])
def test_library_key_block_diagonal(shared_data, kind):
    a, b, m = _two_sections(shared_data)
    kw = {"grid": dict(coord_type="grid"), "knn": dict(coord_type="generic", n_neighs=8),
          "radius": dict(coord_type="generic", radius=300.0)}[kind]
    spatial_neighbors(m, library_key="sample", **kw)
    g = m.obsp["spatial.connectivities"].tocoo()
    lib = m.obs["sample"].to_numpy()
    assert g.nnz > 0 and np.all(lib[g.row] == lib[g.col])
    na = a.n_obs
    for part, lo, hi in ((a, 0, na), (b, na, m.n_obs)):  # each block is the per-sample graph
        spatial_neighbors(part, **kw)
        blk = m.obsp["spatial.connectivities"][lo:hi, lo:hi]
        assert (blk != part.obsp["spatial.connectivities"]).nnz == 0
        blk_d = m.obsp["spatial.distances"][lo:hi, lo:hi]
        assert abs(blk_d - part.obsp["spatial.distances"]).max() < 1e-12
    # library_key=None uses obs["sample"] of a merged AnnData by default
    spatial_neighbors(m, **kw)
    assert m.uns["spatial.neighbors"]["params"]["library_key"] == "sample"
    assert (m.obsp["spatial.connectivities"] != g.tocsr()).nnz == 0
    if kind != "grid":  # the two sections overlap in pixel space: in one library edges cross
        spatial_neighbors(m, library_key=False, **kw)
        g2 = m.obsp["spatial.connectivities"].tocoo()
        assert np.any(lib[g2.row] != lib[g2.col])
    with pytest.raises(KeyNotFoundError):
        spatial_neighbors(m, library_key="nope", **kw)


def test_components_and_islands(dlpfc):
    a = dlpfc.copy()
    spatial_neighbors(a)
    tab = spatial_components(a, min_cells=10)
    g = a.obsp["spatial.connectivities"]
    n_comp, labels = connected_components(g, directed=False)
    assert len(tab) == n_comp and tab["n_obs"].sum() == a.n_obs
    assert list(tab["n_obs"]) == sorted(np.bincount(labels), reverse=True)
    region = a.obs["spatial.region"]
    assert isinstance(region.dtype, pd.CategoricalDtype)
    assert region.value_counts()["0"] == tab["n_obs"].iloc[0] and tab["n_obs"].iloc[0] > 3000
    # same partition as scipy's
    assert pd.crosstab(region.to_numpy(), labels).astype(bool).sum(axis=1).eq(1).all()
    island = a.obs["spatial.island"].to_numpy()
    assert island.dtype == bool
    sizes = region.map(region.value_counts()).astype(int).to_numpy()
    assert np.array_equal(island, sizes < 10)
    assert island.sum() > 0 and island.sum() < 50
    assert a.uns["spatial.components"]["n_components"] == n_comp
    # no edge leaves a region
    coo = g.tocoo()
    assert np.all(region.to_numpy()[coo.row] == region.to_numpy()[coo.col])
    with pytest.raises(KeyNotFoundError):
        spatial_components(a, key_added="absent")


def test_h5ad_roundtrip(dlpfc, tmp_path):
    a = dlpfc.copy()
    spatial_neighbors(a, n_rings=2)
    spatial_components(a)
    a.write_h5ad(tmp_path / "g.h5ad")
    b = ad.read_h5ad(tmp_path / "g.h5ad")
    assert (b.obsp["spatial.connectivities"] != a.obsp["spatial.connectivities"]).nnz == 0
    assert b.uns["spatial.neighbors"]["params"]["n_rings"] == 2
    assert b.obs["spatial.region"].equals(a.obs["spatial.region"])


@pytest.mark.gpu
def test_cpu_vs_cuda_graphs(xenium, dlpfc):
    c = xenium.obsm["spatial"]
    i_c, d_c = K.knn(c, 10, CPU)
    i_g, d_g = K.knn(c, 10, torch.device("cuda"))
    np.testing.assert_allclose(d_c, d_g, atol=1e-9)
    assert (i_c != i_g).mean() < 1e-3  # ties may be ordered differently
    r_c = K.radius_edges(c, 20.0, CPU)
    r_g = K.radius_edges(c, 20.0, torch.device("cuda"))
    assert np.array_equal(r_c[0], r_g[0]) and np.array_equal(r_c[1], r_g[1])
    a, b = dlpfc.copy(), dlpfc.copy()
    spatial_neighbors(a, grid_source="coords")
    spatial_neighbors(b, grid_source="coords", use_gpu=True)
    assert (a.obsp["spatial.connectivities"] != b.obsp["spatial.connectivities"]).nnz == 0
