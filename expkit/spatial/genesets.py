"""Gene-set scores with spatial smoothing and covariate correction (EnrichMap's idea; Celik et al. 2025).

Per gene set and cell (or spot), in this order:

1. **score**: the weighted mean of the set's genes in ``layers[layer]`` (log-normalised values),
   ``s = sum_g w_g x_g / sum_g |w_g|``, with ``weights="cv"`` (each gene's coefficient of variation
   ``std / mean`` over the cells, EnrichMap's inferred weights; 0 for an unexpressed gene) or ``"uniform"``;
2. **background** (``background="control"``): minus the mean of control genes of matching expression: all
   genes are binned by mean expression into ``n_bins`` quantile bins and, for every bin holding set genes,
   ``ctrl_size`` genes are drawn from it (seeded, without replacement; set genes excluded), as in Tirosh et
   al. 2016 / scanpy's ``score_genes``;
3. **cell covariates** (obs columns in ``covariates``, e.g. ``"total_counts"``): regressed out of the scores by
   least squares (with an intercept);
4. **smoothing** (``smooth=True``): each score replaced by the mean over its spatial neighbours
   (``obsp[graph]``, or the ``n_neighbors`` nearest neighbours of ``obsm['spatial']``, self excluded, as
   squidpy's generic graph that EnrichMap uses);
5. **spatial covariates** (``"spatial"`` in ``covariates``): the large-scale spatial trend removed by a
   penalised tensor-product cubic B-spline of the coordinates (``n_splines`` per axis, second-order difference
   penalty of weight ``lam`` per axis, EnrichMap's ``LinearGAM(te(0, 1))`` smoother), one linear solve for
   every set at once.

Everything is vectorised over cells and sets (one column slice of the matrix per set; the smoothing and the
spline fit act on the cells x sets matrix).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import __version__
from .._logging import logger
from .._settings import settings
from ..errors import InputError, KeyNotFoundError

__all__ = ["score_genesets"]


def _where(adata) -> str:
    if "sample" in adata.obs and adata.n_obs:
        return f"sample {str(adata.obs['sample'].iloc[0])!r}"
    return "the data"


def _matrix(adata, layer) -> sp.csc_matrix:
    """``layers[layer]`` (None: X); a missing ``"lognorm"`` computed from the counts (CP median, log1p)."""
    if layer is None:
        return sp.csc_matrix(adata.X, dtype=np.float64)
    if layer in adata.layers:
        return sp.csc_matrix(adata.layers[layer], dtype=np.float64)
    if layer == "lognorm":
        from ..kernels.stats import normalize_total

        counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
        return sp.csc_matrix(normalize_total(counts)[1], dtype=np.float64)
    raise KeyNotFoundError(f"{_where(adata)}: layer {layer!r} not found (layers: {list(adata.layers)})")


def _resolve_sets(adata, genesets, min_genes: int) -> tuple[dict, dict]:
    """Set name -> var columns of its genes (case-insensitive names, symbols or ids), and the missing genes."""
    from ..tl.annotate import _name_index

    if not isinstance(genesets, dict) or not genesets:
        raise InputError("genesets must be a non-empty dict {name: [genes]}")
    index = _name_index(adata)
    cols, missing, short = {}, {}, {}
    for name, genes in genesets.items():  # a handful of sets
        genes = [genes] if isinstance(genes, str) else list(genes)
        hit = pd.Series(genes, dtype=str).str.upper().map(index)
        missing[str(name)] = [g for g, h in zip(genes, hit) if pd.isna(h)]
        c = np.unique(hit.dropna().to_numpy(dtype=np.int64))
        if c.size < min_genes:
            short[str(name)] = f"{c.size} of {len(genes)}"
        cols[str(name)] = c
    if short:
        raise InputError(f"{_where(adata)}: gene sets with fewer than min_genes={min_genes} genes in the data: "
                         f"{short}")
    return cols, missing


def _weights(x: sp.csc_matrix, cols: np.ndarray, how: str) -> np.ndarray:
    if how == "uniform":
        return np.ones(cols.size)
    sub = x[:, cols]
    n = x.shape[0]
    mean = np.asarray(sub.sum(axis=0)).ravel() / n
    sq = np.asarray(sub.multiply(sub).sum(axis=0)).ravel() / n
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return np.divide(std, mean, out=np.zeros_like(mean), where=mean > 0)


def _controls(mean_all: np.ndarray, cols: np.ndarray, n_bins: int, ctrl_size: int, rng) -> np.ndarray:
    """Control genes of matching mean expression (quantile bins of the gene means)."""
    ranks = pd.Series(mean_all).rank(method="min").to_numpy()
    bins = np.minimum(((ranks - 1) * n_bins / len(mean_all)).astype(np.int64), n_bins - 1)
    chosen = []
    in_set = np.zeros(len(mean_all), dtype=bool)
    in_set[cols] = True
    for b in np.unique(bins[cols]):  # at most n_bins bins
        pool = np.flatnonzero((bins == b) & ~in_set)
        if pool.size:
            chosen.append(rng.choice(pool, size=min(ctrl_size, pool.size), replace=False))
    return np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _raw_scores(x, sets, weights, background, n_bins, ctrl_size, seed):
    n = x.shape[0]
    out = np.zeros((n, len(sets)))
    mean_all = np.asarray(x.sum(axis=0)).ravel() / max(n, 1)
    rng = np.random.default_rng(seed)
    info = {}
    for j, (name, cols) in enumerate(sets.items()):  # one column slice per set
        w = _weights(x, cols, weights)
        denom = np.abs(w).sum()
        if denom == 0:  # every gene unexpressed (cv weights 0): plain mean
            w, denom = np.ones(cols.size), float(cols.size)
        out[:, j] = np.asarray(x[:, cols] @ w).ravel() / denom
        info[name] = {"n_genes": int(cols.size), "weights": w}
        if background == "control":
            ctrl = _controls(mean_all, cols, n_bins, ctrl_size, rng)
            if ctrl.size:
                out[:, j] -= np.asarray(x[:, ctrl].mean(axis=1)).ravel()
            info[name]["n_control"] = int(ctrl.size)
            info[name]["controls"] = ctrl
    return out, info


def _safe(name: str) -> str:
    """A set name as an obs / HDF5 key: ``/`` (a path separator in h5ad files) becomes ``_``."""
    return str(name).replace("/", "_")


def _regress_out(s: np.ndarray, design: np.ndarray, penalty: np.ndarray | None = None) -> np.ndarray:
    """Residuals of every column of ``s`` on ``design`` (penalised least squares, one solve)."""
    gram = design.T @ design
    if penalty is not None:
        gram = gram + penalty
    gram = gram + np.eye(gram.shape[0]) * 1e-10 * max(np.trace(gram) / gram.shape[0], 1.0)
    coef = np.linalg.solve(gram, design.T @ s)
    return s - design @ coef


def _covariate_design(adata, names: list) -> np.ndarray:
    cols = [np.ones(adata.n_obs)]
    for c in names:
        if c not in adata.obs:
            raise KeyNotFoundError(f"{_where(adata)}: covariate obs[{c!r}] not found (obs columns: "
                                   f"{list(adata.obs.columns)})")
        v = pd.to_numeric(adata.obs[c], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(v).all():
            raise InputError(f"{_where(adata)}: covariate obs[{c!r}] must be numeric and finite")
        sd = v.std()
        cols.append((v - v.mean()) / (sd if sd > 0 else 1.0))
    return np.column_stack(cols)


def bspline_basis(x: np.ndarray, n_splines: int = 10, order: int = 3) -> np.ndarray:
    """Uniform B-spline basis (n x n_splines) on ``[min(x), max(x)]``, Cox-de Boor recursion over the degree."""
    lo, hi = float(np.min(x)), float(np.max(x))
    u = (np.asarray(x, dtype=np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    n_int = n_splines - order
    h = 1.0 / n_int
    knots = np.arange(-order, n_int + order + 1) * h
    knots[-1] += 1e-9
    u = np.clip(u, 0.0, 1.0 - 1e-12)[:, None]
    b = ((u >= knots[:-1]) & (u < knots[1:])).astype(np.float64)
    for d in range(1, order + 1):  # the degree, not the data
        left = (u - knots[:-(d + 1)]) / (knots[d:-1] - knots[:-(d + 1)])
        right = (knots[d + 1:] - u) / (knots[d + 1:] - knots[1:-d])
        b = left * b[:, :-1] + right * b[:, 1:]
    return b


def _spline_design(xy: np.ndarray, n_splines: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Tensor-product basis of the two coordinates (row-wise Kronecker) with an intercept, and its penalty
    ``lam (D'D (x) I + I (x) D'D)`` (second differences; the intercept unpenalised)."""
    bx, by = bspline_basis(xy[:, 0], n_splines), bspline_basis(xy[:, 1], n_splines)
    t = (bx[:, :, None] * by[:, None, :]).reshape(len(xy), -1)
    d = np.diff(np.eye(n_splines), n=2, axis=0)
    dd, eye = d.T @ d, np.eye(n_splines)
    pen = lam * (np.kron(dd, eye) + np.kron(eye, dd))
    design = np.column_stack([t, np.ones(len(xy))])
    full = np.zeros((design.shape[1], design.shape[1]))
    full[:-1, :-1] = pen
    return design, full


