"""Spatially variable genes: SpatialDE2's score test (Kats, Vento-Tormo & Stegle 2021) for all genes at once."""
from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import __version__
from .._logging import logger
from ..errors import InputError, ResourceError
from ..kernels import score_test as st
from ..kernels import ski
from ..kernels import spatial_kernels as sk
from ..kernels.device import resolve_device
from . import svg_steps as steps

__all__ = ["svg_spatialde", "clear_cache"]

_OBS_DIST = {"negative_binomial": "negative_binomial", "nb": "negative_binomial",
             "negativebinomial": "negative_binomial", "normal": "normal", "gaussian": "normal"}

# in-memory caches (never stored in the AnnData): kernel operators and null-model fits
_KERNEL_CACHE: OrderedDict = OrderedDict()
_NULL_CACHE: OrderedDict = OrderedDict()
_KERNEL_CACHE_BYTES = 2 * 1024 ** 3
_NULL_CACHE_ITEMS = 8


def clear_cache() -> None:
    """Drop the cached kernels and null fits of :func:`svg_spatialde`."""
    _KERNEL_CACHE.clear()
    _NULL_CACHE.clear()


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        if a is None:
            h.update(b"none")
        elif sp.issparse(a):
            a = sp.csr_matrix(a)
            for part in (a.indptr, a.indices, a.data):
                h.update(np.ascontiguousarray(part).view(np.uint8))
            h.update(str(a.shape).encode())
        else:
            a = np.ascontiguousarray(np.asarray(a))
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.view(np.uint8) if a.size else b"")
    return h.hexdigest()


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 1024 ** 3


def _parse_kernel_space(kernel_space, coords) -> list[tuple[str, float]]:
    if kernel_space is None:
        ls = sk.default_lengthscales(coords)
        kernel_space = {"SE": ls, "PER": ls}
    if not isinstance(kernel_space, dict) or not kernel_space:
        raise InputError("kernel_space must be a dict like {'SE': [lengthscales], 'PER': [lengthscales]}")
    out = []
    for kind, values in kernel_space.items():
        k = {"se": "SE", "squaredexponential": "SE", "per": "PER", "cosine": "PER"}.get(str(kind).lower())
        if k is None:
            raise InputError(f"unknown kernel {kind!r} in kernel_space (known: 'SE', 'PER')")
        for l in np.atleast_1d(np.asarray(values, dtype=np.float64)):
            if not np.isfinite(l) or l <= 0:
                raise InputError(f"kernel_space[{kind!r}]: lengthscales must be positive, got {l}")
            out.append((k, float(l)))
    return out


def _kernel_name(kind: str, l: float) -> str:
    return f"{kind}_l{l:.5g}"


# ----------------------------------------------------------------------------------------------
# kernel construction plan
# ----------------------------------------------------------------------------------------------
def _ski_plan(l, coords, n, tol):
    """SKI (2-D grid interpolation) plan for an SE kernel, or None where it does not apply (not 2-D)."""
    if coords.shape[1] != 2:
        return None
    gx, gy, h = ski.ski_grid_shape(coords, l, eps=tol)
    gx2, gy2, _ = ski.ski_grid_shape(coords, l / math.sqrt(2.0), eps=tol)  # rowsum(K o K): l / sqrt 2
    return {"rep": "ski", "bytes": max(ski.ski_bytes(n, gx, gy), ski.ski_bytes(n, gx2, gy2)),
            "cost": ski.ski_cost(n, gx, gy), "grid": (gx, gy)}


