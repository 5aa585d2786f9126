"""SpaGCN spatial domains on the real DLPFC sections, against the manual layers and SpaGCN 1.2.7's own results
(reference files in ../shared/reference, protocol in its README)."""
import numpy as np
import pandas as pd
import pytest

from _layers import ari, read_dlpfc_layers
from expkit.errors import InputError, KeyNotFoundError
from expkit.kernels import gcn

SECTIONS = ("151673", "151674")
# SpaGCN 1.2.7, refined ARI vs the manual layers (reference README; seed 100 = SpaGCN's tutorial seed)
REF_ARI = {"151673": 0.497, "151674": 0.436}


def spagcn_protocol(adata):
    """The reference's preprocessing (SpaGCN tutorial): genes in >= 3 spots, no ERCC/MT- genes, counts scaled
    to the median total per spot, log1p, in layers['lognorm']."""
    import scipy.sparse as sp

    sym = adata.var["gene_symbols"].astype(str) if "gene_symbols" in adata.var else adata.var_names.to_series()
    n_cells = np.asarray((adata.X > 0).sum(0)).ravel()
    keep = (n_cells >= 3) & ~sym.str.startswith("ERCC").to_numpy() & ~sym.str.startswith("MT-").to_numpy()
    adata = adata[:, keep].copy()
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    tot = np.asarray(x.sum(1)).ravel()
    x = sp.diags((np.median(tot) / np.maximum(tot, 1)).astype(np.float32)) @ x
    x.data = np.log1p(x.data)
    adata.layers["lognorm"] = x.tocsr()
    return adata


def _read(shared_data, sid):
    adata, truth = read_dlpfc_layers(shared_data, sid)
    return spagcn_protocol(adata), truth


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    return {sid: _read(shared_data, sid) for sid in SECTIONS}



def _reference(shared_reference, sid, seed, adata):
    path = shared_reference / f"spagcn_{sid}_seed{seed}.tsv.gz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return pd.read_csv(path, sep="\t").set_index("barcode").loc[adata.obs["barcode"].to_numpy()]


@pytest.mark.parametrize("sid,seed", [("151673", 0), ("151673", 100), ("151674", 100)])
def test_refine_reproduces_spagcn(dlpfc, shared_reference, sid, seed):
    from expkit.spatial.domains import refine_domains

    adata, _ = dlpfc[sid]
    ref = _reference(shared_reference, sid, seed, adata)
    ours = refine_domains(ref["pred"].to_numpy(), adata.obsm["spatial.array"], "hexagon")
    agree = np.mean(ours == ref["refined_pred"].to_numpy())
    changed_by_spagcn = np.mean(ref["pred"].to_numpy() != ref["refined_pred"].to_numpy())
    # SpaGCN sorts array-coordinate distances with an unstable sort: 4 spots tie at distance 2 and it keeps
    # 2 of them; we use the 6 true hexagon neighbours. The rule itself is the same.
    assert agree > 0.98, (agree, changed_by_spagcn)
    assert np.isclose(ari(ref["truth"].to_numpy(), ours), ari(ref["truth"].to_numpy(), ref["refined_pred"]),
                      atol=0.01)


def test_refine_rule_small():
    # a row of a square grid: the middle spot is outvoted by all 4 neighbours (3 voting spots > 4/2)
    rc = np.array([[0, 0], [0, 1], [0, 2], [1, 1], [-1, 1]], dtype=float)
    nb = gcn.grid_neighbours(rc, "square")
    assert (nb[:, 0] == np.arange(5)).all()
    out = gcn.refine_labels(np.array([1, 0, 1, 1, 1]), nb)
    assert out[1] == 1 and (out[[0, 2, 3, 4]] == 1).all()
    with pytest.raises(InputError):
        gcn.grid_neighbours(rc, "circle")


def test_search_l_matches_spagcn(dlpfc):
    adata, _ = dlpfc["151673"]
    # SpaGCN: calculate_adj_matrix(pxl_row, pxl_col) + search_l(0.5, adj, start=0.01, end=1000, tol=0.01)
    l = gcn.search_l(gcn.PairDistances(adata.obsm["spatial"]), 0.5)
    assert abs(l - 62.0) < 0.5
    pairs = gcn.PairDistances(adata.obsm["spatial"])
    # the truncated sum equals the dense definition mean_i sum_j exp(-d^2 / 2 l^2) - 1
    xy = adata.obsm["spatial"][:500]
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    dense = np.exp(-d2 / (2 * l * l)).sum(1).mean() - 1
    sub = gcn.PairDistances(xy)
    sub.grow(gcn.TRUNC * l)
    assert np.isclose(sub.p(l), dense, rtol=1e-5)
    a = gcn.gaussian_adjacency(pairs, l)
    assert np.isclose(a.sum(1).mean() - 1, 0.5, atol=0.011)


