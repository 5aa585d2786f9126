"""Co-occurrence counts of labelled points over distance thresholds (squidpy 1.8's definition), exact.

``N_r[a, b]`` is the number of ordered pairs ``i != j`` with labels ``(a, b)`` and ``|x_i - x_j|^2 <= t_r^2``
in float32, squidpy's precision: in 2-D ``fma(dy, dy, dx * dx)`` (squidpy's compiled loop, contracted on CPUs
with fused multiply-add), in 3-D the plain float32 sum. Every unordered pair is visited once, never an n x n
array, in blocks of ~1M pairs:

1. cells sorted by label, then along the longer axis; a row block (one label) meets, of each label after it,
   only the cells within ``t_max`` along that axis (one window per label; farther pairs cannot count);
2. squared distances in float32 (``dx * dx + dy * dy``, two roundings); the bin of a pair, the number of
   thresholds below it, is read from a table indexed by the top bits of the float's bit pattern (for
   non-negative floats the bit patterns are ordered as the values): a table bucket spans 256 ulps, and a
   bucket within 4 ulps of a threshold holds a sentinel instead of a bin;
3. one ``bincount`` per block over (column label, bin); the few sentinel pairs (about one in a thousand) get
   their exact squared distance (the fused formula above) and a binary search over the thresholds.

The block list is cut into ``MAX_WORKERS`` interleaved parts run side by side in threads on the CPU
(:func:`expkit.kernels.device.run_parallel`; integer counts: the result does not depend on the split).
"""
from __future__ import annotations

import numpy as np
import torch

from .device import MAX_WORKERS, run_parallel, single_thread

_CHUNK_ELEMENTS = 1 << 20  # ~1M pairs per block (~10 MiB of temporaries)
_SHIFT = 8                 # table bucket = 2**8 ulps of the squared distance
_MARGIN = 4                # ulps around each threshold left to the exact path (cheap vs fused rounding)


def squidpy_interval(xy32: np.ndarray, n: int) -> np.ndarray:
    """squidpy's default thresholds: ``n`` float32 values evenly spaced from the distance between the two
    points of smallest coordinate sum to half the distance from the first of them to the point of largest
    coordinate sum (the distances rounded to float32)."""
    s = xy32.sum(axis=1)
    lo1, lo2 = np.argpartition(s, 2)[:2]
    hi = np.argmax(s)

    def dist(a, b):
        d2 = np.sum((xy32[a].astype(np.float64) - xy32[b].astype(np.float64)) ** 2)
        return np.sqrt(np.float32(d2))

    t_min, t_max = dist(lo1, lo2), dist(lo1, hi) / np.float32(2.0)
    return np.linspace(np.float32(t_min), np.float32(t_max), num=int(n), dtype=np.float32)