def _plan_kernel(kind, l, coords, n, method, tol, sparse_tol, budget):
    """Choose a representation and estimate its memory, before anything large is allocated.

    ``approx``: per SE kernel the cheapest of sparse (``3 nnz_row`` multiply-adds per column of ``K Z``),
    low rank (``2 r``, with ``r ~ rank_est / 2``: the estimate was 1.5-3x the rank on DLPFC, ~1x on a
    regular grid) and, in 2-D, SKI (:func:`ski.ski_cost`) among those that fit (a low-rank factor that does
    not reach ``tol`` falls back to the cheapest other). ``ski``: SKI for every SE kernel (2-D only)."""
    if kind == "PER":
        return {"rep": "cosine", "bytes": 16 * n}
    dense_bytes = 8 * n * n
    if method == "exact":
        return {"rep": "dense", "bytes": dense_bytes}
    ski_p = _ski_plan(l, coords, n, tol)
    if method == "ski":
        if ski_p is None:
            raise InputError("method='ski' needs 2-D coordinates")
        return ski_p
    ski_ok = ski_p is not None and ski_p["bytes"] <= budget
    nnz_row = sk.se_sparse_nnz(coords, l, sparse_tol)
    sparse_bytes = int(nnz_row * n * 16 * 2.5)  # values + indices, and the build's temporaries
    # numerical rank of an SE kernel ~ (number of spots) / (spots within a few lengthscales): a rough
    # estimate from the non-zeros per row (it gave 1.5-3x the actual rank on DLPFC)
    rank_est = min(n, 200.0 * n / max(nnz_row, 1.0))
    # a rank-r factor costs about 2 r n per column; a CSR product about 3 nnz_row n
    if sparse_bytes <= budget and (nnz_row <= 64 or 2.0 * rank_est > 3.0 * nnz_row) and nnz_row < 0.5 * n:
        if ski_ok and ski_p["cost"] < 3.0 * nnz_row * n:
            return ski_p
        return {"rep": "sparse", "bytes": sparse_bytes, "nnz_row": nnz_row}
    if ski_ok and ski_p["cost"] < rank_est * n:
        return ski_p
    if sparse_bytes > budget and n * rank_est ** 2 > 1e12 and dense_bytes > budget:
        if ski_ok:
            return ski_p
        raise ResourceError(
            f"SE kernel with lengthscale {l:.5g} on {n} spots is too wide to be sparse ({nnz_row:.0f} entries "
            f"per row, {sparse_bytes / 1024 ** 3:.1f} GiB) and too narrow to be low rank (rank ~{rank_est:.0f})"
            + ("" if ski_p is None else f", and its SKI grid needs {ski_p['bytes'] / 1024 ** 3:.1f} GiB")
            + "; pass a kernel_space without it")
    max_rank = int(min(n, 4096))
    max_rank = int(min(max_rank, max(64, 2 * rank_est), math.sqrt(2e12 / n)))
    lowrank_bytes = 8 * n * max_rank
    return {"rep": "lowrank", "bytes": lowrank_bytes, "max_rank": max_rank, "nnz_row": nnz_row,
            "fallback_sparse_bytes": sparse_bytes, "dense_bytes": dense_bytes,
            "fallback_ski": ski_p if ski_ok else None}


def _build_kernel(kind, l, coords, plan, device, tol, sparse_tol, budget, dist_cache=None):
    if plan["rep"] == "cosine":
        return sk.cosine_kernel(coords, l, device)
    if plan["rep"] == "dense":
        if dist_cache is not None:
            if "D" not in dist_cache:
                dist_cache["D"] = sk.sqdist(coords, device)
            return sk.se_dense(coords, l, device, sqdist_matrix=dist_cache["D"])
        return sk.se_dense(coords, l, device)
    if plan["rep"] == "sparse":
        return sk.se_sparse(coords, l, sparse_tol, device)
    if plan["rep"] == "ski":
        return ski.se_ski(coords, l, device, eps=tol)
    op = sk.se_lowrank(coords, l, tol, device, max_rank=plan["max_rank"])
    if op is not None:
        return op
    # not low rank at this tolerance: the cheapest of SKI, sparse and dense that fits
    n = coords.shape[0]
    options = []
    if plan.get("fallback_ski") is not None:
        options.append((plan["fallback_ski"]["cost"], "ski"))
    if plan["fallback_sparse_bytes"] <= budget:
        options.append((3.0 * plan["nnz_row"] * n, "sparse"))
    if plan["dense_bytes"] <= budget:
        options.append((float(n) * n, "dense"))
    if options:
        rep = min(options)[1]
        if rep == "ski":
            return ski.se_ski(coords, l, device, eps=tol)
        return sk.se_sparse(coords, l, sparse_tol, device) if rep == "sparse" else sk.se_dense(coords, l, device)
    raise ResourceError(
        f"SE kernel with lengthscale {l:.5g} on {coords.shape[0]} spots is neither low rank (rank > "
        f"{plan['max_rank']} at tol={tol}) nor sparse enough ({plan['nnz_row']:.0f} entries per row) to fit "
        f"in {budget / 1024 ** 3:.1f} GiB; pass a kernel_space without it")


