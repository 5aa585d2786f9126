"""Gene-set scores (EnrichMap's idea) and domain labels on the STARmap V1 section (real cells, manual layers).

The EnrichMap reference (tests/data/annotation/enrichmap_starmap.npz) was made by EnrichMap 0.2.3 itself
(make_enrichmap_ref.py in the same folder).
"""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from expkit.errors import InputError, KeyNotFoundError
from expkit.kernels.stats import normalize_total
from expkit.spatial.genesets import bspline_basis, score_genesets
from expkit.spatial.label_domains import label_domains

DATA = Path(__file__).resolve().parent / "data" / "annotation"


@pytest.fixture(scope="module")
def ref():
    z = np.load(DATA / "enrichmap_starmap.npz")
    return json.loads(str(z["sets"])), {k: z[k] for k in ("smooth", "smooth_gam")}


@pytest.fixture()
def starmap():
    a = ad.read_h5ad(DATA / "starmap_v1.h5ad")
    a.layers["counts"] = a.X.copy()
    a.X = normalize_total(a.X, 1e4)[1]
    return a


@pytest.mark.parametrize("setting,covariates", [("smooth", None), ("smooth_gam", ["spatial"])])
def test_matches_enrichmap(starmap, ref, setting, covariates):
    sets, values = ref
    score_genesets(starmap, genesets=sets, layer=None, weights="cv", background=None, smooth=True, n_neighbors=6,
                   covariates=covariates, key_added="s")
    ours = np.column_stack([starmap.obs[f"s.{k}"].to_numpy() for k in sets])
    r = [np.corrcoef(ours[:, j], values[setting][:, j])[0, 1] for j in range(len(sets))]
    assert min(r) > 0.9999, r
    np.testing.assert_allclose(ours, values[setting], atol=1e-4 * np.abs(values[setting]).max())


