"""RCTD's pipeline on matrices (reference profiles -> genes -> platform effect -> sigma -> weights) and its
``full`` / ``doublet`` / ``multi`` modes, every per-spot fit batched over spots (:mod:`expkit.kernels.rctd`)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .._logging import logger
from ..errors import InputError
from ..kernels import rctd as kr

DEFAULTS = dict(gene_cutoff=0.000125, fc_cutoff=0.5, gene_cutoff_reg=0.0002, fc_cutoff_reg=0.75, umi_min=100,
                umi_min_sigma=300, counts_min=10, n_fit=1000, n_epoch=8, max_multi_types=4,
                confidence_threshold=5.0, doublet_threshold=20.0, ref_min_umi=100, ref_max_cells=10000)


def reference_profiles(ref_counts: sp.csr_matrix, codes: np.ndarray, n_types: int, ref_idx: np.ndarray,
                       seed: int, min_umi: int, max_cells: int) -> np.ndarray:
    """(K, shared genes) profiles: cells with fewer than ``min_umi`` counts dropped, at most ``max_cells``
    per type (a seeded subsample), each cell scaled by its total over all of the reference's genes."""
    tot = np.asarray(ref_counts.sum(1)).ravel()
    keep = tot >= min_umi
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(codes))
    rank = np.empty(len(codes), np.int64)
    ranked = order[np.argsort(codes[order], kind="stable")]
    starts = np.searchsorted(codes[ranked], np.arange(n_types))
    rank[ranked] = np.arange(len(codes)) - starts[codes[ranked]]
    keep &= rank < max_cells
    if np.bincount(codes[keep], minlength=n_types).min() == 0:
        raise InputError(f"reference: after dropping cells with fewer than {min_umi} counts some cell types have "
                         "no cells left")
    x = ref_counts[keep]
    scaled = sp.diags(1.0 / tot[keep]) @ x
    return kr.cell_type_profiles_scaled(scaled[:, ref_idx], codes[keep], n_types)


def select_genes(profiles, sp_counts, spot_ok, gene_names, cfg):
    """RCTD's two gene lists (``reg`` for the per-spot fits, ``bulk`` for the platform effect)."""
    bulk = np.asarray(sp_counts[spot_ok].sum(0)).ravel()
    keep = np.char.find(np.asarray(gene_names, dtype=str), "mt-") < 0
    reg = kr.de_genes(profiles, bulk, cfg["fc_cutoff_reg"], cfg["gene_cutoff_reg"], 3, keep)
    blk = kr.de_genes(profiles, bulk, cfg["fc_cutoff"], cfg["gene_cutoff"], 3, keep)
    for name, g in (("reg", reg), ("bulk", blk)):
        if len(g) < 10:
            raise InputError(f"RCTD found only {len(g)} differentially expressed genes for its {name!r} list "
                             "(threshold 10): the reference types do not differ on the shared genes")
    return reg, blk


def prepare(profiles, sp_counts, numi, gene_names, cfg, device, seed):
    """Gene lists, spot mask, platform-normalised profiles on the ``reg`` genes and sigma."""
    spot_ok = numi >= cfg["umi_min"]
    if not spot_ok.any():
        raise InputError(f"no spot has at least {cfg['umi_min']} counts (umi_min); totals range "
                         f"{numi.min():.0f}-{numi.max():.0f}")
    reg, blk = select_genes(profiles, sp_counts, spot_ok, gene_names, cfg)
    spot_ok &= np.asarray(sp_counts[:, blk].sum(1)).ravel() >= cfg["counts_min"]
    bulk = np.asarray(sp_counts[spot_ok].sum(0)).ravel()
    bulk_w, renorm = kr.platform_effect(profiles, bulk, float(numi[spot_ok].sum()), blk, device)
    pos = np.searchsorted(blk, reg)
    if not np.array_equal(blk[np.minimum(pos, len(blk) - 1)], reg):   # reg genes outside the bulk list
        reg = reg[np.isin(reg, blk)]
        pos = np.searchsorted(blk, reg)
    prof_t = torch.as_tensor(renorm[:, pos], dtype=torch.float64, device=device)
    y = torch.as_tensor(sp_counts[:, reg].toarray(), dtype=torch.float64, device=device)
    n_t = torch.as_tensor(numi, dtype=torch.float64, device=device)
    fit_pool = np.flatnonzero(spot_ok & (numi > cfg["umi_min_sigma"]))
    if len(fit_pool) == 0:
        logger.warning(f"no spot has more than {cfg['umi_min_sigma']} counts: sigma is fitted on all spots")
        fit_pool = np.flatnonzero(spot_ok)
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(fit_pool, size=min(cfg["n_fit"], len(fit_pool)), replace=False))
    fit_t = torch.as_tensor(fit, device=device)
    sigma = kr.choose_sigma(prof_t, y[fit_t], n_t[fit_t], n_epoch=cfg["n_epoch"], log=logger.debug)
    return dict(reg=reg, blk=blk, spot_ok=spot_ok, bulk_weights=bulk_w, prof_t=prof_t, y=y, numi=n_t,
                sigma=sigma)