@pytest.mark.parametrize("sid", SECTIONS)
def test_domains_ari_vs_reference(dlpfc, sid):
    from expkit.spatial import spatial_detect_domains_spagcn

    adata, truth = dlpfc[sid]
    ad = adata.copy()
    out = spatial_detect_domains_spagcn(ad, seed=0)
    assert out["n_domains"] == 7
    assert ad.obs["spagcn.domain"].dtype == "category"
    assert list(ad.obs["spagcn.refined"].cat.categories) == [str(i) for i in range(7)]
    assert ad.uns["spagcn"]["params"]["seed"] == 0 and "version" in ad.uns["spagcn"]
    assert abs(ad.uns["spagcn"]["l"] - 62.0) < 0.5
    raw, refined = ari(truth, ad.obs["spagcn.domain"]), ari(truth, ad.obs["spagcn.refined"])
    print(f"{sid} seed 0: ARI raw {raw:.3f} refined {refined:.3f} (SpaGCN seed 100: {REF_ARI[sid]})")
    assert refined >= REF_ARI[sid] - 0.02  # seeds 0-4 in benchmarks/domains.py: median above the reference
    if sid == "151673":  # same seed, same labels
        again = adata.copy()
        spatial_detect_domains_spagcn(again, seed=0)
        assert (again.obs["spagcn.domain"] == ad.obs["spagcn.domain"]).all()
        assert (again.obs["spagcn.refined"] == ad.obs["spagcn.refined"]).all()
        np.testing.assert_array_equal(again.obsm["spagcn.domain.prob"], ad.obsm["spagcn.domain.prob"])


def test_domains_kmeans_histology_and_keys(dlpfc, tmp_path):
    from expkit.spatial import spatial_detect_domains_spagcn

    adata, truth = dlpfc["151673"]
    ad = adata.copy()
    out = spatial_detect_domains_spagcn(ad, histology=True, init="kmeans", refine_shape=None, max_epochs=50,
                                        seed=1, key_added="dom")
    assert "dom" in ad.obs and "spagcn.refined" not in ad.obs
    assert out["n_domains"] == 7 and out["l"] > 62.5  # the colour axis spreads the spots: a larger l
    z = __import__("expkit.spatial.domains", fromlist=["x"]).histology_coordinate(ad)
    assert np.isfinite(z).all() and z.std() > 0
    assert ari(truth, ad.obs["dom"]) > 0.2
    del ad.uns["spatial"]  # the results round-trip through h5ad
    ad.write_h5ad(tmp_path / "d.h5ad")
    back = __import__("anndata").read_h5ad(tmp_path / "d.h5ad")
    assert back.uns["spagcn"]["l"] == out["l"] and (back.obs["dom"] == ad.obs["dom"]).all()


def test_domains_bad_input(dlpfc):
    from expkit.spatial import spatial_detect_domains_spagcn

    adata, _ = dlpfc["151673"]
    small = adata[:300].copy()
    with pytest.raises(InputError):
        spatial_detect_domains_spagcn(small, init="dbscan")
    with pytest.raises(KeyNotFoundError):
        spatial_detect_domains_spagcn(small, layer="nope")
    del small.obsm["spatial"]
    with pytest.raises(KeyNotFoundError):
        spatial_detect_domains_spagcn(small)


def test_integrate_two_sections(dlpfc):
    from expkit.spatial import integrate_domains_spagcn

    data = {sid: dlpfc[sid][0].copy() for sid in SECTIONS}
    out = integrate_domains_spagcn(data, n_clusters=7, max_epochs=200, seed=100)
    aris = {}
    for sid in SECTIONS:
        ad = data[sid]
        assert abs(out[sid]["l"] - 62.0) < 1.0
        assert list(ad.obs["integrated"].cat.categories) == [str(i) for i in range(7)]
        aris[sid] = ari(dlpfc[sid][1], ad.obs["integrated.refined"])
    print("integrated ARI per section:", aris)
    assert min(aris.values()) > 0.35
    # labels mean the same in both sections: white matter (WM) is one domain in each
    wm = [pd.Series(np.asarray(data[s].obs["integrated"])[dlpfc[s][1] == "WM"]).mode()[0] for s in SECTIONS]
    assert wm[0] == wm[1]