# ----------------------------------------------------------------------------------------------
# steps of svg_spatialde that use this module's caches and kernel plans (the others: svg_steps.py)
# ----------------------------------------------------------------------------------------------
def _check_options(obs_dist, method, null_fit) -> str:
    """The observation model (``"negative_binomial"`` or ``"normal"``) after checking the options."""
    dist = _OBS_DIST.get(str(obs_dist).lower().replace("-", "_").replace(" ", "_"))
    if dist is None:
        raise InputError(f"obs_dist must be 'negative_binomial' or 'normal', not {obs_dist!r}")
    if method not in ("auto", "exact", "approx", "ski"):
        raise InputError(f"method must be 'auto', 'exact', 'approx' or 'ski', not {method!r}")
    if null_fit not in st.NULL_FITS:
        raise InputError(f"null_fit must be one of {st.NULL_FITS}, not {null_fit!r}")
    return dist


def _resolve_kernels(kernel_space, coords, method, exact_max_spots):
    """The kernels ``[(kind, lengthscale)]``, their names and the method (``"auto"`` resolved)."""
    kernels = _parse_kernel_space(kernel_space, coords)
    names = [_kernel_name(k, l) for k, l in kernels]
    mode = ("exact" if coords.shape[0] <= exact_max_spots else "approx") if method == "auto" else method
    return kernels, names, mode


class _MemoryPlan(NamedTuple):
    """The memory plan of a run (:func:`_memory_plan`)."""

    budget: int
    chunk_size: int
    chunk_bytes: int
    plans: list
    all_at_once: bool