def test_steps_by_hand(starmap):
    """Weighted mean, control background, smoothing over the 6 nearest neighbours, one by one."""
    genes = ["Mbp", "Plp1", "Mobp"]
    score_genesets(starmap, genesets={"oligo": genes}, layer=None, smooth=False, background=None, key_added="raw")
    x = starmap[:, genes].X.toarray().astype(np.float64)
    cv = x.std(0) / x.mean(0)
    np.testing.assert_allclose(starmap.obs["raw.oligo"], x @ cv / cv.sum(), rtol=1e-10)
    score_genesets(starmap, genesets={"oligo": genes}, layer=None, smooth=True, background=None, key_added="sm")
    _, nn = cKDTree(starmap.obsm["spatial"]).query(starmap.obsm["spatial"], k=7)
    np.testing.assert_allclose(starmap.obs["sm.oligo"], starmap.obs["raw.oligo"].to_numpy()[nn[:, 1:]].mean(1),
                               rtol=1e-10)
    out = score_genesets(starmap, genesets={"oligo": genes}, layer=None, smooth=False, background="control",
                         ctrl_size=20, seed=1, key_added="bg")
    diff = (starmap.obs["raw.oligo"] - starmap.obs["bg.oligo"]).to_numpy()
    ctrl = starmap.uns["bg"]["sets"]["controls"][0].split(";")
    assert out["oligo"]["n_control"] == len(ctrl) >= 20 and not set(ctrl) & set(genes)
    np.testing.assert_allclose(diff, starmap[:, ctrl].X.toarray().astype(np.float64).mean(1), rtol=1e-9, atol=1e-12)
    means = pd.Series(np.asarray(starmap.X.mean(0)).ravel(), index=starmap.var_names)
    bins = ((means.rank(method="min") - 1) * 25 // len(means)).astype(int)  # 25 quantile bins of the means
    assert set(bins[ctrl]) <= set(bins[genes])  # controls come from the set genes' expression bins
    again = starmap.copy()
    score_genesets(again, genesets={"oligo": genes}, layer=None, smooth=False, ctrl_size=20, seed=1, key_added="bg")
    np.testing.assert_array_equal(again.obs["bg.oligo"], starmap.obs["bg.oligo"])


def test_covariate_regressed_out_and_layers_recovered(starmap):
    starmap.obs["total_counts"] = np.asarray(starmap.layers["counts"].sum(1)).ravel()
    sets = {"L6": ["Foxp2", "Syt6", "Crym", "Pcp4", "Tle4"], "L2/3": ["Cux2", "Otof", "Lamp5", "Rasgrf2"],
            "Oligo": ["Mbp", "Plp1", "Mobp"]}
    out = score_genesets(starmap, genesets=sets, smooth=False, covariates=["total_counts"], key_added="c")
    for k in ("L6", "L2_3", "Oligo"):
        assert abs(np.corrcoef(starmap.obs[f"c.{k}"], starmap.obs["total_counts"])[0, 1]) < 1e-8
    score_genesets(starmap, genesets=sets, key_added="score")
    means = starmap.obs[["score.L6", "score.L2_3", "score.Oligo"]].groupby(starmap.obs["layer"], observed=True).mean()
    assert means["score.L6"].idxmax() == "L6" and means["score.L2_3"].idxmax() == "L2/3"
    assert means["score.Oligo"].idxmax() == "cc"
    assert out["L6"]["n_genes"] == 5 and starmap.uns["score"]["sets"]["n_genes"].tolist() == [5, 4, 3]


def test_bspline_basis_is_a_partition_of_unity():
    x = np.random.default_rng(0).uniform(-3, 7, 500)
    b = bspline_basis(x, 10)
    assert b.shape == (500, 10) and (b >= -1e-12).all()
    np.testing.assert_allclose(b.sum(1), 1.0, rtol=1e-12)


def test_genesets_bad_input(starmap):
    with pytest.raises(InputError, match=r"fewer than min_genes=2.*'x': '1 of 2'"):
        score_genesets(starmap, genesets={"x": ["Mbp", "NotAGene"]}, layer=None)
    b = starmap.copy()
    del b.obsm["spatial"]
    with pytest.raises(KeyNotFoundError, match="obsm\\['spatial'\\]"):
        score_genesets(b, genesets={"x": ["Mbp", "Plp1"]}, layer=None)
    with pytest.raises(KeyNotFoundError, match="nope"):
        score_genesets(starmap, genesets={"x": ["Mbp", "Plp1"]}, layer=None, covariates=["nope"])
    assert not any(c.startswith("score.") for c in starmap.obs.columns)


# ----------------------------------------------------------------------------------------------- domains
def test_label_domains_elbow_gap_and_majority(starmap):
    sets = {"L2/3": ["Cux2", "Otof", "Lamp5", "Rasgrf2"], "L4": ["Rorb", "Rspo1", "Whrn", "Zmat4"],
            "L5": ["Fezf2", "Parm1", "Rab3c"], "L6": ["Foxp2", "Syt6", "Crym", "Pcp4", "Tle4"],
            "Oligo": ["Mbp", "Plp1", "Mobp"], "Astro": ["Gja1", "Aqp4", "Aldh1l1", "Slc1a3", "Mfge8"]}
    score_genesets(starmap, genesets=sets, layer=None)
    table = label_domains(starmap, domain_key="layer", score_key="score")
    lab = table["label"].to_dict()
    assert lab["L2/3"] == "L2_3" and lab["L4"] == "L4" and lab["L5"] == "L5" and lab["L6"] == "L6"
    assert lab["cc"] == "Oligo"
    assert (starmap.obs["layer.label"].astype(str).to_numpy() == starmap.obs["layer"].map(lab).astype(str)).all()
    mixed = label_domains(starmap, domain_key="layer", min_gap=100.0, key_added="strict")
    assert set(mixed["label"]) == {"mixed"}
    maj = label_domains(starmap, domain_key="layer", method="majority", label_key="cell_type", min_share=0.5,
                        key_added="maj")
    counts = pd.crosstab(starmap.obs["layer"], starmap.obs["cell_type"])
    share = counts.max(1) / counts.sum(1)
    expect = np.where(share >= 0.5, counts.idxmax(1), "mixed")
    assert maj["label"].tolist() == list(expect)
    with pytest.raises(KeyNotFoundError, match="label_key"):
        label_domains(starmap, domain_key="layer", method="majority")
    with pytest.raises(KeyNotFoundError, match="none"):
        label_domains(starmap, domain_key="layer", score_key="none")