def exact_d2(xr: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """Squared float32 distances of row pairs ``xr[i], xc[i]`` as squidpy computes them (see the module)."""
    dx = xr[:, 0] - xc[:, 0]
    dy = xr[:, 1] - xc[:, 1]
    if xr.shape[1] == 2:
        d64 = dy.double()  # dy * dy is exact in float64: one rounding of the sum, as fma
        return d64.mul_(d64).add_(dx.mul_(dx)).float()
    dz = xr[:, 2] - xc[:, 2]
    return dx.mul_(dx).add_(dy.mul_(dy)).add_(dz.mul_(dz))


class BitTable:
    """Bin of a squared distance (``bucketize(d2, t2)``) from the top bits of its float32 bit pattern."""

    def __init__(self, thresholds: np.ndarray, device: torch.device):
        t = np.asarray(thresholds, dtype=np.float32)
        t2 = (t * t).astype(np.float32)
        self.t2 = torch.as_tensor(t2, device=device)
        self.n = t.size                  # bin n: beyond the last threshold
        self.sentinel = t.size + 1       # bin n + 1: ask the exact path
        tb = t2.view(np.int32).astype(np.int64)
        self.top = int((tb[-1] + _MARGIN) >> _SHIFT) + 1   # buckets from here on: beyond every threshold
        # bucket q holds bin #{r: tb[r] + margin < q << SHIFT}: a step up at ((tb[r] + margin) >> SHIFT) + 1,
        # and the sentinel where a threshold's margin overlaps it, q in [(tb - margin + 1) >> S, (tb + margin) >> S]
        dtype = np.int8 if self.sentinel < 127 else np.int16
        steps = np.zeros(self.top + 2, dtype=dtype)
        np.add.at(steps, ((tb + _MARGIN) >> _SHIFT) + 1, 1)
        tab = np.cumsum(steps[:-1], dtype=dtype)
        lo, hi = np.maximum((tb - _MARGIN + 1) >> _SHIFT, 0), (tb + _MARGIN) >> _SHIFT
        amb = np.concatenate([np.arange(u, v + 1) for u, v in zip(lo, hi)])  # a bucket or two per threshold
        tab[amb] = self.sentinel
        self.table = torch.as_tensor(tab, device=device)

    def coarse(self, d2: torch.Tensor) -> torch.Tensor:
        """Bins of a float32 block (int8 / int16, the sentinel where the exact path must decide)."""
        q = torch.bitwise_right_shift(d2.view(torch.int32), _SHIFT).clamp_(max=self.top)
        return torch.index_select(self.table, 0, q.view(-1)).view(d2.shape)

    def exact(self, d2: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(d2, self.t2, right=False)


def _sentinel_positions(bins: torch.Tensor, sentinel: int) -> torch.Tensor:
    """Flat positions of the sentinel in ``bins``: a scan of 8-byte words of the mask, then their bytes."""
    mask = (bins == sentinel).view(-1)
    n8 = mask.numel() // 8 * 8
    words = torch.nonzero(mask[:n8].view(torch.int64)).view(-1)
    cand = (words[:, None] * 8 + torch.arange(8, device=bins.device)).view(-1)
    tail = torch.arange(n8, mask.numel(), device=bins.device)
    cand = torch.cat([cand, tail])
    return cand[mask[cand]]


class _Pairs:
    """The sorted cells and their column windows (step 1 of the module's description)."""

    def __init__(self, xy: np.ndarray, codes: np.ndarray, k: int, reach: float, device):
        ax = int(np.argmax(np.ptp(xy, axis=0))) if len(xy) else 0
        order = np.lexsort((xy[:, ax], codes))
        self.x = torch.as_tensor(np.ascontiguousarray(xy[order]), device=device)
        self.lab = np.asarray(codes)[order]
        self.sx = xy[order, ax]
        self.bounds = np.searchsorted(self.lab, np.arange(k + 1))
        self.k, self.reach, self.device = k, reach, device

    def windows(self, c: int, a: int, b: int) -> list[tuple[int, int]]:
        """Column ranges of labels c..k-1 within reach of rows a:b (label c's from row a on)."""
        lo, hi = self.sx[a:b].min() - self.reach, self.sx[a:b].max() + self.reach
        s0, s1 = self.bounds[c:-1], self.bounds[c + 1:]
        i0 = np.array([s + np.searchsorted(self.sx[s:e], lo, "left") for s, e in zip(s0, s1)])
        i1 = np.array([s + np.searchsorted(self.sx[s:e], hi, "right") for s, e in zip(s0, s1)])
        i0[0] = max(i0[0], a)
        return [(int(u), int(v)) for u, v in zip(i0, i1) if v > u]

    def blocks(self, chunk: int) -> list[tuple[int, int, int]]:
        out = []
        for c in range(self.k):
            a = int(self.bounds[c])
            while a < self.bounds[c + 1]:
                width = sum(v - u for u, v in self.windows(c, a, a + 1))
                b = int(min(self.bounds[c + 1], a + max(1, chunk // max(1, width))))
                out.append((c, a, b))
                a = b
        return out


def _count_blocks(P: _Pairs, table: BitTable, blocks, col_base: torch.Tensor, nb: int) -> torch.Tensor:
    """``(k, k * nb)`` pair counts of the given row blocks (steps 2-3)."""
    k, x, dev = P.k, P.x, P.device
    hist = torch.zeros((k, k * nb), dtype=torch.int64, device=dev)
    for c, a, b in blocks:
        segs = P.windows(c, a, b)
        cols = torch.cat([torch.arange(u, v, device=dev) for u, v in segs])
        xc = x[cols]
        d2 = torch.sub(x[a:b, None, 0], xc[None, :, 0])
        d2.mul_(d2)
        for ax in range(1, x.shape[1]):
            d = torch.sub(x[a:b, None, ax], xc[None, :, ax])
            d2.addcmul_(d, d)
        bins = table.coarse(d2)
        nd = min(b, segs[0][1]) - segs[0][0]   # the block's own rows among its columns: keep j > i only
        bins[:, :nd].masked_fill_(cols[None, :nd] <= torch.arange(a, b, device=dev)[:, None], table.n)
        counts = torch.bincount(torch.add(bins, col_base[cols][None, :]).view(-1), minlength=k * nb)
        if int(counts.view(k, nb)[:, table.sentinel].sum()):
            pos = _sentinel_positions(bins, table.sentinel)
            r, cc = pos // cols.numel() + a, cols[pos % cols.numel()]
            exact = table.exact(exact_d2(x[r], x[cc]))
            counts += torch.bincount(col_base[cc].long() + exact, minlength=k * nb)
        hist[c] += counts
    return hist


def cooccurrence_counts(xy: np.ndarray, codes: np.ndarray, k: int, thresholds: np.ndarray,
                        device: torch.device, chunk_elements: int = _CHUNK_ELEMENTS,
                        n_workers: int | None = None) -> np.ndarray:
    """``(k, k, L)`` int64 counts of ordered pairs ``i != j`` with squared distance <= ``thresholds[r]^2``
    (float32 coordinates and thresholds, sorted thresholds; see the module for the method). ``n_workers``:
    the number of parts the blocks are cut into (default ``MAX_WORKERS``; the counts do not depend on it)."""
    xy = np.asarray(xy, dtype=np.float32)
    table = BitTable(thresholds, device)
    t_max = float(np.max(thresholds)) if np.size(thresholds) else 0.0
    P = _Pairs(xy, codes, k, t_max * (1 + 1e-5) + 1e-3, device)
    nb = table.n + 2
    base_dtype = torch.int16 if k * nb < 2 ** 15 else torch.int32
    col_base = torch.as_tensor(P.lab * nb, device=device).to(base_dtype)
    blocks = P.blocks(int(chunk_elements))
    n_parts = max(1, min(int(n_workers or MAX_WORKERS), len(blocks)))
    parts = [blocks[i::n_parts] for i in range(n_parts)]   # interleaved: similar loads
    with single_thread(device):
        hists = run_parallel(lambda part: _count_blocks(P, table, part, col_base, nb), parts, device)
    hist = torch.zeros((k, k * nb), dtype=torch.int64, device=device)
    for h in hists:
        hist += h
    h = hist.view(k, k, nb)[:, :, : table.n]
    h = h + h.transpose(0, 1)  # unordered -> ordered pairs (i, j) and (j, i)
    return torch.cumsum(h, dim=2).cpu().numpy()


def cooccurrence_ratio(counts: np.ndarray) -> np.ndarray:
    """``occ[a, b, r] = (N[b, a, r] / R[b, r]) / (R[a, r] / T[r])`` with ``R[c, r] = sum_a N[a, c, r]``;
    0 where ``R[a, r]`` or ``R[b, r]`` is 0."""
    n = counts.astype(np.float64)
    col = n.sum(axis=0)                       # R[c, r]
    tot = col.sum(axis=0)                     # T[r]
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = col / tot[None, :]                                   # P(a) at r
        cond = np.transpose(n, (1, 0, 2)) / col[None, :, :]         # [a, b]: N[b, a] / R[b]
        occ = cond / prob[:, None, :]
    ok = (prob[:, None, :] != 0) & (col[None, :, :] != 0)
    return np.where(ok, occ, 0.0)