def _memory_plan(kernels, names, coords, g, mode, tol, sparse_tol, omnibus, chunk_size, max_memory,
                 device) -> _MemoryPlan:
    """Budget, gene chunk size and kernel representations, before anything large is allocated; raises
    :class:`ResourceError` when the run cannot fit."""
    n = coords.shape[0]
    budget = int((max_memory * 1024 ** 3) if max_memory is not None else 0.8 * _available_memory(device))
    if chunk_size is None:
        chunk_size = int(max(1, min(g if g else 1, (256 * 1024 ** 2) // (8 * 12 * n))))
    chunk_bytes = 8 * 12 * n * min(chunk_size, max(g, 1))
    plans = [_plan_kernel(k, l, coords, n, mode, tol, sparse_tol, budget) for k, l in kernels]
    per_kernel = max(p["bytes"] for p in plans)
    need = chunk_bytes + (sum(p["bytes"] for p in plans) if omnibus else per_kernel) + 8 * n * 64
    if need > budget:
        worst = max(range(len(plans)), key=lambda i: plans[i]["bytes"])
        raise ResourceError(
            f"svg_spatialde on {n} spots x {g} genes needs about {need / 1024 ** 3:.1f} GiB "
            f"({names[worst]}: {plans[worst]['rep']}, {plans[worst]['bytes'] / 1024 ** 3:.1f} GiB) but "
            f"{budget / 1024 ** 3:.1f} GiB are available; use method='approx', fewer kernels or max_memory")
    # all kernels held at once (when they fit): the per-chunk weights are computed once for all kernels
    all_at_once = (not omnibus and len(kernels) > 1
                   and sum(p["bytes"] for p in plans) + chunk_bytes + 8 * n * 64 <= budget)
    return _MemoryPlan(budget, chunk_size, chunk_bytes, plans, all_at_once)


def _null_model(gc, null_fit, use_cache, given_null, n_vars):
    """The null fit of the tested genes: given (``_null_fit``), from the null cache or fitted (and cached);
    returns ``(null, cache_hit)`` and sets it on ``gc``."""
    dist = gc.dist
    data_key = (_hash_arrays(gc.Xs, gc.s, gc.tested) + dist + str(gc.device)
                + (null_fit if dist == "negative_binomial" else ""))
    null_hit = use_cache and data_key in _NULL_CACHE and given_null is None
    if given_null is not None:
        given = [np.asarray(v, dtype=np.float64).ravel() for v in given_null]
        if len(given) != 2 or any(v.shape != (n_vars,) for v in given):
            raise InputError(f"_null_fit must be two arrays of length n_vars = {n_vars}")
        null = {"p1": given[0][gc.tested], "p2": given[1][gc.tested], "converged": np.ones(gc.g, dtype=bool)}
    elif null_hit:
        null = _NULL_CACHE[data_key]
        _NULL_CACHE.move_to_end(data_key)
    else:
        null = steps.fit_null(gc, null_fit)
        if use_cache:
            _NULL_CACHE[data_key] = null
            while len(_NULL_CACHE) > _NULL_CACHE_ITEMS:
                _NULL_CACHE.popitem(last=False)
    gc.set_null(null)
    if (~null["converged"]).any():
        logger.info(f"svg_spatialde: the null fit of {(~null['converged']).sum()} genes stopped at the "
                    "iteration limit")
    return null, null_hit


class _KernelSource:
    """The kernel operators of a run, built from their plans or taken from the kernel cache (``hits``)."""

    def __init__(self, coords, kernels, mem, mode, tol, sparse_tol, device, use_cache):
        self.coords, self.kernels, self.plans, self.budget = coords, kernels, mem.plans, mem.budget
        self.tol, self.sparse_tol, self.device, self.use_cache = tol, sparse_tol, device, use_cache
        self.coords_key = _hash_arrays(coords)
        self.hits = 0
        # the squared distances are shared by the dense SE kernels (when two n x n matrices fit)
        n = coords.shape[0]
        self.dist_cache = {} if (mode == "exact" and 16 * n * n + mem.chunk_bytes <= mem.budget) else None

    def get(self, j):
        kind, l = self.kernels[j]
        key = (self.coords_key, kind, l, self.plans[j]["rep"], self.tol, self.sparse_tol, str(self.device))
        if self.use_cache and key in _KERNEL_CACHE:
            self.hits += 1
            _KERNEL_CACHE.move_to_end(key)
            return _KERNEL_CACHE[key]
        op = _build_kernel(kind, l, self.coords, self.plans[j], self.device, self.tol, self.sparse_tol,
                           self.budget, self.dist_cache)
        if self.use_cache and op.nbytes <= _KERNEL_CACHE_BYTES // 2:
            _KERNEL_CACHE[key] = op
            while sum(o.nbytes for o in _KERNEL_CACHE.values()) > _KERNEL_CACHE_BYTES:
                _KERNEL_CACHE.popitem(last=False)
        return op


def _run_record(params, names, kernels, reps, gc, pvals, null, basis_residual, hits, null_hit, null_given,
                device) -> dict:
    """``uns[key]``: params, kernels and their representations, counts and cache use of the run; ``params``:
    ``(layer, spatial_key, dist, omnibus, sizefactors, n_svg, mode, tol, sparse_tol, use_gpu, null_fit)``."""
    layer, spatial_key, dist, omnibus, sizefactors, n_svg, mode, tol, sparse_tol, use_gpu, null_fit = params
    g = gc.g
    return {
        "params": {"layer": layer, "spatial_key": spatial_key, "obs_dist": dist, "omnibus": bool(omnibus),
                   "sizefactors": sizefactors if isinstance(sizefactors, str) else
                   ("total_counts" if sizefactors is None else "array"),
                   "n_svg": int(n_svg), "method": mode, "tol": tol, "sparse_tol": sparse_tol,
                   "use_gpu": bool(use_gpu), "null_fit": null_fit},
        "version": __version__,
        "kernels": names,
        "lengthscales": {nm: l for nm, (_, l) in zip(names, kernels)},
        "representation": reps,
        "n_spots_tested": int(gc.n),
        "n_genes_tested": int(g),
        "n_svg": int(pvals["is_svg"].sum()),
        "null_not_converged": int((~null["converged"]).sum()) if g else 0,
        "weight_basis_residual": basis_residual if g else 0.0,
        "cache": {"kernels": int(hits), "null": bool(null_hit)},
        **({"null_given": True} if null_given else {}),
        "device": str(device),
    }


# ----------------------------------------------------------------------------------------------
# main function
# ----------------------------------------------------------------------------------------------
def svg_spatialde(adata, *, layer: str | None = "counts", spatial_key: str = "spatial",
                  kernel_space: dict | None = None, sizefactors=None, obs_dist: str = "negative_binomial",
                  omnibus: bool = False, use_cache: bool = True, use_gpu: bool = False,
                  progress: bool = True, n_svg: int = 500, key_added: str = "spatialde",
                  method: str = "auto", tol: float = 1e-6, sparse_tol: float = 1e-8,
                  exact_max_spots: int = 2000, chunk_size: int | None = None,
                  max_memory: float | None = None, null_fit: str = "mle", _null_fit=None) -> pd.DataFrame:
    """Test every gene for spatial variation with SpatialDE2's score test.

    Per gene, a negative-binomial null ``y_i ~ NB(s_i exp(b), a)`` (size factors ``s``) is fitted for
    all genes at once (batched Newton), and a score test of a variance component ``tau K`` on the log
    mean is done for each kernel ``K`` of ``kernel_space``: ``U = 1/2 (W r)' K (W r)`` with
    ``W = m / (1 + a m)`` and ``r = y / m - 1``, its expectation ``e = 1/2 tr(P K)`` and information
    ``I`` (SpatialDE2's definition ``I_tt = 1/2 ||P K||_F^2``, see ``docs/svg.md``), Satterthwaite
    scaled chi-square p-values, then a Cauchy combination over kernels (``omnibus=False``) or one test
    of the summed kernel (``omnibus=True``) and Benjamini-Hochberg.

    Parameters
    ----------
    layer
        Counts layer (``None``: ``X``; ``"counts"`` falls back to ``X`` when the layer is absent).
    spatial_key
        ``obsm`` key of the coordinates.
    kernel_space
        ``{"SE": [lengthscales], "PER": [lengthscales]}``; default: SpatialDE2's, both kernels at 5
        log-spaced lengthscales from twice the smallest to the largest distance between spots.
    sizefactors
        Array (n_obs) or ``obs`` key; default: total counts per spot over all genes of ``layer``. Spots
        with size factor 0 are left out (NB model).
    obs_dist
        ``"negative_binomial"`` (counts) or ``"normal"`` (Gaussian score test with a constant mean, for a
        normalised layer).
    method
        ``"exact"`` (dense kernels), ``"approx"`` (SE kernels sparse below ``sparse_tol`` or low rank by
        a pivoted Cholesky stopped at a relative residual trace ``tol``; the cosine kernel is always
        exactly rank 2; in 2-D, SE kernels that are neither sparse nor cheaply low rank by grid interpolation
        (SKI) with a largest entry error ~``tol``), ``"auto"`` (exact up to ``exact_max_spots`` spots) or
        ``"ski"`` (every SE kernel by SKI, 2-D only: for accuracy checks).
    use_cache
        Reuse kernels and null fits from earlier calls with the same coordinates / counts / parameters
        (kept in memory in this module, never in ``adata``).
    max_memory
        Memory budget in GiB (default: the memory available now). A run that cannot fit raises
        :class:`expkit.errors.ResourceError` before it starts.
    null_fit
        How the negative-binomial null is fitted. ``"mle"`` (default): the maximum-likelihood ``(b, a)``
        of every gene. ``"spatialde2"``: SpatialDE2's fits, to reproduce its published results: its
        per-gene BFGS starts the dispersion at ``max(1e-8, moments estimate)`` and, where the moments
        estimate ``(var(y/s) - mean(1/s) mean(y/s)) / mean(y/s)^2`` is ``<= 1e-8``, stays at the Poisson
        limit ``a = 1e-8`` although the likelihood is higher elsewhere (up to ~14 log-likelihood units on
        DLPFC); so those genes keep ``a = 1e-8`` and only ``b`` is fitted, the others get the
        maximum-likelihood fit. No effect with ``obs_dist="normal"``. See ``docs/svg.md``.

    Writes ``var['<key>.pval']``, ``['<key>.padj']``, ``['<key>.log10p']`` (log10 p, finite where p
    underflows), ``['<key>.rank']`` (1 = most significant), ``['<key>.svg']`` (padj < 0.05 and rank <=
    ``n_svg``); ``varm['<key>.U' | '<key>.e' | '<key>.I' | '<key>.log10p']`` per kernel (DataFrames,
    one column per kernel); ``varm['<key>.null']`` the null fit (log mean ``b`` per unit size factor and
    dispersion ``a``; mean and variance for the normal model); ``uns[key]`` with params, kernels and their representations.
    Genes without counts get NaN and are left out of the correction. Returns the per-gene table.

    ``_null_fit`` (internal, for validation; not the same as ``null_fit``): a given null instead of the fit, as two arrays over
    ``var`` like ``varm['<key>.null']`` (``(log_mean, dispersion)``; mean and variance for the normal
    model); the null cache is then neither read nor written.
    """
    dist, device = _check_options(obs_dist, method, null_fit), resolve_device(use_gpu)
    Xs, cs, s, n_vars, tested = steps.read_inputs(adata, layer, spatial_key, sizefactors, dist)
    kernels, names, mode = _resolve_kernels(kernel_space, cs, method, exact_max_spots)
    mem = _memory_plan(kernels, names, cs, tested.size, mode, tol, sparse_tol, omnibus, chunk_size, max_memory, device)
    gc = steps.GeneChunks(Xs, s, tested, mem.chunk_size, dist, device)
    null, null_hit = _null_model(gc, null_fit, use_cache, _null_fit, n_vars)
    B1, B2, basis_residual = steps.weight_bases(gc) if gc.g else (None, None, 0.0)
    source = _KernelSource(cs, kernels, mem, mode, tol, sparse_tol, device, use_cache)
    stats, reps = steps.kernel_statistics(gc, B1, B2, source.get, names, omnibus, mem.all_at_once, progress)
    source.dist_cache = None
    pvals = steps.combine_pvalues(*stats, omnibus, len(kernels), n_vars, tested, n_svg)
    res = steps.write_results(adata, key_added, pvals, stats, ["omnibus"] if omnibus else names, n_vars, gc, null)
    adata.uns[key_added] = _run_record(
        (layer, spatial_key, dist, omnibus, sizefactors, n_svg, mode, tol, sparse_tol, use_gpu, null_fit), names,
        kernels, reps, gc, pvals, null, basis_residual, source.hits, null_hit, _null_fit is not None, device)
    return res
