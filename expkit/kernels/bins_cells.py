"""Kernels of bins -> cells: label expansion without merging, polygon rasterisation, label look-up, sparse
aggregation. Arrays in, arrays out (numpy / scipy); no AnnData, no I/O.

Conventions: a label image is a 2-D integer array, 0 = background; the pixel ``[row, col]`` covers
``[col - 0.5, col + 0.5) x [row - 0.5, row + 0.5)`` of its own pixel coordinates (the convention of
:mod:`expkit.io.images`).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

__all__ = ["expand_labels", "rasterise_polygons", "lookup", "aggregate", "label_of_bins"]


def expand_labels(labels: np.ndarray, distance_px: float) -> np.ndarray:
    """Background pixels within ``distance_px`` of an object take the label of the NEAREST object pixel (so
    touching or close objects are never merged: each pixel goes to one object, the boundary between two
    objects falls half-way). Exact Euclidean distance transform (``scipy.ndimage.distance_transform_edt``),
    the rule of Space Ranger's nucleus expansion and scikit-image's ``expand_labels``, with one difference:
    the distance is counted from the object pixel's edge, not its centre (centre distance - 1/2 pixel), so the
    expansion reaches ``distance_px`` beyond the object's boundary rather than half a pixel short of it."""
    labels = np.asarray(labels)
    if distance_px <= 0 or labels.size == 0:
        return labels.copy()
    bg = labels == 0
    if bg.all() or not bg.any():
        return labels.copy()
    dist, (ir, ic) = ndimage.distance_transform_edt(bg, return_indices=True)
    out = labels[ir, ic]
    out[bg & (dist - 0.5 > distance_px)] = 0
    return out


def rasterise_polygons(x: np.ndarray, y: np.ndarray, offsets: np.ndarray, ids: np.ndarray,
                       shape: tuple[int, int]) -> np.ndarray:
    """A label image of ``shape`` (rows, cols) from polygons given in its pixel coordinates.

    Polygon ``k`` has the vertices ``(x[offsets[k]:offsets[k+1]], y[...])`` (a ring; closing vertex optional)
    and the id ``ids[k]`` (> 0). A pixel belongs to a polygon when its centre is inside (even-odd rule,
    scan-line fill: every edge crossing of every pixel row at once, no loop over polygons). Where polygons
    overlap, the pixel takes the polygon listed last.
    """
    rows, cols = int(shape[0]), int(shape[1])
    out = np.zeros((rows, cols), dtype=np.uint32)
    n = len(ids)
    if n == 0 or rows == 0 or cols == 0:
        return out
    offsets = np.asarray(offsets, dtype=np.int64)
    poly = np.repeat(np.arange(n), np.diff(offsets))
    nxt = np.arange(len(x)) + 1
    last = offsets[1:] - 1
    nxt[last] = offsets[:-1]  # each ring wraps around
    x0, y0, x1, y1 = x, y, x[nxt], y[nxt]
    keep = y0 != y1
    x0, y0, x1, y1, poly = x0[keep], y0[keep], x1[keep], y1[keep], poly[keep]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows r whose centre y = r lies in [lo, hi): half-open, so a vertex on a row counts once
    r_start = np.clip(np.ceil(lo), 0, rows).astype(np.int64)
    r_stop = np.clip(np.ceil(hi), 0, rows).astype(np.int64)
    count = np.maximum(r_stop - r_start, 0)
    if count.sum() == 0:
        return out
    edge = np.repeat(np.arange(len(count)), count)
    r = r_start[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(count) - count, count))
    t = (r - y0[edge]) / (y1[edge] - y0[edge])
    xc = x0[edge] + t * (x1[edge] - x0[edge])
    p = poly[edge]
    order = np.lexsort((xc, r, p))
    p, r, xc = p[order], r[order], xc[order]
    # crossings pair up within each (polygon, row): fill between the 1st-2nd, 3rd-4th, ...
    key = p * rows + r
    start = np.r_[True, key[1:] != key[:-1]]
    rank = np.arange(key.size) - np.maximum.accumulate(np.where(start, np.arange(key.size), 0))
    left = np.flatnonzero(rank % 2 == 0)
    left = left[(left + 1 < key.size)]
    left = left[key[left + 1] == key[left]]
    c0 = np.clip(np.ceil(xc[left]), 0, cols).astype(np.int64)
    c1 = np.clip(np.ceil(xc[left + 1]), 0, cols).astype(np.int64)  # pixels with centre in [x_left, x_right)
    width = np.maximum(c1 - c0, 0)
    seg = np.repeat(np.arange(left.size), width)
    cc = c0[seg] + (np.arange(seg.size) - np.repeat(np.cumsum(width) - width, width))
    rr = r[left][seg]
    lab = np.asarray(ids, dtype=np.uint32)[p[left][seg]]
    # later polygons win: write in polygon order (stable), the last write of a pixel stays
    out[rr, cc] = lab
    return out