def _pairs(k: int, device):
    i, j = torch.triu_indices(k, k, 1, device=device)
    return i, j


def doublet_mode(prof_t, y, numi, table, w_full, cfg):
    """RCTD's doublet mode for all spots at once. Returns (weights (N, K) proportions, class codes
    (0 reject, 1 singlet, 2 doublet_certain, 3 doublet_uncertain), first type, second type)."""
    n, k = w_full.shape
    dev = w_full.device
    cand = w_full > 0.01
    none = ~cand.any(1)
    cand[none, : min(3, k)] = True
    one = cand.sum(1) == 1
    first_is_0 = cand[:, 0]
    cand[one & first_is_0, 1] = True
    cand[one & ~first_is_0, 0] = True
    s_sp, s_ty = torch.nonzero(cand, as_tuple=True)
    w1, _ = kr.fit_weights(prof_t, y, numi, table, types=s_ty[:, None], spots=s_sp, n_iter=25)
    single = torch.full((n, k), float("inf"), dtype=torch.float64, device=dev)
    single[s_sp, s_ty] = kr.scores(prof_t, y, numi, table, w1, types=s_ty[:, None], spots=s_sp)
    pi, pj = _pairs(k, dev)
    valid = cand[:, pi] & cand[:, pj]
    p_sp, p_pair = torch.nonzero(valid, as_tuple=True)
    types = torch.stack([pi[p_pair], pj[p_pair]], 1)
    w2, _ = kr.fit_weights(prof_t, y, numi, table, types=types, spots=p_sp, n_iter=25)
    pair = torch.full((n, len(pi)), float("inf"), dtype=torch.float64, device=dev)
    pair[p_sp, p_pair] = kr.scores(prof_t, y, numi, table, w2, types=types, spots=p_sp)
    min_score, best = pair.min(1)
    t1, t2 = pi[best], pj[best]
    near = pair < (min_score + cfg["confidence_threshold"])[:, None]
    ok1 = ~(near & (pi[None] != t1[:, None]) & (pj[None] != t1[:, None])).any(1)
    ok2 = ~(near & (pi[None] != t2[:, None]) & (pj[None] != t2[:, None])).any(1)
    rows = torch.arange(n, device=dev)
    s1, s2 = single[rows, t1], single[rows, t2]
    cls = torch.full((n,), 2, dtype=torch.long, device=dev)
    cls[ok1 ^ ok2] = 3
    cls[~ok1 & ~ok2] = 0
    singlet = torch.where(ok1 & ok2, torch.minimum(s1, s2), torch.where(ok1, s1, s2))
    singlet = torch.where(~ok1 & ~ok2, min_score + 2 * cfg["doublet_threshold"], singlet)
    swap = (~ok1 & ok2) | (ok1 & ok2 & (s2 < s1))
    first, second = torch.where(swap, t2, t1), torch.where(swap, t1, t2)
    cls[singlet - min_score < cfg["doublet_threshold"]] = 1
    wd, _ = kr.fit_weights(prof_t, y, numi, table, types=torch.stack([first, second], 1), spots=rows)
    wd = wd / wd.sum(1, keepdim=True).clamp_min(1e-300)
    out = torch.zeros((n, k), dtype=torch.float64, device=dev)
    out[rows, first] = wd[:, 0]
    out[rows, second] += wd[:, 1]
    out[cls == 1] = 0.0
    out[rows[cls == 1], first[cls == 1]] = 1.0
    return out, cls, first, second


