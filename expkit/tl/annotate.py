"""Reference-based cell-type annotation: CellTypist's model (Dominguez Conde et al., Science 2022).

A labelled reference (any AnnData with raw counts and a label column, e.g. an ``rna`` sample of the same
experiment) trains a multinomial logistic regression on log1p(CP10k) expression, each gene standardised and
clipped at 10, by mini-batch SGD with an L2 penalty (:mod:`expkit.kernels.logreg`); with
``feature_selection`` the union of every class's ``top_genes`` largest |coefficients| is kept and the model
refitted on those genes. The model (:class:`CellTypeModel`, saved as one ``.npz`` of plain arrays and a JSON
header, never a pickle) then labels any query whose genes match: by name, then through the gene database
(symbols, case, HGNC aliases, Ensembl ids) and, across human and mouse, through its homolog table. Model genes
absent from the query contribute nothing (their standardised value is taken as 0, the reference mean), as
CellTypist drops them; the share of model genes found is reported. Optional majority voting assigns every
cell of a cluster of an over-clustering (given, or Leiden on the query from :mod:`expkit.tl`) the cluster's
most frequent prediction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import FormatError, InputError, KeyNotFoundError
from ..kernels import logreg as K
from ..kernels.device import resolve_device

__all__ = ["CellTypeModel", "train_celltype_model", "annotate"]

_FORMAT = "expkit.celltype_model/1"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _sample(adata) -> str | None:
    if "sample" in adata.obs and adata.n_obs:
        return str(adata.obs["sample"].iloc[0])
    return None


def _where(adata, what: str) -> str:
    s = _sample(adata)
    return f"{what} (sample {s!r})" if s is not None else what


def _counts(adata, layer: str | None, what: str) -> sp.csr_matrix:
    """Raw counts of ``layers[layer]`` (None: X; a missing ``"counts"`` layer falls back to X), checked integral."""
    if layer is None or (layer == "counts" and layer not in adata.layers):
        x, name = adata.X, "X"
    elif layer in adata.layers:
        x, name = adata.layers[layer], f"layers[{layer!r}]"
    else:
        raise KeyNotFoundError(f"{_where(adata, what)}: layer {layer!r} not found (layers: {list(adata.layers)})")
    x = sp.csr_matrix(x, dtype=np.float64)
    bad = x.data[(x.data < 0) | (x.data != np.round(x.data))]
    if bad.size:
        raise InputError(f"{_where(adata, what)}: {name} holds {bad.size} non-integer or negative values (e.g. "
                         f"{bad[0]:g}); the model needs raw counts, it normalises them itself (log1p CP10k)")
    return x


def lognorm_cp10k(x: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell over all the cell's genes (CellTypist's input); empty rows stay 0."""
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    tot = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, tot, out=np.zeros_like(tot), where=tot > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