def lookup(labels: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``labels[round(row), round(col)]`` for points in the label image's pixel coordinates; 0 outside."""
    c = np.floor(np.asarray(col) + 0.5).astype(np.int64)
    r = np.floor(np.asarray(row) + 0.5).astype(np.int64)
    inside = (r >= 0) & (r < labels.shape[0]) & (c >= 0) & (c < labels.shape[1])
    out = np.zeros(c.shape, dtype=np.int64)
    out[inside] = labels[r[inside], c[inside]]
    return out


def label_of_bins(segmented: np.ndarray, expanded: np.ndarray, col: np.ndarray, row: np.ndarray):
    """(label, how) of bins at pixel positions (col, row): how 1 = inside an object, 2 = inside its
    expansion, 0 = none."""
    lab_in = lookup(segmented, col, row)
    lab_ex = lookup(expanded, col, row) if expanded is not segmented else lab_in
    how = np.where(lab_in > 0, 1, np.where(lab_ex > 0, 2, 0)).astype(np.int8)
    return np.where(lab_in > 0, lab_in, lab_ex), how


def aggregate(bin_label: np.ndarray, X, xy: np.ndarray, *, min_bins: int = 1):
    """Sum the bins of each cell.

    ``bin_label``: (n_bins,) int64 cell label, 0 = no cell. Returns ``labels`` (cells kept, ascending),
    ``counts`` (cells x genes CSR, float32: the sum of their bins' rows of ``X``), ``n_bins``, ``centroid``
    (mean bin position, from ``xy``) and the updated ``bin_label`` (cells with fewer than ``min_bins`` bins
    dropped: their bins get 0).
    """
    bin_label = np.asarray(bin_label, dtype=np.int64).copy()
    hit = np.flatnonzero(bin_label > 0)
    labels, inv, n = np.unique(bin_label[hit], return_inverse=True, return_counts=True)
    if min_bins > 1 and labels.size:
        small = n < min_bins
        if small.any():
            bin_label[hit[small[inv]]] = 0
            hit = np.flatnonzero(bin_label > 0)
            labels, inv, n = np.unique(bin_label[hit], return_inverse=True, return_counts=True)
    m = labels.size
    A = sp.csr_matrix((np.ones(hit.size, dtype=np.float32), (inv, hit)), shape=(m, bin_label.size))
    counts = sp.csr_matrix(A @ sp.csr_matrix(X, dtype=np.float32), dtype=np.float32)
    counts.sum_duplicates()
    cx = np.bincount(inv, weights=xy[hit, 0], minlength=m)
    cy = np.bincount(inv, weights=xy[hit, 1], minlength=m)
    nn = np.maximum(n, 1)
    centroid = np.stack([cx / nn, cy / nn], axis=1)
    return labels, counts, n.astype(np.int64), centroid, bin_label
