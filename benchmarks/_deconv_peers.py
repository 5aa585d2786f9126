"""Run rctd-py and flashdeconv on the benchmark's pseudo-spots (run in the peer venv, /work/dcvenv).

Usage: python _deconv_peers.py IN_DIR OUT.npz  (IN_DIR holds spots.h5ad and reference.h5ad).
Writes each tool's proportions (spots x the reference's sorted types), its time and peak RSS.
"""
import os
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: benchmarks._util is stdlib only
from benchmarks._util import timed  # noqa: E402


def run_rctd(spots, ref, mode, min_cells):
    import rctd

    def go():
        r = rctd.Reference(ref, cell_type_col="cell_type", cell_min=min_cells)
        cfg = rctd.RCTDConfig(device="cpu", compile=False)
        return rctd.run_rctd(spots, r, mode=mode, config=cfg), r

    (res, r), dt, mem = timed(go)
    names = list(getattr(res, "cell_type_names", None) or r.cell_type_names)
    w = np.asarray(res.weights, dtype=np.float64)
    if mode == "doublet":
        w = np.asarray(res.weights_doublet_full if hasattr(res, "weights_doublet_full") else res.weights)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    return pd.DataFrame(w, columns=names), dt, mem


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
        if name == "rctd":
            w, dt, mem = run_rctd(spots.copy(), ref.copy(), "full", min_cells)
        else:
            w, dt, mem = run_flash(spots.copy(), ref.copy())
        out[name] = w.reindex(columns=types).to_numpy()
        out[f"{name}_time"], out[f"{name}_mem"] = dt, mem
        print(f"{name}: {dt:.2f} s, peak +{mem:.0f} MiB", flush=True)
    np.savez(dst, types=np.array(types), **out)