def _graph(adata, graph: str | None, n_neighbors: int) -> sp.csr_matrix:
    if graph is not None and graph in adata.obsp:
        g = sp.csr_matrix(adata.obsp[graph], dtype=np.float64)
        g.setdiag(0)
        g.eliminate_zeros()
        return g
    if graph is not None and graph != "spatial.connectivities":
        raise KeyNotFoundError(f"{_where(adata)}: obsp[{graph!r}] not found (obsp keys: {list(adata.obsp)})")
    xy = _coords(adata)
    import torch

    from ..kernels import spatial_graph as sg

    rows, cols, _ = sg.knn_edges(xy, int(n_neighbors), torch.device("cpu"))
    n = adata.n_obs
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))


def _coords(adata) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise KeyNotFoundError(f"{_where(adata)}: obsm['spatial'] (coordinates) not found; pass smooth=False "
                               f"and no 'spatial' covariate, or add coordinates")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if not np.isfinite(xy).all():
        raise InputError(f"{_where(adata)}: obsm['spatial'] must be finite")
    return xy


def _check(weights, background, covariates, n_splines, n_bins):
    if weights not in ("cv", "uniform"):
        raise InputError(f"weights must be 'cv' or 'uniform', not {weights!r}")
    if background not in (None, "control"):
        raise InputError(f"background must be None or 'control', not {background!r}")
    covariates = [] if covariates is None else ([covariates] if isinstance(covariates, str) else list(covariates))
    if int(n_splines) < 4:
        raise InputError(f"n_splines must be >= 4 (cubic splines), not {n_splines}")
    if int(n_bins) < 1:
        raise InputError(f"n_bins must be >= 1, not {n_bins}")
    return covariates


