"""Methods lifted onto the modality run per sample and on the integrated data (the demo sections)."""
from __future__ import annotations

import numpy as np
import pytest

import expkit as ek


@pytest.fixture(scope="module")
def expm(tmp_path_factory):
    ek.settings.progress = False
    return ek.create_experiment(ek.datasets.dlpfc_demo(), tmp_path_factory.mktemp("wf") / "demo")


def test_per_sample_chain(expm):
    m = expm.spatial_bin
    m.qc(run_on_samples=True)
    out = m.filter(run_on_samples=True, min_counts=200, min_cells=3)
    assert set(out) == {"151673", "151674"}
    assert m["151673"].n_obs <= 1207 and "filter" in m["151673"].uns
    m.log_normalize(run_on_samples=True)
    m.select_hvg(run_on_samples=True, n_top_genes=1000)
    m.scale_pca(run_on_samples=True, n_comps=20)
    m.spatial_neighbors(run_on_samples=True)
    res = m.spatial_autocorr(run_on_samples=["151673"], mode="moran")
    a = m["151673"]
    for key in ("counts", "norm", "lognorm"):
        assert key in a.layers
    assert a.obsm["pca"].shape == (a.n_obs, 20) and "vst.hvg" in a.var
    assert "spatial.connectivities" in a.obsp
    assert "moranI" in a.uns and "151673" in res
    # graphs never cross samples
    deg = np.asarray(a.obsp["spatial.connectivities"].sum(axis=1)).ravel()
    assert deg.max() <= 6
    top = a.uns["moranI"].index[0]
    assert a.uns["moranI"].loc[top, "I"] > 0.3


def test_integrated_and_markers(expm, tmp_path):
    m = expm.spatial_bin
    if "lognorm" not in m["151673"].layers:
        test_per_sample_chain(expm)
    truth = {s: ek.datasets.dlpfc_demo_truth(s) for s in m.samples}
    for s in m.samples:
        a = m[s]
        a.obs["layer"] = truth[s].reindex(a.obs["barcode"]).to_numpy()
    m.markers(run_on_samples=["151673"], groupby="layer")
    table = m.get_markers(run_on_samples=["151673"], slot="markers", group_name="WM", max_q=0.05)["151673"]
    assert {"gene", "pct.in", "pct.out", "fc", "p", "q", "log10.q"} <= set(table.columns)
    assert "MBP" in set(table["gene"].head(50))  # the white-matter marker
    md = expm.merge(join="inner")
    integ = md["spatial-bin"]
    assert integ.n_obs == m["151673"].n_obs + m["151674"].n_obs
    m.log_normalize(run_on_samples=None)
    m.select_hvg(run_on_samples=None, batch_key="batch", n_top_genes=800)
    m.scale_pca(run_on_samples=None, n_comps=15)
    m.spatial_neighbors(run_on_samples=None)
    g = m.integrated.obsp["spatial.connectivities"].tocoo()
    samples = m.integrated.obs["sample"].to_numpy()
    assert (samples[g.row] == samples[g.col]).all(), "the spatial graph links spots across slides"
    m.integrate(run_on_samples=None, batch_key="batch", seed=0)
    assert "pca.harmony" in m.integrated.obsm
    m.knn(run_on_samples=None, use_rep="pca.harmony", n_neighbors=15)
    m.leiden(run_on_samples=None, resolution=0.5, seed=0)
    m.umap(run_on_samples=None, seed=0, n_epochs=100)
    integ = m.integrated
    assert integ.obsm["knn"].shape == (integ.n_obs, 15) and integ.obsm["umap"].shape == (integ.n_obs, 2)
    counts = integ.obs.groupby(["leiden", "sample"], observed=False).size().unstack()
    assert (counts > 0).all(axis=1).mean() > 0.5, "harmony-corrected clusters should span both sections"
    expm.save()
    again = ek.load_experiment(expm.path)
    assert "pca.harmony" in again.spatial_bin.integrated.obsm
    assert "lognorm" in again.spatial_bin["151674"].layers
