"""Reference annotation (CellTypist's model) and ScMags-like marker selection on real labelled cells.

Data: tests/data/annotation/ (README: provenance). Accuracy is checked against scikit-learn's exact optimum of
the same objective (multinomial logistic regression, L2 with C=1, on the same standardised, clipped values).
"""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, silhouette_score

from expkit.errors import FormatError, InputError, KeyNotFoundError
from expkit.kernels import logreg as K
from expkit.tl import get_markers
from expkit.tl.annotate import CellTypeModel, annotate, lognorm_cp10k, match_genes, train_celltype_model
from expkit.tl.select_markers import select_markers, silhouette_1d

DATA = Path(__file__).resolve().parent / "data" / "annotation"


def _read(name):
    return ad.read_h5ad(DATA / name)


def _split(adata, frac=0.3, seed=0):
    rng = np.random.default_rng(seed)
    lab = adata.obs["cell_type"].astype(str).to_numpy()
    test = np.zeros(adata.n_obs, dtype=bool)
    for v in np.unique(lab):
        idx = np.flatnonzero(lab == v)
        test[rng.choice(idx, size=max(1, round(frac * idx.size)), replace=False)] = True
    return adata[~test].copy(), adata[test].copy()


@pytest.fixture(scope="module")
def hypo():
    return _split(_read("hypothalamus_ref.h5ad"))


@pytest.fixture(scope="module")
def hypo_model(hypo):
    return train_celltype_model(hypo[0], label_key="cell_type", seed=0)


def _sklearn_reference(train, test):
    """The exact optimum of the same objective (lbfgs), on the same genes and standardisation."""
    xtr, xte = lognorm_cp10k(sp.csr_matrix(train.X)), lognorm_cp10k(sp.csr_matrix(test.X))
    expressed = np.asarray(xtr.sum(0)).ravel() > 0
    xtr, xte = xtr[:, expressed], xte[:, expressed]
    mean, std = K.standardise(xtr)
    s_tr = np.minimum((xtr.toarray() - mean) / std, 10)
    s_te = np.minimum((xte.toarray() - mean) / std, 10)
    y = train.obs["cell_type"].astype(str).to_numpy()
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(s_tr, y)
    return lr, s_tr, y, lr.predict(s_te)


def _objective(s, y_codes, coef, intercept):
    z = s @ coef + intercept
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(y_codes)), y_codes].mean() + 0.5 / len(y_codes) * (coef**2).sum()


def test_sgd_reaches_the_regularised_optimum_and_matches_its_accuracy(hypo, hypo_model):
    train, test = hypo
    lr, s_tr, y, sk_pred = _sklearn_reference(train, test)
    codes = pd.Categorical(y, categories=hypo_model.classes).codes
    ours = _objective(s_tr, codes, hypo_model.coef, hypo_model.intercept)
    best = _objective(s_tr, codes, lr.coef_.T, lr.intercept_)
    assert best <= ours <= best * 1.05 + 1e-3, (ours, best)
    q = test.copy()
    annotate(q, reference=hypo_model)
    truth = test.obs["cell_type"].astype(str)
    f1_ours = f1_score(truth, q.obs["celltype"].astype(str), average="macro")
    f1_sk = f1_score(truth, sk_pred, average="macro")
    assert f1_ours > 0.6 and f1_ours >= f1_sk - 0.02, (f1_ours, f1_sk)
    assert (q.obs["celltype"].astype(str).to_numpy() == sk_pred).mean() > 0.9


def test_feature_selection_keeps_the_top_coefficient_genes_and_accuracy():
    train, test = _split(_read("starmap_v1.h5ad"))
    full = train_celltype_model(train, feature_selection=False, min_steps=100, seed=0)  # = the ranking pass
    sel = train_celltype_model(train, feature_selection=True, top_genes=40, seed=0)
    assert len(sel.genes) < len(full.genes)
    top = full.genes[K.top_features(full.coef, 40)]
    assert set(sel.genes) == set(top)
    f1 = {}
    for name, m in (("full", full), ("sel", sel)):
        q = test.copy()
        annotate(q, reference=m)
        f1[name] = f1_score(test.obs["cell_type"].astype(str), q.obs["celltype"].astype(str), average="macro")
    assert f1["sel"] > 0.5 and f1["sel"] >= f1["full"] - 0.1, f1