def _score_sets(prof_t, y, numi, table, spots, types):
    w, _ = kr.fit_weights(prof_t, y, numi, table, types=types, spots=spots, n_iter=25)
    return kr.scores(prof_t, y, numi, table, w, types=types, spots=spots)


def multi_mode(prof_t, y, numi, table, w_full, cfg):
    """RCTD's multi mode for all spots at once: types added greedily (up to ``max_multi_types``) while
    the score improves by more than ``doublet_threshold``; a type is confident when no swap for another
    candidate comes within ``confidence_threshold``. Returns (weights (N, K), chosen (N, K) bool,
    confident (N, K) bool)."""
    n, k = w_full.shape
    dev = w_full.device
    cand = w_full > 0.01
    top = w_full.argmax(1)
    cand[torch.arange(n, device=dev), top] |= ~cand.any(1)
    chosen = torch.zeros((n, 0), dtype=torch.long, device=dev)
    curr = torch.full((n,), 1e10, dtype=torch.float64, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    for _ in range(int(cfg["max_multi_types"])):
        p_sp, p_ty = torch.nonzero(cand & active[:, None], as_tuple=True)
        if p_sp.numel() == 0:
            break
        types = torch.cat([chosen[p_sp], p_ty[:, None]], 1)
        sc = torch.full((n, k), float("inf"), dtype=torch.float64, device=dev)
        sc[p_sp, p_ty] = _score_sets(prof_t, y, numi, table, p_sp, types)
        best_score, best = sc.min(1)
        grow = active & (best_score <= curr - cfg["doublet_threshold"])
        active = grow
        fill = torch.where(grow, best, torch.full_like(best, -1))
        chosen = torch.cat([chosen, fill[:, None]], 1)
        curr = torch.where(grow, best_score, curr)
        cand[grow, best[grow]] = False
        if not bool(grow.any()):
            break
    chosen_f = chosen if chosen.shape[1] else top[:, None]
    sel = torch.zeros((n, k), dtype=torch.bool, device=dev)
    for c in range(chosen_f.shape[1]):
        col = chosen_f[:, c]
        sel[col >= 0, col[col >= 0]] = True
    sel[torch.arange(n, device=dev), top] |= ~sel.any(1)
    confident = _multi_confidence(prof_t, y, numi, table, sel, cand, curr, cfg)
    return _multi_weights(prof_t, y, numi, table, sel), sel, confident


def _multi_confidence(prof_t, y, numi, table, sel, cand, curr, cfg):
    """A chosen type is not confident if replacing it by a remaining candidate scores within the margin."""
    n, k = sel.shape
    dev = sel.device
    confident = sel.clone()
    sizes = sel.sum(1)
    for m in torch.unique(sizes).tolist():
        rows = torch.nonzero(sizes == m, as_tuple=True)[0]
        lists = torch.nonzero(sel[rows], as_tuple=True)[1].reshape(len(rows), m)
        for pos in range(m):
            r_idx, new_t = torch.nonzero(cand[rows], as_tuple=True)
            if r_idx.numel() == 0:
                continue
            keep = torch.cat([lists[:, :pos], lists[:, pos + 1:]], 1)[r_idx]
            types = torch.cat([keep, new_t[:, None]], 1)
            sc = _score_sets(prof_t, y, numi, table, rows[r_idx], types)
            hit = torch.zeros(len(rows), dtype=torch.bool, device=dev)
            hit.index_fill_(0, r_idx[sc < curr[rows[r_idx]] + cfg["confidence_threshold"]], True)
            confident[rows[hit], lists[hit, pos]] = False
    return confident


def _multi_weights(prof_t, y, numi, table, sel):
    """Final fit of each spot on its chosen types (grouped by how many), normalised."""
    n, k = sel.shape
    out = torch.zeros((n, k), dtype=torch.float64, device=sel.device)
    sizes = sel.sum(1)
    for m in torch.unique(sizes).tolist():
        rows = torch.nonzero(sizes == m, as_tuple=True)[0]
        lists = torch.nonzero(sel[rows], as_tuple=True)[1].reshape(len(rows), m)
        w, _ = kr.fit_weights(prof_t, y, numi, table, types=lists, spots=rows)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-300)
        out[rows[:, None], lists] = w
    return out