def score_genesets(adata, *, genesets: dict, layer: str | None = "lognorm", weights: str = "cv",
                   background: str | None = "control", ctrl_size: int = 50, n_bins: int = 25, smooth: bool = True,
                   graph: str | None = "spatial.connectivities", n_neighbors: int = 6, covariates=None,
                   n_splines: int = 10, lam: float = 0.6, min_genes: int = 2, seed: int | None = None,
                   key_added: str = "score") -> dict:
    """Score gene sets per cell or spot, spatially smoothed and corrected for covariates (module docstring).

    ``genesets``: ``{name: [genes]}`` (symbols, var names or ids, case-insensitive; genes absent from the data
    are skipped and reported, a set with fewer than ``min_genes`` present genes is an error). ``layer``:
    log-normalised values (a missing ``"lognorm"`` is computed from the counts). ``weights``: ``"cv"`` or
    ``"uniform"``. ``background``: ``"control"`` (expression-matched control genes subtracted) or None.
    ``smooth``: mean over the spatial neighbours of ``obsp[graph]`` (absent: the ``n_neighbors`` nearest
    neighbours of ``obsm['spatial']``). ``covariates``: obs columns regressed out before smoothing and/or
    ``"spatial"`` (a penalised tensor B-spline trend of the coordinates with ``n_splines`` per axis and
    penalty ``lam``, removed after smoothing). EnrichMap's ``score()`` corresponds to ``weights="cv",
    background=None, covariates=["spatial"]``.

    Writes ``obs[f"{key_added}.{name}"]`` per set (a ``/`` in a name becomes ``_``) and ``uns[key_added]``
    (params, version, ``sets``: a table of the genes used, their weights and the missing ones). Returns ``{name: {"n_genes", "missing", ...}}``.
    """
    seed = settings.seed if seed is None else int(seed)
    covariates = _check(weights, background, covariates, n_splines, n_bins)
    spatial = "spatial" in covariates
    cell_cov = [c for c in covariates if c != "spatial"]
    x = _matrix(adata, layer)
    sets, missing = _resolve_sets(adata, genesets, int(min_genes))
    design = _covariate_design(adata, cell_cov) if cell_cov else None
    g = _graph(adata, graph, n_neighbors) if smooth else None
    xy = _coords(adata) if spatial else None
    s, info = _raw_scores(x, sets, weights, background, int(n_bins), int(ctrl_size), seed)
    if design is not None:
        s = _regress_out(s, design) + s.mean(axis=0)
    if g is not None:
        deg = np.maximum(np.asarray(g.sum(axis=1)).ravel(), 1e-10)
        s = np.asarray(g @ s) / deg[:, None]
    if spatial:
        b, pen = _spline_design(xy, int(n_splines), float(lam))
        s = _regress_out(s, b, pen)
    names = np.asarray(adata.var["gene"] if "gene" in adata.var else adata.var_names, dtype=str)
    for j, name in enumerate(sets):  # a handful of sets
        adata.obs[f"{key_added}.{_safe(name)}"] = s[:, j]
    table = pd.DataFrame({"set": list(sets), "column": [f"{key_added}.{_safe(k)}" for k in sets],
                          "n_genes": [int(c.size) for c in sets.values()],
                          "genes": [";".join(names[c]) for c in sets.values()],
                          "weights": [";".join(f"{w:.6g}" for w in info[k]["weights"]) for k in sets],
                          "missing": [";".join(map(str, missing[k])) for k in sets],
                          "controls": [";".join(names[info[k].get("controls", np.zeros(0, np.int64))]) for k in sets]})
    adata.uns[key_added] = {"params": {"layer": "X" if layer is None else layer, "weights": weights,
                                       "background": "none" if background is None else background,
                                       "ctrl_size": int(ctrl_size), "n_bins": int(n_bins), "smooth": bool(smooth),
                                       "graph": "knn" if g is not None and graph not in adata.obsp else str(graph),
                                       "n_neighbors": int(n_neighbors), "covariates": list(covariates),
                                       "n_splines": int(n_splines), "lam": float(lam), "seed": seed},
                            "version": __version__, "sets": table}
    logger.info(f"{_where(adata)}: scored {len(sets)} gene sets ({', '.join(sets)})")
    return {name: {k: v for k, v in info[name].items() if k not in ("weights", "controls")} | {"missing": missing[name]}
            for name in sets}