def test_domain_markers_and_metagene(dlpfc):
    from expkit.spatial.domain_markers import spatial_markers_spagcn, spatial_metagene
    from expkit.tl import get_markers

    adata, truth = dlpfc["151673"]
    ok = pd.notna(truth)
    ad = adata[ok].copy()
    ad.obs["layer"] = pd.Categorical(truth[ok])
    ad.var["gene"] = ad.var["gene_symbols"].astype(str)
    out = spatial_markers_spagcn(ad, domain_key="layer", targets=["WM", "L1"])
    nb = ad.uns["spagcn.markers"]["neighbours"]
    assert "L6" in list(nb["WM"]) and "WM" not in list(nb["WM"])
    wm = set(out.loc[out["group"] == "WM", "gene"])
    assert {"MBP", "PLP1"} & wm, sorted(wm)[:20]
    tab = get_markers(ad, slot="spagcn.markers", group_name="WM", max_q=0.05)
    assert len(tab) >= len(wm) and tab["score"].is_monotonic_decreasing
    meta = spatial_metagene(ad, target="L1", start_gene="AQP4", domain_key="layer", max_iter=2)
    assert meta["name"].startswith("AQP4") and "spagcn.metagene" in ad.obs
    v = ad.obs["spagcn.metagene"].to_numpy()
    assert v.min() >= 0 and v[ad.obs["layer"] == "L1"].mean() > v[ad.obs["layer"] != "L1"].mean()


@pytest.mark.gpu
def test_domains_gpu_close_to_cpu(dlpfc):
    from expkit.spatial import spatial_detect_domains_spagcn

    adata, truth = dlpfc["151673"]
    ad = adata.copy()
    out = spatial_detect_domains_spagcn(ad, seed=0, use_gpu=True)
    assert out["n_domains"] == 7
    assert ari(truth, ad.obs["spagcn.refined"]) >= REF_ARI["151673"] - 0.05


def test_through_the_dispatcher(tmp_path):
    """The registry lines (kind "sample" and "joint") work through the modality dispatcher, with the
    experiment's image store for the histology coordinate."""
    import expkit as ek
    from expkit.experiment import dispatch
    from expkit.spatial import integrate_domains_spagcn, spatial_detect_domains_spagcn

    ek.settings.progress = False
    expm = ek.create_experiment(ek.datasets.dlpfc_demo(), tmp_path / "demo")
    m = expm.spatial_bin
    out = dispatch.run(m, spatial_detect_domains_spagcn, True, kind="sample", n_clusters=5, histology=True,
                       max_epochs=30, seed=0)
    assert set(out) == {"151673", "151674"} and all(r["n_domains"] == 5 for r in out.values())
    assert "spagcn.refined" in m["151674"].obs
    res = dispatch.run(m, integrate_domains_spagcn, True, kind="joint", n_clusters=5, max_epochs=30)
    assert set(res) == {"151673", "151674"}
    assert list(m["151673"].obs["integrated"].cat.categories) == list(m["151674"].obs["integrated"].cat.categories)


def test_shared_genes_order_and_scale():
    """The genes every sample has, in the first sample's order, found in linear time (a set per sample:
    rebuilding it per gene took ~35 s per sample at 13,000 genes, the Stahl breast cancer sections)."""
    import time

    import anndata as ad

    from expkit.spatial.domains import _shared_genes

    def make(names):
        return ad.AnnData(np.zeros((2, len(names)), dtype=np.float32), var=pd.DataFrame(index=names))

    assert _shared_genes([make(["c", "a", "b"]), make(["b", "c", "d"]), make(["a", "b", "c"])]) == ["c", "b"]
    assert _shared_genes([make(["a", "b"])]) == ["a", "b"]
    many = [f"g{i}" for i in range(20000)]
    t0 = time.perf_counter()
    shared = _shared_genes([make(many), make(many[::-1]), make(many[1:])])
    assert shared == many[1:]
    assert time.perf_counter() - t0 < 5.0  # the quadratic version takes minutes
