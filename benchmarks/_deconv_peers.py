"""Run rctd-py and flashdeconv on the benchmark's pseudo-spots (run in the peer venv, /work/dcvenv).

Usage: python _deconv_peers.py IN_DIR OUT.npz [WHICH]  (IN_DIR holds spots.h5ad and reference.h5ad; WHICH a
comma-separated list of rctd (full mode), rctd_doublet, rctd_multi, flash; default rctd,flash).
Writes each tool's proportions (spots x the reference's sorted types), its wall time, CPU time and peak RSS.
"""
import os
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks._util is stdlib only
from benchmarks._util import timed  # noqa: E402


def _dense_weights(res, mode, k):
    """(N, K) proportions from an rctd-py result: full weights normalised; doublet: the pair's weights
    (a singlet: 1 on its first type, as expkit writes it); multi: the selected types' weights."""
    if mode == "full":
        w = np.asarray(res.weights, dtype=np.float64)
        return w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    n = len(res.weights)
    w = np.zeros((n, k))
    rows = np.arange(n)
    if mode == "doublet":
        wd = np.asarray(res.weights_doublet, dtype=np.float64)
        first, second = np.asarray(res.first_type), np.asarray(res.second_type)
        w[rows, first] += wd[:, 0]
        w[rows, second] += wd[:, 1]
        single = np.asarray(res.spot_class) == 1
        w[single] = 0.0
        w[rows[single], first[single]] = 1.0
        return w
    idx, sub = np.asarray(res.cell_type_indices), np.asarray(res.sub_weights, dtype=np.float64)
    for j in range(idx.shape[1]):                       # at most 4 selected types
        ok = idx[:, j] >= 0
        w[rows[ok], idx[ok, j]] += sub[ok, j]
    return w


def run_rctd(spots, ref, mode, min_cells):
    import rctd

    def go():
        r = rctd.Reference(ref, cell_type_col="cell_type", cell_min=min_cells)
        cfg = rctd.RCTDConfig(device="cpu", compile=False)
        return rctd.run_rctd(spots, r, mode=mode, config=cfg), r

    (res, r), dt, mem = timed(go)
    names = list(getattr(res, "cell_type_names", None) or r.cell_type_names)
    w = _dense_weights(res, mode, len(names))
    mask = getattr(res, "pixel_mask", None)
    frame = pd.DataFrame(np.nan, index=spots.obs_names, columns=names)
    frame.iloc[np.flatnonzero(mask) if mask is not None else np.arange(len(w))] = w
    return frame, dt, mem


def run_flash(spots, ref):
    import flashdeconv as fd

    def go():
        fd.tl.deconvolve(spots, ref, cell_type_key="cell_type", random_state=0)
        return spots.obsm["flashdeconv"]

    out, dt, mem = timed(go)
    if not isinstance(out, pd.DataFrame):
        out = pd.DataFrame(np.asarray(out), columns=spots.uns.get("flashdeconv", {}).get("cell_types"))
    return out, dt, mem


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["rctd", "flash"]
    min_cells = int(os.environ.get("MIN_CELLS", "25"))
    spots = ad.read_h5ad(src / "spots.h5ad")
    ref = ad.read_h5ad(src / "reference.h5ad")
    spots.X, ref.X = spots.layers["counts"], ref.layers["counts"]
    types = sorted(ref.obs["cell_type"].astype(str).unique())
    out = {}
    for name in which:
        c0 = time.process_time()
        if name.startswith("rctd"):
            mode = name.split("_")[1] if "_" in name else "full"
            w, dt, mem = run_rctd(spots.copy(), ref.copy(), mode, min_cells)
        else:
            w, dt, mem = run_flash(spots.copy(), ref.copy())
        out[name] = w.reindex(columns=types).to_numpy()
        out[f"{name}_time"], out[f"{name}_mem"], out[f"{name}_cpu"] = dt, mem, time.process_time() - c0
        print(f"{name}: {dt:.2f} s, peak +{mem:.0f} MiB", flush=True)
    np.savez(dst, types=np.array(types), **out)