def test_outputs_seed_and_saved_model(hypo, hypo_model, tmp_path):
    train, test = hypo
    q = test.copy()
    out = annotate(q, reference=train, label_key="cell_type", seed=3)
    proba = q.obsm["celltype.proba"]
    assert list(proba.columns) == list(hypo_model.classes)
    np.testing.assert_allclose(proba.to_numpy().sum(1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(q.obs["celltype.conf"], proba.to_numpy().max(1))
    assert out["share"] == 1.0 and q.uns["celltype"]["params"]["seed"] == 3
    q2 = test.copy()
    annotate(q2, reference=train, label_key="cell_type", seed=3)
    np.testing.assert_array_equal(q2.obsm["celltype.proba"].to_numpy(), proba.to_numpy())
    path = hypo_model.save(tmp_path / "model")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {"coef", "genes", "classes", "meta"} <= set(z.files)
    loaded = CellTypeModel.load(path)
    a, b = test.copy(), test.copy()
    annotate(a, reference=hypo_model)
    annotate(b, reference=str(path))
    np.testing.assert_array_equal(a.obsm["celltype.proba"].to_numpy(), b.obsm["celltype.proba"].to_numpy())
    assert loaded.params["n_cells"] == train.n_obs
    q.write_h5ad(tmp_path / "annotated.h5ad")  # everything written is h5ad-safe


def test_gene_matching_by_ensembl_id_and_across_species(hypo, hypo_model):
    """The same cells, their genes renamed to Ensembl ids, then to human homolog symbols (gene database)."""
    from expkit import database as db

    _, test = hypo
    base = test.copy()
    annotate(base, reference=hypo_model)
    uids = db.lookup(list(test.var_names), "mmu")
    ok = np.array([u is not None for u in uids])
    ens = test[:, ok].copy()
    ens.var_names = [str(u) for u in np.asarray(uids)[ok]]
    idx, rep = match_genes(hypo_model, ens)
    assert rep["by_database"] == rep["n_matched"] and rep["n_matched"] >= 0.95 * rep["n_model"]
    annotate(ens, reference=hypo_model)
    assert (ens.obs["celltype"].astype(str).to_numpy() == base.obs["celltype"].astype(str).to_numpy()).mean() > 0.95
    hom = db.homologs(list(test.var_names), "mmu", "hsa").drop_duplicates("name").set_index("name")["homolog_gene"]
    human = test.copy()
    human.var_names = [str(hom.get(g) or f"NA_{g}") for g in test.var_names]
    human.var_names_make_unique()
    out = annotate(human, reference=hypo_model, taxa="hsa")
    assert out["model_taxa"] == "mmu" and out["query_taxa"] == "hsa" and out["share"] > 0.9
    agree = (human.obs["celltype"].astype(str).to_numpy() == base.obs["celltype"].astype(str).to_numpy()).mean()
    assert agree > 0.9


def test_majority_voting(hypo, hypo_model):
    _, test = hypo
    q = test.copy()
    annotate(q, reference=hypo_model, majority_voting=True, over_clustering="cell_type")
    maj = q.obs["celltype.majority"].astype(str)
    tab = pd.crosstab(q.obs["cell_type"], maj)
    assert ((tab > 0).sum(1) == 1).all()  # one label per given cluster
    per = pd.crosstab(q.obs["cell_type"], q.obs["celltype"].astype(str))
    assert (tab.idxmax(1) == per.idxmax(1)).all()  # the cluster's most frequent prediction
    q2 = test.copy()
    annotate(q2, reference=hypo_model, majority_voting=True, min_prop=0.999)  # Leiden over-clustering
    g = q2.obs.groupby("celltype.clusters", observed=True)["celltype.majority"].nunique()
    assert (g == 1).all() and q2.obs["celltype.clusters"].nunique() > 3
    assert "Heterogeneous" in set(q2.obs["celltype.majority"].astype(str))


def test_bad_input_is_reported_before_writing(hypo, hypo_model):
    train, test = hypo
    q = test.copy()
    before = set(q.obs.columns), set(q.obsm), set(q.uns)
    with pytest.raises(KeyNotFoundError, match=r"obs\['label'\] not found.*cell_type"):
        annotate(q, reference=train, label_key="label")
    few = q[:, :5].copy()
    with pytest.raises(InputError, match=r"only 5 of the model's \d+ genes.*min_shared_genes=10"):
        annotate(few, reference=hypo_model)
    rare = train.copy()
    rare.obs["cell_type"] = rare.obs["cell_type"].astype(str)
    rare.obs.iloc[:3, rare.obs.columns.get_loc("cell_type")] = "tiny"
    with pytest.raises(InputError, match=r"fewer than min_cells=5 cells: \{'tiny': 3\}"):
        annotate(q, reference=rare)
    frac = q.copy()
    frac.X = sp.csr_matrix(lognorm_cp10k(sp.csr_matrix(frac.X)))
    with pytest.raises(InputError, match="non-integer"):
        annotate(frac, reference=hypo_model)
    with pytest.raises(FormatError):
        CellTypeModel.load(Path("/nonexistent/model.npz"))
    assert (set(q.obs.columns), set(q.obsm), set(q.uns)) == before


@pytest.mark.gpu
def test_cuda_matches_cpu(hypo):
    train, test = hypo
    a, b = test.copy(), test.copy()
    annotate(a, reference=train, seed=0)
    annotate(b, reference=train, seed=0, use_gpu=True)
    assert (a.obs["celltype"].astype(str) == b.obs["celltype"].astype(str)).mean() > 0.97


# ----------------------------------------------------------------------------------------------- markers
def test_silhouette_1d_is_exact():
    a = _read("starmap_v1.h5ad")
    x = np.log2(1 + a[:, ["Plp1", "Cux2", "Gad1"]].X.toarray().astype(np.float64))
    inside = (a.obs["cell_type"] == "Oligo").to_numpy()
    ours = silhouette_1d(x, inside)
    ref = [silhouette_score(x[:, [j]], inside) for j in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_select_markers_on_starmap_cell_types():
    a = _read("starmap_v1.h5ad")
    markers = select_markers(a, groupby="cell_type", n_candidates=10, n_markers=3)
    assert set(markers) == set(a.obs["cell_type"].astype(str))
    assert all(1 <= len(v) <= 3 for v in markers.values())
    known = {"Oligo": {"Plp1", "Mbp", "Mobp", "Trf"}, "PVALB": {"Pvalb"}, "VIP": {"Vip"}, "SST": {"Sst"},
             "Reln": {"Reln"}, "eL2/3": {"Cux2", "Lamp5", "Otof"}}
    for g, genes in known.items():
        assert genes & set(markers[g]), (g, markers[g])
    tab = get_markers(a, slot="markers.sel", group_name="Oligo")
    assert len(tab) == 10 and list(tab["score"]) == sorted(tab["score"], reverse=True)
    assert set(tab["gene"][:3]) == set(markers["Oligo"])
    res = a.uns["markers.sel"]["results"]
    sub = res[res["group"] == "Oligo"]
    x = np.log2(1 + a[:, sub["uid"].tolist()].X.toarray().astype(np.float64))
    ref = [silhouette_score(x[:, [j]], (a.obs["cell_type"] == "Oligo").to_numpy()) for j in range(len(sub))]
    np.testing.assert_allclose(sub["score"].to_numpy(), ref, rtol=1e-9)
    assert (sub["pct.in"] > sub["pct.out"]).all()
    with pytest.raises(KeyNotFoundError, match="nope"):
        select_markers(a, groupby="nope")
    with pytest.raises(InputError, match="cannot exceed"):
        select_markers(a, groupby="cell_type", n_candidates=2, n_markers=3)
