"""The geometry kernels of bins -> cells against direct computations (expkit.kernels.bins_cells)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from matplotlib.path import Path as MplPath

from expkit.kernels import bins_cells as K


def _random_polygons(rng, n, shape):
    """Star-shaped polygons (random radii on sorted angles): convex and concave ones."""
    k = rng.integers(3, 12, n)
    cx, cy = rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n)
    xs, ys = [], []
    for i in range(n):  # building the test case, not the code under test
        th = np.sort(rng.uniform(0, 2 * np.pi, k[i]))
        rad = rng.uniform(2, 15, k[i])
        xs.append(cx[i] + rad * np.cos(th))
        ys.append(cy[i] + rad * np.sin(th))
    offsets = np.r_[0, np.cumsum(k)]
    return np.concatenate(xs), np.concatenate(ys), offsets, np.arange(1, n + 1, dtype=np.uint32)


def test_rasterise_polygons_matches_point_in_polygon():
    rng = np.random.default_rng(1)
    shape = (120, 150)
    x, y, off, ids = _random_polygons(rng, 40, shape)
    got = K.rasterise_polygons(x, y, off, ids, shape)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[cc.ravel(), rr.ravel()].astype(float)
    want = np.zeros(shape[0] * shape[1], dtype=np.uint32)
    for i in range(len(ids)):  # the last polygon wins where they overlap, as documented
        ring = np.c_[x[off[i]:off[i + 1]], y[off[i]:off[i + 1]]]
        want[MplPath(ring).contains_points(centres)] = ids[i]
    agree = np.mean(got.ravel() == want)
    # pixel centres exactly on an edge may go either way; there are few
    assert agree > 0.999, agree
    assert set(np.unique(got)) <= set(np.r_[0, ids])


def test_rasterise_closed_rings_and_empty():
    sq = np.array([1.0, 5, 5, 1, 1]), np.array([1.0, 1, 4, 4, 1])  # closing vertex repeated
    got = K.rasterise_polygons(sq[0], sq[1], np.array([0, 5]), np.array([7], dtype=np.uint32), (6, 7))
    want = np.zeros((6, 7), dtype=np.uint32)
    want[1:4, 1:5] = 7  # centres with 1 <= x < 5, 1 <= y < 4
    np.testing.assert_array_equal(got, want)
    empty = K.rasterise_polygons(np.zeros(0), np.zeros(0), np.array([0]), np.zeros(0, dtype=np.uint32), (3, 3))
    assert not empty.any()


def test_expand_labels_nearest_object_without_merging():
    rng = np.random.default_rng(2)
    lab = np.zeros((60, 70), dtype=np.uint32)
    pts = rng.integers(5, 55, (12, 2))
    for i, (r, c) in enumerate(pts):
        lab[r - 1:r + 2, c - 1:c + 2] = i + 1
    out = K.expand_labels(lab, 4.0)
    obj = np.argwhere(lab > 0)
    bg = np.argwhere(lab == 0)
    d = np.sqrt(((bg[:, None, :] - obj[None, :, :]) ** 2).sum(-1))
    dmin = d.min(axis=1)
    got = out[bg[:, 0], bg[:, 1]]
    assert np.array_equal(got > 0, dmin - 0.5 <= 4.0)  # distance from the object pixel's edge
    # the label is the one of a nearest object pixel (any of them on a tie)
    nearest_labels = [set(lab[tuple(obj[j])] for j in np.flatnonzero(np.isclose(d[i], dmin[i])))
                      for i in np.flatnonzero(dmin <= 4.5)]
    assert all(g in s for g, s in zip(got[dmin <= 4.5], nearest_labels))
    np.testing.assert_array_equal(out[lab > 0], lab[lab > 0])  # objects keep their pixels
    np.testing.assert_array_equal(K.expand_labels(lab, 0), lab)


def test_aggregate_sums_bins_and_drops_small_cells():
    rng = np.random.default_rng(3)
    n_bins, n_genes = 500, 30
    X = sp.random(n_bins, n_genes, density=0.2, format="csr", random_state=3, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    lab = rng.integers(0, 40, n_bins) * (rng.random(n_bins) < 0.7)
    xy = rng.uniform(0, 100, (n_bins, 2))
    labels, counts, n, cen, kept = K.aggregate(lab, X, xy, min_bins=12)
    dense = X.toarray()
    for j, L in enumerate(labels):
        m = lab == L
        assert m.sum() >= 12 and n[j] == m.sum()
        np.testing.assert_allclose(counts[j].toarray().ravel(), dense[m].sum(0))
        np.testing.assert_allclose(cen[j], xy[m].mean(0))
    small = [L for L in np.unique(lab[lab > 0]) if (lab == L).sum() < 12]
    assert small and not np.isin(kept, small).any()
    assert np.array_equal(kept > 0, np.isin(lab, labels))


def test_lookup_rounds_to_the_pixel_under_the_point():
    lab = np.arange(12, dtype=np.uint32).reshape(3, 4)
    col = np.array([0.0, 0.49, 0.51, 3.4, -0.6, 3.6])
    row = np.array([0.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    np.testing.assert_array_equal(K.lookup(lab, col, row), [0, 0, 1, 11, 0, 0])