def _labels(ref, label_key: str, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    if label_key not in ref.obs:
        raise KeyNotFoundError(f"{_where(ref, 'reference')}: label column obs[{label_key!r}] not found "
                               f"(obs columns: {list(ref.obs.columns)})")
    lab = ref.obs[label_key]
    keep = lab.notna().to_numpy()
    codes, classes = pd.factorize(lab[keep].astype(str), sort=True)
    counts = np.bincount(codes, minlength=len(classes))
    small = {str(c): int(n) for c, n in zip(classes, counts) if n < min_cells}
    if small:
        raise InputError(f"{_where(ref, 'reference')}: labels of obs[{label_key!r}] with fewer than "
                         f"min_cells={min_cells} cells: {small}; remove or merge them, or lower min_cells")
    if len(classes) < 2:
        raise InputError(f"{_where(ref, 'reference')}: obs[{label_key!r}] needs at least 2 labels, has "
                         f"{list(classes)}")
    y = np.full(ref.n_obs, -1, dtype=np.int64)
    y[keep] = codes
    return y, np.asarray(classes, dtype=str)


def _gene_names(adata) -> np.ndarray:
    """Symbols where ``var['gene']`` exists (annotated data: var names are uids), else the var names."""
    if "gene" in adata.var:
        return adata.var["gene"].astype(str).to_numpy()
    return np.asarray(adata.var_names, dtype=str)


def _guess_taxa(adata, names: np.ndarray) -> str | None:
    """``uns['db']`` / ``obs['taxa']`` when set; else Ensembl prefixes; else symbol case (mouse symbols carry
    lower-case letters, human ones are upper case)."""
    from ..database import _adata_taxa

    taxa = _adata_taxa(adata) if adata is not None else None
    if taxa is not None:
        return taxa
    ids = pd.Series(names, dtype=str)
    if ids.str.startswith("ENSMUSG").mean() > 0.5:
        return "mmu"
    if ids.str.startswith("ENSG").mean() > 0.5:
        return "hsa"
    letters = ids[ids.str.contains("[A-Za-z]", regex=True)]
    if not len(letters):
        return None
    return "mmu" if letters.str.contains("[a-z]", regex=True).mean() > 0.5 else "hsa"


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@dataclass
class CellTypeModel:
    """A trained annotation model: ``genes`` (symbols or ids, in coefficient order), ``classes``, ``coef``
    (genes x classes, on standardised values), ``intercept``, the standardisation ``mean`` / ``std`` of the
    log1p(CP10k) reference values, ``taxa`` and the training ``params``."""

    genes: np.ndarray
    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    taxa: str | None = None
    params: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        """Write one ``.npz`` of plain arrays (strings as unicode arrays) and a JSON header; no pickle."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        meta = {"format": _FORMAT, "version": __version__, "taxa": self.taxa, "params": self.params}
        np.savez_compressed(path, genes=np.asarray(self.genes, dtype=str), classes=np.asarray(self.classes, dtype=str),
                            coef=self.coef, intercept=self.intercept, mean=self.mean, std=self.std,
                            meta=np.asarray(json.dumps(meta, default=_jsonable)))
        return path

    @classmethod
    def load(cls, path) -> "CellTypeModel":
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"cell-type model file not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            keys = {"genes", "classes", "coef", "intercept", "mean", "std", "meta"}
            if not keys <= set(z.files):
                raise FormatError(f"{path}: not an expkit cell-type model (entries {sorted(z.files)})")
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != _FORMAT:
                raise FormatError(f"{path}: unknown model format {meta.get('format')!r} (expected {_FORMAT})")
            return cls(genes=z["genes"].astype(str), classes=z["classes"].astype(str), coef=z["coef"],
                       intercept=z["intercept"], mean=z["mean"], std=z["std"], taxa=meta.get("taxa"),
                       params=meta.get("params", {}))

    def decision(self, x: sp.csr_matrix, idx: np.ndarray, device=None) -> np.ndarray:
        """Logits of the query log1p(CP10k) rows ``x`` (all query genes); ``idx``: the query column of every
        model gene, -1 where absent (see :func:`match_genes`). An absent gene's standardised value is 0 (the
        reference mean), so its coefficients drop out, as in CellTypist."""
        found = np.flatnonzero(idx >= 0)
        sub = sp.csr_matrix(x[:, idx[found]])
        return K.decision(sub, self.coef[found], self.intercept, self.mean[found], self.std[found], device=device)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def train_celltype_model(reference, *, label_key: str = "cell_type", layer: str | None = "counts",
                         feature_selection: bool = True, top_genes: int = 300, l2: float | None = None,
                         epochs: int = 30, batch_size: int = 1000, min_steps: int = 300,
                         balance: bool = False, min_cells: int = 5, taxa: str | None = None,
                         seed: int | None = None, use_gpu: bool = False) -> CellTypeModel:
    """Train CellTypist's model on a labelled reference; returns a :class:`CellTypeModel`.

    ``layer``: raw counts (None: X; a missing ``"counts"`` layer: X). Cells with a missing label are left out;
    every label needs ``min_cells`` cells. Genes with no count in the reference are dropped. ``l2``: weight of
    ``||W||^2 / 2`` on the mean log-loss (None: ``1 / n_cells``, the objective of scikit-learn's
    ``LogisticRegression(C=1)``, CellTypist's default). ``balance``: weight each cell by
    ``n / (n_classes * n_class)``. ``feature_selection``: refit on the union of each class's ``top_genes``
    genes of largest |coefficient| (only when more genes than ``top_genes``; the first, ranking fit runs a third
    of ``min_steps``). ``seed``: same seed -> same model.
    """
    seed = settings.seed if seed is None else int(seed)
    device = resolve_device(use_gpu)
    y, classes = _labels(reference, label_key, int(min_cells))
    x = lognorm_cp10k(_counts(reference, layer, "reference"))
    names = _gene_names(reference)
    keep_cells = y >= 0
    x, y = x[keep_cells], y[keep_cells]
    expressed = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    x, names = x[:, expressed], names[expressed]
    n, k = x.shape[0], len(classes)
    l2 = 1.0 / n if l2 is None else float(l2)
    cw = None
    if balance:
        cw = n / (k * np.bincount(y, minlength=k).astype(np.float64))
    mean, std = K.standardise(x)
    xc = K.clip_values(x, mean, std)
    kw = dict(l2=l2, epochs=int(epochs), batch_size=int(batch_size), min_steps=int(min_steps), class_weight=cw,
              seed=seed, device=device)
    select = feature_selection and x.shape[1] > int(top_genes)
    first = dict(kw, min_steps=max(50, int(min_steps) // 3)) if select else kw  # a ranking pass only
    fit = K.fit_softmax(xc, y, k, mean=mean, std=std, **first)
    n_first = x.shape[1]
    if select:
        sel = K.top_features(fit["coef"], int(top_genes))
        mean, std, names = mean[sel], std[sel], names[sel]
        fit = K.fit_softmax(sp.csr_matrix(xc[:, sel]), y, k, mean=mean, std=std, **kw)
    params = {"label_key": label_key, "layer": layer, "feature_selection": bool(feature_selection),
              "top_genes": int(top_genes), "l2": l2, "epochs": int(epochs), "batch_size": int(batch_size),
              "min_steps": int(min_steps), "balance": bool(balance), "seed": seed, "n_cells": int(n),
              "n_genes_expressed": int(n_first), "n_steps": int(fit["n_steps"]),
              "final_loss": float(fit["loss"][-1])}
    taxa = taxa if taxa is not None else _guess_taxa(reference, names)
    logger.info("annotate: model of %d classes on %d genes trained on %d reference cells", k, len(names), n)
    return CellTypeModel(genes=np.asarray(names, dtype=str), classes=classes, coef=fit["coef"],
                         intercept=fit["intercept"], mean=mean, std=std, taxa=taxa, params=params)


# --------------------------------------------------------------------------------------------
# gene matching
# --------------------------------------------------------------------------------------------
def _name_index(adata) -> pd.Series:
    """Upper-cased var names, ``var['gene']`` and ``var['gene_ids']`` -> column (first occurrence wins)."""
    keys, cols = [], []
    for c in (np.asarray(adata.var_names, dtype=str),
              adata.var["gene"].astype(str).to_numpy() if "gene" in adata.var else None,
              adata.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in adata.var else None):
        if c is not None:
            keys.append(pd.Series(c).str.upper().to_numpy())
            cols.append(np.arange(len(c)))
    s = pd.Series(np.concatenate(cols), index=pd.Index(np.concatenate(keys)))
    return s[~s.index.duplicated(keep="first")]


def _uid_index(adata, taxa: str) -> pd.Series:
    """Database uid -> query column, from the var names, else ``var['gene']`` (first occurrence wins)."""
    from ..database import lookup

    uid = pd.Series(lookup(list(np.asarray(adata.var_names, dtype=str)), taxa), dtype=object)
    if "gene" in adata.var and uid.isna().any():
        miss = uid.isna().to_numpy()
        uid[miss] = lookup(list(adata.var["gene"].astype(str).to_numpy()[miss]), taxa)
    ok = uid.notna().to_numpy()
    s = pd.Series(np.flatnonzero(ok), index=pd.Index(uid[ok].to_numpy()))
    return s[~s.index.duplicated(keep="first")]


def _model_uids(genes: np.ndarray, model_taxa: str, query_taxa: str) -> np.ndarray:
    """Each model gene's uid in the query's taxa (its first homolog across taxa), None where unknown."""
    from ..database import homologs, lookup

    if model_taxa == query_taxa:
        return lookup(list(genes), model_taxa)
    h = homologs(list(genes), from_taxa=model_taxa, to_taxa=query_taxa)
    first = h.drop_duplicates("name", keep="first").set_index("name")["homolog"]
    return pd.Series(genes).map(first).to_numpy(dtype=object)


def match_genes(model: CellTypeModel, adata, *, taxa: str | None = None) -> tuple[np.ndarray, dict]:
    """Query column of every model gene (-1 where absent) and a report ``{"n_model", "n_matched", "share",
    "by_name", "by_database", "model_taxa", "query_taxa"}``. Names are matched case-insensitively first; the
    rest through the gene database (and homologs when the taxa differ)."""
    genes = np.asarray(model.genes, dtype=str)
    idx = pd.Series(genes).str.upper().map(_name_index(adata)).to_numpy(dtype=np.float64)
    by_name = int(np.isfinite(idx).sum())
    query_taxa = taxa if taxa is not None else _guess_taxa(adata, _gene_names(adata))
    model_taxa = model.taxa
    cross = model_taxa is not None and query_taxa is not None and model_taxa != query_taxa
    todo = ~np.isfinite(idx)
    if todo.any() and model_taxa is not None and query_taxa is not None:
        if cross:  # names differ in case only is not evidence across species: map every gene by homology
            todo[:] = True
        uids = _model_uids(genes[todo], model_taxa, query_taxa)
        cols = pd.Series(uids, dtype=object).map(_uid_index(adata, query_taxa)).to_numpy(dtype=np.float64)
        if cross:
            idx = np.where(np.isfinite(cols), cols, idx)
        else:
            idx[todo] = cols
    idx = np.where(np.isfinite(idx), idx, -1).astype(np.int64)
    n_matched = int((idx >= 0).sum())
    report = {"n_model": int(len(genes)), "n_matched": n_matched, "share": n_matched / max(len(genes), 1),
              "by_name": by_name, "by_database": n_matched - by_name if not cross else n_matched,
              "model_taxa": model_taxa, "query_taxa": query_taxa}
    return idx, report



# --------------------------------------------------------------------------------------------
# majority voting
# --------------------------------------------------------------------------------------------
def _resolution(n: int) -> float:
    """CellTypist's over-clustering resolution by the number of cells."""
    for limit, res in ((5000, 5.0), (20000, 10.0), (40000, 15.0), (100000, 20.0), (200000, 25.0)):
        if n < limit:
            return res
    return 30.0


def _over_cluster(adata, x_model: sp.csr_matrix, model: CellTypeModel, found: np.ndarray, over_clustering,
                  resolution, seed: int, device) -> np.ndarray:
    """Cluster codes of every cell: ``over_clustering`` (an obs column or one label per cell), else Leiden
    (resolution by CellTypist's rule) on the kNN graph (15 neighbours) of a PCA of the standardised
    model genes."""
    if over_clustering is not None:
        if isinstance(over_clustering, str):
            if over_clustering not in adata.obs:
                raise KeyNotFoundError(f"{_where(adata, 'query')}: over_clustering obs[{over_clustering!r}] not "
                                       f"found (obs columns: {list(adata.obs.columns)})")
            values = adata.obs[over_clustering].astype(str).to_numpy()
        else:
            values = np.asarray(over_clustering).astype(str)
            if values.shape != (adata.n_obs,):
                raise InputError(f"{_where(adata, 'query')}: over_clustering has {values.size} values for "
                                 f"{adata.n_obs} cells")
        return pd.factorize(values, sort=True)[0]
    import anndata as ad

    from ..kernels.linalg import pca
    from .leiden import leiden
    from .neighbors import knn

    mean, std = model.mean[found], model.std[found]
    s = (K.clip_values(x_model, mean, std).toarray() - mean) / std
    n_comps = int(min(50, s.shape[0] - 1, s.shape[1]))
    tmp = ad.AnnData(sp.csr_matrix((adata.n_obs, 0)))
    tmp.obsm["pca"] = pca(s, n_comps, seed=seed, device=device)["scores"]
    knn(tmp, n_neighbors=min(15, adata.n_obs - 1), use_rep="pca")
    res = _resolution(adata.n_obs) if resolution is None else float(resolution)
    leiden(tmp, resolution=res, seed=seed, n_iterations=2, key_added="over")
    return tmp.obs["over"].cat.codes.to_numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------
# annotate
# --------------------------------------------------------------------------------------------
def _model_of(reference, label_key, layer_ref, train_kw) -> CellTypeModel:
    if isinstance(reference, CellTypeModel):
        return reference
    if isinstance(reference, (str, Path)):
        return CellTypeModel.load(reference)
    if not hasattr(reference, "obs") or not hasattr(reference, "var"):
        raise InputError(f"reference must be an AnnData, a CellTypeModel or a saved model path, not "
                         f"{type(reference).__name__}")
    return train_celltype_model(reference, label_key=label_key, layer=layer_ref, **train_kw)


def annotate(adata, *, reference, label_key: str = "cell_type", majority_voting: bool = False,
             over_clustering=None, min_prop: float = 0.0, resolution: float | None = None,
             layer: str | None = "counts", reference_layer: str | None = "counts", feature_selection: bool = True,
             top_genes: int = 300, l2: float | None = None, epochs: int = 30, batch_size: int = 1000,
             balance: bool = False, min_cells: int = 5, min_shared_genes: int = 10, taxa: str | None = None,
             seed: int | None = None, use_gpu: bool = False, key_added: str = "celltype") -> dict:
    """Label every cell from a labelled reference with CellTypist's model (module docstring).

    ``reference``: an AnnData with raw counts (``reference_layer``) and ``obs[label_key]`` (the model is
    trained on it, see :func:`train_celltype_model` for ``feature_selection``, ``top_genes``, ``l2``,
    ``epochs``, ``batch_size``, ``balance``, ``min_cells``), or a trained :class:`CellTypeModel` / the path of
    a saved one. ``layer``: the query's raw counts (None: X). Genes are matched by name, then by the gene
    database (``taxa``: the query's, default from ``uns['db']`` or the names); fewer than
    ``min_shared_genes`` model genes in the query is an error. ``majority_voting``: each cluster of
    ``over_clustering`` (an obs column, one label per cell, or None: Leiden at ``resolution``, default by
    CellTypist's rule, on the query) takes its most frequent prediction; a cluster whose winner holds less
    than ``min_prop`` of it becomes "Heterogeneous".

    Writes ``obs[key_added]`` (per-cell prediction, categorical), ``obs[f"{key_added}.conf"]`` (its
    probability), ``obsm[f"{key_added}.proba"]`` (DataFrame cells x classes, softmax probabilities; a ``/`` in a class
    name becomes ``_`` in its column), with
    majority voting ``obs[f"{key_added}.majority"]`` and ``obs[f"{key_added}.clusters"]``, and
    ``uns[key_added]`` (params, version, classes, gene matching). Returns the gene-matching report with the
    counts of each predicted label.
    """
    seed = settings.seed if seed is None else int(seed)
    device = resolve_device(use_gpu)
    if not 0.0 <= float(min_prop) <= 1.0:
        raise InputError(f"min_prop must lie in [0, 1], not {min_prop}")
    x = lognorm_cp10k(_counts(adata, layer, "query"))
    train_kw = dict(feature_selection=feature_selection, top_genes=top_genes, l2=l2, epochs=epochs,
                    batch_size=batch_size, balance=balance, min_cells=min_cells, seed=seed, use_gpu=use_gpu)
    model = _model_of(reference, label_key, reference_layer, train_kw)
    idx, report = match_genes(model, adata, taxa=taxa)
    if report["n_matched"] < int(min_shared_genes):
        raise InputError(f"{_where(adata, 'query')}: only {report['n_matched']} of the model's {report['n_model']} "
                         f"genes are in the query (threshold min_shared_genes={int(min_shared_genes)}; model taxa "
                         f"{report['model_taxa']}, query taxa {report['query_taxa']})")
    if report["share"] < 0.5:
        logger.warning(f"{_where(adata, 'annotate')}: only {report['n_matched']} of {report['n_model']} model "
                       f"genes ({100 * report['share']:.0f}%) found in the query")
    found = np.flatnonzero(idx >= 0)
    z = model.decision(x, idx, device=device)
    proba = K.softmax(z)
    pred = proba.argmax(axis=1)
    clusters = None
    if majority_voting:
        x_model = sp.csr_matrix(x[:, idx[found]])
        clusters = _over_cluster(adata, x_model, model, found, over_clustering, resolution, seed, device)
        maj, _ = K.majority_vote(pred, clusters, len(model.classes), int(clusters.max()) + 1, float(min_prop))
    params = {"label_key": label_key, "majority_voting": bool(majority_voting), "min_prop": float(min_prop),
              "layer": layer, "min_shared_genes": int(min_shared_genes), "seed": seed, "use_gpu": bool(use_gpu),
              "model": {k: v for k, v in model.params.items() if v is not None}}
    if isinstance(over_clustering, str):
        params["over_clustering"] = over_clustering
    _write(adata, model, pred, proba, clusters, maj if majority_voting else None, report, params, key_added)
    logger.info(f"{_where(adata, 'annotate')}: {report['n_matched']} of {report['n_model']} model genes matched "
                f"({100 * report['share']:.1f}%), {len(model.classes)} classes")
    out = dict(report)
    out["counts"] = adata.obs[key_added].value_counts().to_dict()
    return out


def _write(adata, model, pred, proba, clusters, maj, report, params, key_added) -> None:
    classes = list(model.classes)
    adata.obs[key_added] = pd.Categorical.from_codes(pred, categories=classes)
    adata.obs[f"{key_added}.conf"] = proba[np.arange(len(pred)), pred]
    cols = [c.replace("/", "_") for c in classes]  # h5ad keys: no "/" (the exact names are in uns classes)
    adata.obsm[f"{key_added}.proba"] = pd.DataFrame(proba, index=adata.obs_names, columns=cols)
    if maj is not None:
        cats = classes + (["Heterogeneous"] if (maj < 0).any() else [])
        codes = np.where(maj < 0, len(classes), maj)
        adata.obs[f"{key_added}.majority"] = pd.Categorical.from_codes(codes, categories=cats)
        adata.obs[f"{key_added}.clusters"] = pd.Categorical(clusters.astype(str))
    adata.uns[key_added] = {"params": params, "version": __version__, "classes": np.asarray(classes, dtype=str),
                            "genes": {k: v for k, v in report.items() if v is not None}}
