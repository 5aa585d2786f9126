"""Cell-type deconvolution of spots / bins with a labelled single-cell reference.

``method="rctd"``: RCTD (Cable et al., Nat Biotechnol 2022) — reference profiles (mean of counts scaled by
each cell's total), RCTD's differentially expressed genes, the platform effect fitted on the pseudo-bulk,
the heavy-tailed Poisson-lognormal likelihood (tables computed by FFT, :mod:`expkit.kernels.rctd`), sigma by
maximum likelihood on up to 1000 spots, and per-spot weights by damped Newton steps with a non-negative QP,
all spots at once as tensors (CPU or CUDA). Modes ``full`` (all types), ``doublet`` (best pair or singlet,
RCTD's score rules) and ``multi`` (greedy, up to 4 types).

``method="fast"``: informative genes, the same platform rescaling, then variance-weighted non-negative
least squares of all spots at once with a spatial graph Laplacian penalty (FlashDeconv's idea), solved by
block coordinate descent (:func:`expkit.kernels.nnls.nnls_graph`); for millions of bins.

:func:`simulate_spots` aggregates labelled single cells on a grid into pseudo-spots of known composition.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..errors import InputError
from ..kernels import rctd as kr
from ..kernels.device import resolve_device, single_thread
from . import _deconv_fast as _fast
from . import _deconv_inputs as _in
from . import _deconv_rctd as _rc
from ._deconv_sim import simulate_spots, split_cells

__all__ = ["deconvolve", "simulate_spots", "split_cells"]

CLASSES = ["reject", "singlet", "doublet_certain", "doublet_uncertain"]


def _check_args(method, mode, key_added):
    if method not in ("rctd", "fast"):
        raise InputError(f"method must be 'rctd' or 'fast', not {method!r}")
    if mode not in ("full", "doublet", "multi"):
        raise InputError(f"mode must be 'full', 'doublet' or 'multi', not {mode!r}")
    if method == "fast" and mode != "full":
        raise InputError(f"method='fast' estimates full proportions only; mode={mode!r} needs method='rctd'")
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added must be a non-empty string, not {key_added!r}")


def _run_rctd(profiles, sp_counts, numi, genes, mode, seed, device):
    cfg = dict(_rc.DEFAULTS)
    prep = _rc.prepare(profiles, sp_counts, numi, genes, cfg, device, seed)
    ok_t = torch.as_tensor(np.flatnonzero(prep["spot_ok"]), device=device)
    y, n_t, prof_t = prep["y"][ok_t], prep["numi"][ok_t], prep["prof_t"]
    table = kr.likelihood_table(prep["sigma"], device, kr.needed_rows(y))
    w_full, conv = kr.fit_weights(prof_t, y, n_t, table)
    extra = {"converged": conv}
    if mode == "full":
        prop = w_full / w_full.sum(1, keepdim=True).clamp_min(1e-300)
    elif mode == "doublet":
        prop, cls, first, second = _rc.doublet_mode(prof_t, y, n_t, table, w_full, cfg)
        extra.update(spot_class=cls, first_type=first, second_type=second)
    else:
        prop, chosen, confident = _rc.multi_mode(prof_t, y, n_t, table, w_full, cfg)
        extra.update(n_types=chosen.sum(1), confident=confident)
    extra["weight_sum"] = w_full.sum(1)
    info = {"sigma": prep["sigma"], "genes_reg": prep["reg"], "genes_bulk": prep["blk"],
            "bulk_weights": prep["bulk_weights"], "n_iter_max": 50}
    return prep["spot_ok"], prop.cpu().numpy(), {k: v.cpu().numpy() for k, v in extra.items()}, info


def _full_rows(ok, values, fill=np.nan):
    out = np.full((len(ok),) + values.shape[1:], fill, dtype=values.dtype if fill is None else np.float64)
    out[ok] = values
    return out


def _write(adata, key, types, ok, prop, extra, mode, uns):
    frame = pd.DataFrame(_full_rows(ok, prop), index=adata.obs_names.copy(), columns=list(types))
    adata.obsm[key] = frame
    dom = np.full(adata.n_obs, None, dtype=object)
    good = ok & np.isfinite(frame.to_numpy()).all(1)
    dom[good] = np.asarray(types, dtype=object)[np.nanargmax(frame.to_numpy()[good], 1)]
    adata.obs[f"{key}.dominant"] = pd.Categorical(dom, categories=list(types))
    if mode == "doublet":
        cls = np.full(adata.n_obs, None, dtype=object)
        cls[ok] = np.asarray(CLASSES, dtype=object)[extra["spot_class"]]
        adata.obs[f"{key}.class"] = pd.Categorical(cls, categories=CLASSES)
        for name in ("first_type", "second_type"):
            col = np.full(adata.n_obs, None, dtype=object)
            col[ok] = np.asarray(types, dtype=object)[extra[name]]
            adata.obs[f"{key}.{name}"] = pd.Categorical(col, categories=list(types))
    if mode == "multi":
        adata.obs[f"{key}.n_types"] = _full_rows(ok, extra["n_types"].astype(np.float64))
    adata.uns[key] = uns


def deconvolve(adata, *, reference, label_key: str = "cell_type", method: str = "rctd", mode: str = "full",
               layer: str | None = "counts", reference_layer: str | None = "counts", min_cells_per_type: int = 25,
               seed: int = 0, use_gpu: bool = False, key_added: str = "deconv", min_shared_genes: int = 20,
               spatial_weight: float = 0.0, graph_key: str | None = "spatial", n_neighbors: int = 6,
               n_genes: int | None = 2000, n_sweeps: int = 200) -> dict:
    """Cell-type proportions of every spot from a labelled single-cell reference.

    ``reference``: an AnnData of cells x genes with raw counts (``layers[reference_layer]``, or X) and
    ``obs[label_key]``. Genes are matched by name, else through the gene database (symbols, aliases,
    Ensembl ids); fewer than ``min_shared_genes`` shared genes raise ``InputError``. Cell types with fewer
    than ``min_cells_per_type`` cells are **excluded with a warning** that lists them. ``method="rctd"``
    needs integer counts on both sides; ``mode`` is ``"full"``, ``"doublet"`` or ``"multi"`` (see the module
    docstring). ``method="fast"`` (full proportions only) uses ``spatial_weight`` (default 0: no spatial penalty; the
    penalty scales with 1000 / the median count of a spot, so low-count bins are smoothed more),
    the graph ``obsp[f"{graph_key}.connectivities"]`` (else a ``n_neighbors``-NN graph of
    ``obsm['spatial']``), at most ``n_genes`` informative genes and ``n_sweeps`` coordinate sweeps.

    Writes ``obsm[key_added]`` (DataFrame spots x cell types, rows summing to 1; NaN for spots RCTD does
    not fit: fewer than 100 counts, or fewer than 10 on its genes), ``obs[f"{key_added}.dominant"]``
    (categorical), in doublet mode ``obs[f"{key_added}.class"]`` (reject / singlet / doublet_certain /
    doublet_uncertain), ``.first_type``, ``.second_type``, in multi mode ``obs[f"{key_added}.n_types"]``,
    and ``uns[key_added]`` (``params``, ``version``, ``cell_types``, ``genes`` used, ``gene_match``,
    ``sigma`` for RCTD). Returns a summary: method, mode, spots fitted, cell types, genes, mean proportions.
    """
    _check_args(method, mode, key_added)
    what = _in.sample_name(adata)
    types, keep, codes = _in.reference_labels(reference, label_key, min_cells_per_type)
    counts_needed = method == "rctd"
    ref_counts = _in.counts_matrix(reference, reference_layer, "reference", counts_needed)
    sp_counts = _in.counts_matrix(adata, layer, what, counts_needed)
    ref_idx, sp_idx, match = _in.match_genes(reference, adata, what, min_shared_genes)
    device = resolve_device(use_gpu)
    numi = np.asarray(sp_counts.sum(1)).ravel()
    profiles = _rc.reference_profiles(ref_counts[keep], codes, len(types), ref_idx, seed,
                                      _rc.DEFAULTS["ref_min_umi"] if counts_needed else 0,
                                      _rc.DEFAULTS["ref_max_cells"])
    sub = sp_counts[:, sp_idx].tocsr()
    gene_names = np.asarray(adata.var_names.astype(str))[sp_idx]
    params = {"reference_label_key": label_key, "method": method, "mode": mode, "layer": layer,
              "reference_layer": reference_layer, "min_cells_per_type": int(min_cells_per_type), "seed": int(seed),
              "min_shared_genes": int(min_shared_genes)}
    uns = {"version": __version__, "cell_types": list(types), "gene_match": match}
    with single_thread(device):
        if method == "rctd":
            ok, prop, extra, info = _run_rctd(profiles, sub, numi, gene_names, mode, int(seed), device)
            uns.update(sigma=float(info["sigma"]), genes=list(gene_names[info["genes_reg"]]),
                       genes_platform=list(gene_names[info["genes_bulk"]]),
                       bulk_weights=[float(v) for v in info["bulk_weights"]])
        else:
            params.update(spatial_weight=float(spatial_weight), graph_key=graph_key, n_neighbors=int(n_neighbors),
                          n_genes=n_genes, n_sweeps=int(n_sweeps))
            adj = _fast.spatial_graph(adata, graph_key, n_neighbors, device) if spatial_weight > 0 else None
            prop, info = _fast.fast_weights(profiles, sub, numi, gene_names, adj, n_genes=n_genes,
                                            spatial_weight=float(spatial_weight), n_sweeps=int(n_sweeps),
                                            device=device)
            ok = np.isfinite(prop).all(1)
            prop, extra = prop[ok], {}
            uns.update(genes=list(gene_names[info["genes"]]), spatial_lambda=float(info["lambda"]),
                       sweeps=int(info["sweeps"]))
    uns["params"] = params
    _write(adata, key_added, types, ok, prop, extra, mode, uns)
    return {"method": method, "mode": mode, "n_spots": int(adata.n_obs), "n_fitted": int(ok.sum()),
            "cell_types": list(types), "n_genes": len(uns["genes"]), "gene_match": match,
            "sigma": uns.get("sigma"),
            "mean_proportions": {t: round(float(v), 4)
                                 for t, v in zip(types, np.nanmean(adata.obsm[key_added].to_numpy(), 0))}}
